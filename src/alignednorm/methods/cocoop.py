"""CoCoOp (Zhou et al., CVPR 2022): CoOp's context shifted per image by a meta-net (conditional prompts).

A lightweight meta-net ``h`` (Linear ``E → E/16``, ReLU, Linear ``E/16 → W``) maps the L2-normalised
frozen image feature to a bias ``π(x)`` added to every context token: ``v_m(x) = v_m + π(x)``; each
image gets its own ``C`` prompts, so the text tower runs on ``B × C`` sequences per batch (why the
official batch is 1). Logits: ``exp(logit_scale) · cos(f(x), g(t_k(x)))``; cross-entropy. The context
(unified, class tokens at the end) and the meta-net learn; both encoders are frozen.

Names (paper ↔ official ``trainers/cocoop.py`` ↔ here): meta-net ↔ ``prompt_learner.meta_net``
(``linear1``/``linear2``) ↔ ``meta_net.0`` / ``meta_net.2``; ``ctx`` ↔ ``prompt_learner.ctx`` ↔
``context.ctx``. Only the text tower is prompted, so ResNet CLIPs work too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alignednorm.backbone.hooks import Trace, Traces
from alignednorm.errors import ConfigError
from alignednorm.methods.base import MethodTraits, Outputs, check_range, register_method
from alignednorm.methods.coop import CoOp
from alignednorm.methods.official_names import OfficialNames
from alignednorm.prompts.text_context import TextContext

# Official names (KaiyangZhou/CoOp ``trainers/cocoop.py``): the context plus the meta-net ``linear1`` /
# ``linear2``, our ``meta_net.0`` / ``meta_net.2`` (a ReLU sits between them).
OFFICIAL_NAMES = OfficialNames(
    rules=(*CoOp.traits.official_names.rules,
           (r"(?:prompt_learner\.)?meta_net\.linear([12])\.(weight|bias)$",
            lambda m: f"meta_net.{2 * int(m[1]) - 2}.{m[2]}")),
    example="prompt_learner.meta_net.linear1.weight")


@register_method("cocoop")
class CoCoOp(CoOp):
    """CoCoOp: a unified context plus an image-conditioned shift from a two-layer meta-net."""

    traits = MethodTraits(official_names=OFFICIAL_NAMES, citation="""@inproceedings{zhou2022cocoop,
  title = {Conditional Prompt Learning for Vision-Language Models},
  author = {Zhou, Kaiyang and Yang, Jingkang and Loy, Chen Change and Liu, Ziwei},
  booktitle = {CVPR}, year = {2022}}""")


    @dataclass
    class Config(CoOp.Config):
        """CoCoOp settings (official ``TRAINER.COCOOP`` keys in brackets).

        Attributes:
            n_ctx: context vectors with random init (N_CTX); the preset initialises 4 from ``ctx_init``.
            ctx_init: words initialising the context (CTX_INIT), ``"a photo of a"`` officially.
            meta_ratio: the meta-net's hidden width is ``embed_dim // meta_ratio`` (16: 512 → 32 → 512).
            class_specific, class_token_position: fixed by CoCoOp (unified context, class at the end).
        """

        n_ctx: int = 4
        ctx_init: str = "a photo of a"
        meta_ratio: int = 16

        def validate(self) -> None:
            super().validate()
            check_range(self, "meta_ratio", 1)
            if self.class_specific or self.class_token_position != "end":
                raise ConfigError("CoCoOp uses a unified context with the class token at the end "
                                  f"(class_specific = {self.class_specific}, "
                                  f"class_token_position = {self.class_token_position!r})")

    def __init__(self, backbone, config=None):
        super().__init__(backbone, config)
        embed, hidden = backbone.embed_dim, max(1, backbone.embed_dim // self.config.meta_ratio)
        self.meta_net = nn.Sequential(nn.Linear(embed, hidden), nn.ReLU(inplace=True),
                                      nn.Linear(hidden, self.context.width))
        self.meta_net.to(self.context.ctx.device)

    def conditional_text_features(self, f: Tensor, trace: Trace | None = None) -> Tensor:
        """Per-image class embeddings ``(B, C, E)`` (not normalised) from normalised image features ``(B, E)``.

        ``trace`` records the text tower over the ``B·C`` prompts, image by image.
        """
        context: TextContext = self.context
        bias = self.meta_net(f)  # (B, W): π(x), the same shift for every context token
        ctx = context.ctx.unsqueeze(0) + bias.unsqueeze(1)  # (B, L, W)
        prompts = torch.cat([context.embeddings(ctx[i]) for i in range(f.shape[0])])  # (B·C, T, W)
        ids = context.token_ids.repeat(f.shape[0], 1)  # (B·C, T)
        return self.encode_prompts(prompts, ids, trace).view(f.shape[0], len(context.classnames), -1)

    def forward(self, images: Tensor, rule: str = "any", trace: Traces | None = None) -> Outputs:
        trace = trace or Traces()
        image = self.backbone.encode_image(images, trace=trace.image).features
        f = F.normalize(image, dim=-1)
        text = self.conditional_text_features(f, trace.text)  # (B, C, E)
        w = F.normalize(text, dim=-1)
        logits = self.logit_scale * (f.unsqueeze(1) * w).sum(dim=-1)  # (B, C)
        return Outputs(logits=logits, features=f,
                       branches={"image_features_unnorm": image, "text_features_unnorm": text, "text_features": w})

