"""Zero-shot CLIP: class prompts through the frozen text tower, cosine logits, nothing learned."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from alignednorm.methods.base import Method, MethodConfig, Outputs, register_method


@register_method("zeroshot")
class ZeroShotCLIP(Method):
    """Radford et al. 2021: ``logit_scale · f(x)ᵀ w_k`` with ``w_k`` from the class prompts."""

    @dataclass
    class Config(MethodConfig):
        """Zero-shot CLIP has no learnable settings.

        Attributes:
            text_batch: class prompts encoded per chunk, to bound memory with 1000 classes.
        """

        text_batch: int = 256

    def set_classnames(self, classnames: list[str], template: str = "a photo of a {}.") -> None:
        super().set_classnames(classnames, template)
        self.register_buffer("text_features", self.encode_prompts(self.prompts()), persistent=False)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Tensor:
        """L2-normalised frozen text features ``(C, E)``, encoded in chunks."""
        device = self.backbone.model.token_embedding.weight.device
        chunks = []
        for i in range(0, len(prompts), self.config.text_batch):
            ids = self.backbone.tokenize(prompts[i : i + self.config.text_batch]).to(device)
            chunks.append(self.backbone.encode_text(ids).features)
        return F.normalize(torch.cat(chunks), dim=-1)

    def forward(self, images: Tensor, subset: str = "all") -> Outputs:
        features = F.normalize(self.backbone.encode_image(images).features, dim=-1)
        scale = self.backbone.model.logit_scale.exp()
        return Outputs(logits=scale * features @ self.text_features.t(), features=features)
