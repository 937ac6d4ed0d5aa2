"""CoOp (Zhou et al., IJCV 2022): learnable context vectors in place of a hand-written prompt.

``p(y = k | x) ∝ exp(τ⁻¹ cos(f(x), g(t_k)))`` with ``t_k = [SOS][v]_1 … [v]_M [CLASS_k][.][EOS]``
(Eq. 2–3; τ⁻¹ = CLIP's ``exp(logit_scale)``), trained with cross-entropy; both encoders frozen, only
the context learns. The context and its per-class buffers are :class:`~alignednorm.prompts.text_context.TextContext`.

Names (paper ↔ official ``TRAINER.COOP`` ↔ here): M ↔ ``N_CTX`` ↔ ``n_ctx``; the init words ↔
``CTX_INIT`` ↔ ``ctx_init``; class-specific context ↔ ``CSC`` ↔ ``class_specific``;
``CLASS_TOKEN_POSITION`` ↔ ``class_token_position``; ``prompt_learner.ctx`` ↔ ``context.ctx``.
Only the text tower is prompted, so ResNet CLIPs (RN50, the paper's backbone) work too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from alignednorm.backbone.hooks import Trace, Traces
from alignednorm.errors import ConfigError
from alignednorm.losses.nemesis import logged_position_norms
from alignednorm.methods.base import (
    Method,
    MethodConfig,
    MethodTraits,
    Outputs,
    StepState,
    check_range,
    register_method,
)
from alignednorm.methods.official_names import OfficialNames
from alignednorm.prompts.label_space import LabelSpace
from alignednorm.prompts.text_context import POSITIONS, TextContext

# Official CoOp / Nemesis names (KaiyangZhou/CoOp, ShyFoo/Nemesis): only the context learns. Dassl saves the
# prompt learner alone (``prompt_learner/model.pth.tar-N``: ``ctx``, ``token_prefix``, ``token_suffix``); a
# whole-model state dict names it ``prompt_learner.ctx``. The token buffers are rebuilt from the class names.
OFFICIAL_NAMES = OfficialNames(rules=((r"(?:prompt_learner\.)?ctx$", "context.ctx"),), example="prompt_learner.ctx")


@register_method("coop")
class CoOp(Method):
    """CoOp: a unified or class-specific learnable text context, cross-entropy on cosine logits.

    ``class_specific`` follows the config: a per-class context only serves the class list it was
    trained on (other lists are refused with a :class:`~alignednorm.errors.CheckpointError`).
    """

    traits = MethodTraits(official_names=OFFICIAL_NAMES, citation="""@article{zhou2022coop,
  title = {Learning to Prompt for Vision-Language Models},
  author = {Zhou, Kaiyang and Yang, Jingkang and Loy, Chen Change and Liu, Ziwei},
  journal = {International Journal of Computer Vision}, year = {2022}}""")


    @dataclass
    class Config(MethodConfig):
        """CoOp settings (official ``TRAINER.COOP`` keys in brackets).

        Attributes:
            n_ctx: context vectors M with random init (N_CTX); with ``ctx_init`` the phrase's token
                count is used instead, as the official code does.
            ctx_init: words initialising the context, e.g. ``"a photo of a"`` (CTX_INIT); empty:
                N(0, 0.02²) vectors and ``"X X … X {class}."`` prompts.
            class_specific: one context per class (CSC) instead of one shared by all classes.
            class_token_position: where the class tokens go: ``end``, ``middle`` or ``front``
                (CLASS_TOKEN_POSITION).
        """

        n_ctx: int = 16
        ctx_init: str = ""
        class_specific: bool = False
        class_token_position: str = "end"

        def validate(self) -> None:
            check_range(self, "n_ctx", 1)
            if self.class_token_position not in POSITIONS:
                raise ConfigError(f"class_token_position = {self.class_token_position!r}; expected one of {POSITIONS}")

    def __init__(self, backbone, config=None):
        super().__init__(backbone, config)
        cfg = self.config
        # Per instance: the class's traits say unified, the config may ask for a class-specific context.
        self.traits = dataclasses.replace(type(self).traits, class_specific=cfg.class_specific)
        self.context = TextContext(backbone, cfg.n_ctx, cfg.ctx_init, cfg.class_specific, cfg.class_token_position)

    # ------------------------------------------------------------------ classes and state
    def on_label_space(self, space: LabelSpace) -> None:
        if self.traits.class_specific:
            self.check_classnames(list(space.classnames), "any")
        self.context.set_classnames(self.backbone, space.classnames)

    def load_learnable_state_dict(self, state: dict[str, Tensor], source: str = "checkpoint") -> None:
        if "context.ctx" in state:  # a class-specific context takes its class count from the checkpoint
            self.context.load_shape(state["context.ctx"])
        super().load_learnable_state_dict(state, source)

    # ------------------------------------------------------------------ forward
    def encode_prompts(self, embeddings: Tensor, token_ids: Tensor, trace: Trace | None = None,
                       built_alike: bool | None = None) -> Tensor:
        """Text features ``(N, E)`` (not normalised) of prompt embeddings ``(N, T, W)`` (no positional yet).

        ``built_alike``: rows equal at their start come from one context (default: unless class-specific),
        so the backbone may run that start once; pass False when rows are separate variables.
        """
        x = embeddings + self.backbone.text_positional_embedding.to(embeddings.dtype)
        alike = not self.traits.class_specific if built_alike is None else built_alike
        return self.backbone.encode_text(token_ids, embeddings=x, trace=trace, embeddings_built_alike=alike).features

    def compute_text_features(self, trace: Trace | None = None) -> Tensor:
        embeddings, token_ids = self.context()
        return self.encode_prompts(embeddings, token_ids, trace)

    def cosine_logits(self, image: Tensor, text: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``exp(logit_scale) · f wᵀ`` with ``x / ‖x‖`` as the official forward; returns (logits, f, w)."""
        f, w = image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)
        return self.logit_scale * f @ w.t(), f, w

    def forward(self, images: Tensor, rule: str = "any", trace: Traces | None = None) -> Outputs:
        trace = trace or Traces()
        image = self.backbone.encode_image(images, trace=trace.image).features
        return self.outputs_from(image, self.text_features(trace.text))

    def outputs_from(self, image: Tensor, text: Tensor) -> Outputs:
        """Outputs from unnormalised image ``(B, E)`` and text ``(C, E)`` features."""
        logits, f, w = self.cosine_logits(image, text)
        return Outputs(logits=logits, features=f, branches={
            "image_features_unnorm": image, "text_features_unnorm": text, "image_features": f, "text_features": w})

    # ------------------------------------------------------------------ loss
    def norm_terms(self, norm: str = "l2") -> dict[str, Tensor]:
        """Per-position context norms (class mean for CSC) as named terms, logged every step and epoch."""
        norms = logged_position_norms(self.context.ctx, norm)
        return {f"ctx_norm_{j}": norms[j] for j in range(norms.shape[0])}

    def ce_terms(self, outputs: Outputs, labels: Tensor) -> dict[str, Tensor]:
        ce = F.cross_entropy(outputs.logits, labels)
        acc = (outputs.logits.argmax(dim=-1) == labels).float().mean() * 100
        return {"loss": ce, "ce": ce.detach(), "acc": acc.detach()}

    def training_step(self, batch: tuple[Tensor, Tensor], state: StepState | None = None) -> dict[str, Tensor]:
        images, labels = batch
        terms = self.ce_terms(self(images, rule="seen"), labels)
        with torch.no_grad():
            terms.update(self.norm_terms())
        return terms
