"""MaPLe (Khattak et al., CVPR 2023): multi-modal prompts, vision prompts coupled to text prompts.

Language branch: ``n_ctx`` learnable context vectors ``P_1`` in place of the first word embeddings
of ``"{ctx_init} {class}."`` (Eq. 2), plus fresh tokens ``P_l`` for blocks ``l = 2..J`` that replace
the previous block's outputs at those positions (Eq. 3–4). Vision branch: no free prompts; its
tokens at block ``l ≤ J`` are ``F_l(P_l)`` with a per-block linear coupling ``F_l: W_t → W_v``
(Eq. 5–7), appended after the patch tokens. Loss: cross-entropy of ``exp(logit_scale)`` × cosine.

Names (paper ↔ official ``trainers/maple.py`` ↔ here): ``P_1`` ↔ ``prompt_learner.ctx`` ↔
``text_prompts.1``; ``P_l`` ↔ ``compound_prompts_text[l-2]`` ↔ ``text_prompts.l``; ``F_1`` ↔
``prompt_learner.proj`` ↔ ``couplings.1``; ``F_l`` ↔ ``compound_prompt_projections[l-2]`` ↔
``couplings.l``; J ↔ ``PROMPT_DEPTH`` ↔ ``prompt_depth``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from alignednorm.backbone.hooks import Prefix, Trace, Traces
from alignednorm.errors import ConfigError
from alignednorm.methods.base import Method, MethodConfig, MethodTraits, Outputs, check_range, register_method
from alignednorm.methods.official_names import OfficialNames
from alignednorm.prompts.deep import (
    Coupling,
    PromptStack,
    appended_vision_hook,
    context_init,
    expand_tokens,
    splice_context,
    text_context_hook,
)
from alignednorm.prompts.label_space import LabelSpace

log = logging.getLogger(__name__)


@dataclass
class DeepPromptConfig(MethodConfig):
    """Settings every deep prompt method shares (official config keys in brackets).

    Attributes:
        ctx_init: words whose token embeddings initialise the text context; the prompt reads
            ``"{ctx_init} {class}."`` and words past the context length stay fixed tokens
            (CTX_INIT). Empty: random N(0, 0.02²) init and ``"X X .. X {class}."``.
        official_fp16_rounding: round the visual prompts and deep text prompts to float16 (forward)
            and their per-copy gradients (backward), as the official float32 path does
            (``prompts/deep.py``); on in the presets that reproduce the official numerics.
        unused_prompt_blocks: accept prompt depths past the backbone's blocks, as the official code
            does (MaPLe and HiCroPL build prompt sets that are never used, PromptSRC prompts every block
            there is). Off, such a depth is a configuration error; the parity harness turns it on for
            fixtures made on shallow CLIPs.
    """

    ctx_init: str = "a photo of a"
    official_fp16_rounding: bool = False
    unused_prompt_blocks: bool = False


class DeepPromptMethod(Method):
    """Shared machinery: ``"{prefix} {class}."`` prompts, their token embeddings, cosine logits."""

    prompt_prefix: str = ""

    def check_depth(self, name: str, blocks: int) -> None:
        """Refuse ``config.<name>`` past the ``blocks`` the backbone has (unless ``unused_prompt_blocks``)."""
        depth = getattr(self.config, name)
        if depth > blocks and not self.config.unused_prompt_blocks:
            raise ConfigError(f"{type(self).__name__}.Config.{name} = {depth}: the backbone has {blocks} blocks; "
                              f"expected at most {blocks}")

    def on_label_space(self, space: LabelSpace) -> None:
        names = [c.replace("_", " ") for c in space.classnames]
        ids = self.backbone.tokenize([f"{self.prompt_prefix} {name}." for name in names])
        device = self.backbone.token_embedding.weight.device
        self.register_buffer("token_ids", ids.to(device), persistent=False)
        with torch.no_grad():  # official token_prefix / token_suffix: frozen word embeddings
            self.register_buffer("token_embeds", self.backbone.token_embedding(self.token_ids), persistent=False)

    def text_prompts_input(self, ctx: Tensor) -> Tensor:
        """``(C, T, W_t)`` word embeddings with the context at positions ``1..n`` (official ``prompts``)."""
        return splice_context(self.token_embeds, ctx)

    def encode_prompted_text(self, ctx: Tensor, deep: dict[int, Tensor], trace: Trace | None) -> Tensor:
        """Prompted class embeddings ``(C, E)``, not normalised."""
        x = self.text_prompts_input(ctx) + self.backbone.text_positional_embedding
        rounding = self.config.official_fp16_rounding
        copies = {b: expand_tokens(t, x.shape[0], rounding) for b, t in deep.items()}
        out = self.backbone.encode_text(self.token_ids, hook=text_context_hook(copies), trace=trace, embeddings=x,
                                        embeddings_built_alike=True)  # one context for every class
        return out.features

    def encode_prompted_image(self, images: Tensor, first: Tensor, deep: dict[int, Tensor],
                              trace: Trace | None) -> Tensor:
        """Image features ``(B, E)``, not normalised, with vision prompts appended after the patches."""
        rounding, batch = self.config.official_fp16_rounding, images.shape[0]
        first = self.backbone.image_pre_norm(expand_tokens(first, batch, rounding))
        copies = {b: expand_tokens(t, batch, rounding) for b, t in deep.items()}
        x = self.backbone.embed_image(images)
        return self.backbone.encode_image(hook=appended_vision_hook(first, copies), trace=trace,
                                          prefix=Prefix(1, x)).features

    def cosine_outputs(self, image: Tensor, text: Tensor) -> Outputs:
        # x / ‖x‖ and a tensor scale, as the official forward (F.normalize differs in the last bit).
        f, w = image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)
        logits = self.backbone.logit_scale.exp() * f @ w.t()
        return Outputs(logits=logits, features=f, branches={
            "image_features_unnorm": image, "text_features_unnorm": text, "image_features": f, "text_features": w})


# Official names (muzairkhattak/multimodal-prompt-learning ``trainers/maple.py``): block indices shift,
# official ``compound_prompts_text[i]`` is our block i + 2.
OFFICIAL_NAMES = OfficialNames(
    rules=((r"prompt_learner\.ctx$", lambda m: "text_prompts.1"),
           (r"prompt_learner\.compound_prompts_text\.(\d+)$", lambda m: f"text_prompts.{int(m[1]) + 2}"),
           (r"prompt_learner\.proj\.(weight|bias)$", lambda m: f"couplings.1.{m[1]}"),
           (r"prompt_learner\.compound_prompt_projections\.(\d+)\.(weight|bias)$",
            lambda m: f"couplings.{int(m[1]) + 2}.{m[2]}")),
    example="prompt_learner.ctx")


@register_method("maple")
class MaPLe(DeepPromptMethod):
    """MaPLe: deep text prompts at blocks 1..J and linearly coupled vision prompts."""

    traits = MethodTraits(official_names=OFFICIAL_NAMES)

    @dataclass
    class Config(DeepPromptConfig):
        """MaPLe settings (official ``TRAINER.MAPLE`` keys in brackets).

        Attributes:
            n_ctx: prompt tokens per block in each tower (N_CTX).
            prompt_depth: J, the number of prompted blocks from the first (PROMPT_DEPTH; 1 is
                shallow MaPLe).
        """

        n_ctx: int = 2
        prompt_depth: int = 9

        def validate(self) -> None:
            check_range(self, "n_ctx", 1)
            check_range(self, "prompt_depth", 1)

    def __init__(self, backbone, config=None):
        super().__init__(backbone, config)
        backbone.require_vit(f"method {self.name!r}")
        cfg, bb = self.config, backbone
        blocks = list(range(1, cfg.prompt_depth + 1))
        layers = min(bb.text_layers, bb.vision_layers)
        self.check_depth("prompt_depth", layers)
        if cfg.prompt_depth > layers:
            # The official code builds all J - 1 deep sets; those past the last block are never used.
            log.warning("maple: prompt_depth %d exceeds the backbone's %d layers; prompt sets for blocks %d..%d are "
                        "never used", cfg.prompt_depth, layers, layers + 1, cfg.prompt_depth)
        self.text_prompts = PromptStack(blocks, cfg.n_ctx, bb.text_width)
        ctx, self.prompt_prefix = context_init(bb, cfg.ctx_init, cfg.n_ctx, bb.text_width)
        with torch.no_grad():
            self.text_prompts["1"].copy_(ctx)
        self.couplings = Coupling(blocks, bb.text_width, bb.vision_width, fp16_init=cfg.official_fp16_rounding)

    def vision_prompts(self) -> dict[int, Tensor]:
        """``{block: F_l(P_l)}`` ``(n, W_v)`` for every prompted block
        (official ``shared_ctx``, ``visual_deep_prompts``)."""
        return self.couplings({b: self.text_prompts[str(b)] for b in self.text_prompts.blocks()})

    def compute_text_features(self, trace: Trace | None = None) -> Tensor:
        return self.encode_prompted_text(self.text_prompts["1"], self.text_prompts.deep(), trace)

    def forward(self, images: Tensor, rule: str = "any", trace: Traces | None = None) -> Outputs:
        trace = trace or Traces()
        text = self.text_features(trace.text)
        vision = self.vision_prompts()
        deep = {b: t for b, t in vision.items() if b >= 2}
        image = self.encode_prompted_image(images, vision[1], deep, trace.image)
        return self.cosine_outputs(image, text)
