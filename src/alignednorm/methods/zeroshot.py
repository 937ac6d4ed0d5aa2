"""Zero-shot CLIP: class prompts through the frozen text tower, cosine logits, nothing learned."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from alignednorm.backbone.hooks import Traces
from alignednorm.methods.base import Method, MethodConfig, MethodTraits, Outputs, register_method

CLIP_CITATION = """@inproceedings{radford2021clip,
  title = {Learning Transferable Visual Models From Natural Language Supervision},
  author = {Radford, Alec and Kim, Jong Wook and Hallacy, Chris and Ramesh, Aditya and Goh, Gabriel and
            Agarwal, Sandhini and Sastry, Girish and Askell, Amanda and Mishkin, Pamela and Clark, Jack and
            Krueger, Gretchen and Sutskever, Ilya},
  booktitle = {ICML}, year = {2021}}"""


@register_method("zeroshot")
class ZeroShotCLIP(Method):
    """Radford et al. 2021: ``logit_scale · f(x)ᵀ w_k``, ``w_k`` the (template-ensembled) class prompts.

    Works on ViT and ResNet CLIPs; every template of the label space joins the ensemble.
    """

    traits = MethodTraits(learns=False, frozen_image_features=True, citation=CLIP_CITATION)


    @dataclass
    class Config(MethodConfig):
        """Zero-shot CLIP has no settings."""

    def forward(self, images: Tensor, rule: str = "any", trace: Traces | None = None) -> Outputs:
        image_trace = trace.image if trace is not None else None
        features = F.normalize(self.backbone.encode_image(images, trace=image_trace).features, dim=-1)
        text = self.text_features(trace.text if trace is not None else None)
        return Outputs(logits=self.logit_scale * features @ text.t(), features=features,
                       branches={"text_features": text})

    def logits_from_image_features(self, features: Tensor, rule: str = "any") -> Tensor:
        return self.logit_scale * F.normalize(features, dim=-1) @ self.text_features().t()
