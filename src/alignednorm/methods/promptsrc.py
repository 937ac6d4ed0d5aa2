"""PromptSRC (Khattak et al., ICCV 2023): self-regulating independent deep prompts (IVLP).

Prompts: ``n_ctx_text`` text tokens (block 1: in place of the first word embeddings of
``"{ctx_init} {class}."``) and ``n_ctx_vision`` visual tokens appended after the patches, plus
fresh tokens for every block ``2..depth`` of each tower that replace the previous block's
outputs there; the towers are not coupled. Training adds to the cross-entropy the
mutual-agreement terms of ``losses/self_regularization.py`` (Eq. 3–6, against frozen CLIP with
the template ensemble for textual diversity) and, after training, replaces the prompts by their
Gaussian-weighted average over epochs (GPA, Eq. 7; ``prompts/deep.py``).

Names (paper ↔ official ``trainers/promptsrc.py`` / ``clip/model.py`` ↔ here): text prompts ↔
``prompt_learner.ctx`` / ``text_encoder…resblocks[l-1].VPT_shallow`` ↔ ``text_prompts.l``;
visual prompts ↔ ``image_encoder.VPT`` / ``image_encoder…resblocks[l-1].VPT_shallow`` ↔
``vision_prompts.l``; λ1, λ2 ↔ ``TEXT_LOSS_WEIGHT``, ``IMAGE_LOSS_WEIGHT`` ↔ ``text_loss_weight``,
``image_loss_weight``; GPA μ, σ ↔ ``GPA_MEAN``, ``GPA_STD`` ↔ ``gpa_mean``, ``gpa_std``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from alignednorm.backbone.hooks import Traces
from alignednorm.errors import ConfigError
from alignednorm.losses.self_regularization import mutual_agreement, template_mean_text_features
from alignednorm.methods.base import MethodTraits, Outputs, StepState, check_range, register_method
from alignednorm.methods.maple import DeepPromptConfig, DeepPromptMethod
from alignednorm.methods.official_names import OfficialNames
from alignednorm.prompts.deep import GaussianPromptAverage, PromptStack, context_init, round_fp16
from alignednorm.prompts.templates import TEMPLATE_SETS

log = logging.getLogger(__name__)
TEACHER_TEMPLATES = (*TEMPLATE_SETS, "label_space")
_GPA_PREFIX = "gpa_sum."


# Official names (muhammad-maaz/PromptSRC ``trainers/promptsrc.py``): per-block ``VPT_shallow`` of block
# index i (0-based) is our block i + 1.
OFFICIAL_NAMES = OfficialNames(
    rules=((r"prompt_learner\.ctx$", lambda m: "text_prompts.1"),
           (r"image_encoder\.VPT$", lambda m: "vision_prompts.1"),
           (r"text_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow$", lambda m: f"text_prompts.{int(m[1]) + 1}"),
           (r"image_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow$",
            lambda m: f"vision_prompts.{int(m[1]) + 1}")),
    example="prompt_learner.ctx")


@register_method("promptsrc")
class PromptSRC(DeepPromptMethod):
    """IVLP deep prompts in both towers, self-regularised towards frozen CLIP, GPA over epochs."""

    traits = MethodTraits(official_names=OFFICIAL_NAMES)

    @dataclass
    class Config(DeepPromptConfig):
        """PromptSRC settings (official ``TRAINER.PROMPTSRC`` keys in brackets).

        Attributes:
            n_ctx_text: text prompt tokens per block (N_CTX_TEXT).
            n_ctx_vision: visual prompt tokens per block (N_CTX_VISION).
            text_depth: prompted text blocks from the first (PROMPT_DEPTH_TEXT).
            vision_depth: prompted vision blocks from the first (PROMPT_DEPTH_VISION).
            text_loss_weight: λ1 of the text L1 term (TEXT_LOSS_WEIGHT).
            image_loss_weight: λ2 of the image L1 term (IMAGE_LOSS_WEIGHT).
            gpa: average the prompts over epochs with Gaussian weights after training.
            gpa_mean: μ of the epoch weights, 1-based epochs (GPA_MEAN).
            gpa_std: σ of the epoch weights (GPA_STD).
            teacher_templates: templates of the frozen text teacher: ``imagenet`` (the 60 templates
                of the official code, for every dataset) or ``label_space`` (the label space's).
        """

        n_ctx_text: int = 4
        n_ctx_vision: int = 4
        text_depth: int = 9
        vision_depth: int = 9
        text_loss_weight: float = 25.0
        image_loss_weight: float = 10.0
        gpa: bool = True
        gpa_mean: float = 15.0
        gpa_std: float = 1.0
        teacher_templates: str = "imagenet"

        def validate(self) -> None:
            for name in ("n_ctx_text", "n_ctx_vision", "text_depth", "vision_depth"):
                check_range(self, name, 1)
            for name in ("text_loss_weight", "image_loss_weight"):
                check_range(self, name, 0.0)
            if self.gpa_std <= 0:
                raise ConfigError(f"PromptSRC.Config.gpa_std = {self.gpa_std!r}; expected a value > 0")
            if self.teacher_templates not in TEACHER_TEMPLATES:
                raise ConfigError(f"PromptSRC.Config.teacher_templates = {self.teacher_templates!r}; expected one "
                                  f"of {TEACHER_TEMPLATES}")

    def __init__(self, backbone, config=None):
        super().__init__(backbone, config)
        backbone.require_vit(f"method {self.name!r}")
        cfg, bb = self.config, backbone
        self.check_depth("text_depth", bb.text_layers)
        self.check_depth("vision_depth", bb.vision_layers)
        # As the official IVLP blocks (with unused_prompt_blocks): prompts only for blocks that exist.
        text_blocks = list(range(1, min(cfg.text_depth, bb.text_layers) + 1))
        vision_blocks = list(range(1, min(cfg.vision_depth, bb.vision_layers) + 1))
        self.text_prompts = PromptStack(text_blocks, cfg.n_ctx_text, bb.text_width)
        self.vision_prompts = PromptStack(vision_blocks, cfg.n_ctx_vision, bb.vision_width)
        ctx, self.prompt_prefix = context_init(bb, cfg.ctx_init, cfg.n_ctx_text, bb.text_width)
        with torch.no_grad():
            self.text_prompts["1"].copy_(ctx)
        self.averager = GaussianPromptAverage(cfg.gpa_mean, cfg.gpa_std)
        self._teacher: tuple[object, Tensor] | None = None

    # ------------------------------------------------------------------ forward
    def compute_text_features(self, trace=None) -> Tensor:
        return self.encode_prompted_text(self.text_prompts["1"], self.text_prompts.deep(), trace)

    def forward(self, images: Tensor, rule: str = "any", trace: Traces | None = None) -> Outputs:
        trace = trace or Traces()
        text = self.text_features(trace.text)
        image = self.encode_prompted_image(images, self.vision_prompts["1"], self.vision_prompts.deep(), trace.image)
        return self.cosine_outputs(image, text)

    # ------------------------------------------------------------------ teacher
    def teacher_templates(self) -> tuple[str, ...]:
        name = self.config.teacher_templates
        return self._require_label_space().templates if name == "label_space" else TEMPLATE_SETS[name]

    def teacher_text_features(self) -> Tensor:
        """Frozen CLIP's template-mean class embeddings ``(C, E)``, unnormalised (official ``fixed_embeddings``)."""
        key = (self._require_label_space(), self.teacher_templates())
        if self._teacher is None or self._teacher[0] != key:
            mean, _ = template_mean_text_features(self.backbone, key[0].classnames, key[1])
            self._teacher = (key, mean)
        return self._teacher[1]

    def teacher_outputs(self, images: Tensor) -> dict[str, Tensor]:
        """Frozen image features ``(B, E)``, class embeddings ``(C, E)`` (normalised) and zero-shot logits."""
        fixed = F.normalize(self.teacher_text_features(), dim=-1)
        with torch.no_grad():
            image = F.normalize(self.backbone.encode_image(images).features, dim=-1)
            classifier = round_fp16(fixed) if self.config.official_fp16_rounding else fixed  # official .half()
            logits = self.logit_scale * image @ classifier.t()
        return {"frozen_image": image, "frozen_text": fixed, "zero_shot_logits": logits}

    # ------------------------------------------------------------------ loss
    def compute_terms(self, images: Tensor, labels: Tensor, trace: Traces | None = None
                      ) -> tuple[dict[str, Tensor], Outputs, dict[str, Tensor]]:
        """Loss terms, the prompted outputs and the teacher's outputs (traces filled when given)."""
        outputs = self(images, rule="seen", trace=trace)
        teacher = self.teacher_outputs(images)
        b, cfg = outputs.branches, self.config
        terms = {"ce": F.cross_entropy(outputs.logits, labels)}
        terms.update(mutual_agreement(b["text_features"], teacher["frozen_text"], b["image_features"],
                                      teacher["frozen_image"], outputs.logits, teacher["zero_shot_logits"],
                                      cfg.text_loss_weight, cfg.image_loss_weight))
        terms["loss"] = terms["ce"] + terms["scl"]
        return terms, outputs, teacher

    def training_step(self, batch: tuple[Tensor, Tensor], state: StepState | None = None) -> dict[str, Tensor]:
        return self.compute_terms(*batch)[0]

    # ------------------------------------------------------------------ GPA
    def on_epoch_end(self, state: StepState) -> None:
        """Add this epoch's prompts with weight ``w_e``; after the last epoch, load the average."""
        if not self.config.gpa:
            return
        if state.epoch > 0 and not self.averager.sums:
            log.warning("promptsrc: GPA sum missing at epoch %d (resumed from a checkpoint without it); the "
                        "average covers the epochs from here on", state.epoch + 1)
        params = {n: p for n, p in self.named_parameters() if p.requires_grad}
        if self.averager.update(params, state.epoch, state.max_epochs):
            sums = self.averager.pop()
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(sums[name])
            self.invalidate_text_cache()

    def learnable_state_dict(self) -> dict[str, Tensor]:
        """The prompts, plus the running GPA sums while training is between epochs (for resuming)."""
        state = super().learnable_state_dict()
        state.update({_GPA_PREFIX + k: v.clone() for k, v in self.averager.sums.items()})
        return state

    def load_learnable_state_dict(self, state: dict[str, Tensor], source: str = "checkpoint") -> None:
        sums = {k.removeprefix(_GPA_PREFIX): v for k, v in state.items() if k.startswith(_GPA_PREFIX)}
        super().load_learnable_state_dict({k: v for k, v in state.items() if not k.startswith(_GPA_PREFIX)}, source)
        self.averager.sums = {k: v.clone() for k, v in sums.items()}
