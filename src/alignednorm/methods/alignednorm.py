"""AlignedNorm (ICML 2026): MMRL++ plus two norm-alignment losses, one inference rule for all.

The prompt branch's norms are pulled to the class token's (stop-gradient on the class side):
after the projection (L_proj, Eq. 10) and at every prompted block (L_token, Eq. 11). With the
norms aligned, the fused logits serve base and new classes alike (``inference = "unified"``).

Names and their sources:

| here                  | paper | released code          | meaning                                   |
|-----------------------|-------|------------------------|-------------------------------------------|
| ``proj_align_weight`` | β     | ``FINAL_NORM``         | weight of L_proj                          |
| ``token_align_weight``| γ     | ``SEQ_NORM``           | weight of L_token                         |
| ``prc_beta``          | —     | ``BETA`` (MMRL++)      | PRC mixing weight, unrelated to the β above |
| ``class_branch_weight``| 1 − α | ``ALPHA``             | weight of the class-token logits          |
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from alignednorm.backbone.hooks import Trace, Traces
from alignednorm.errors import ConfigError
from alignednorm.losses.norm_alignment import PROJ_FORMS, TOKEN_FORMS, proj_alignment, stack_layers, token_alignment
from alignednorm.methods.base import MethodTraits, check_range, register_method
from alignednorm.methods.mmrlpp import OFFICIAL_NAMES, MMRLpp

# Weight of the two quantities the released trainer logs but does not optimise.
LOGGED_ONLY_WEIGHT = 0.1


@register_method("alignednorm")
class AlignedNorm(MMRLpp):
    """MMRL++ + L_proj + L_token, evaluated with the unified (fused) rule."""

    traits = MethodTraits(official_names=OFFICIAL_NAMES, citation="""@inproceedings{alignednorm2026,
  title = {AlignedNorm: norm alignment for prompt learning with one inference rule for base and new classes},
  booktitle = {ICML}, year = {2026}, note = {see the paper's project page for the full author list}}""")


    @dataclass
    class Config(MMRLpp.Config):
        """AlignedNorm settings on top of MMRL++'s.

        Attributes:
            inference: ``unified`` (the method's point); ``decoupled`` for ablations.
            proj_align_weight: β, weight of L_proj (released code: FINAL_NORM).
            token_align_weight: γ, weight of L_token (released code: SEQ_NORM).
            proj_form: ``l1`` (paper and code), or the Table 10 ablations ``hinge``, ``smooth_l1``, ``ring``.
            proj_margin: dead zone of the ``hinge`` form.
            token_form: ``code`` (released trainer, the default: γ's published values assume it) or
                ``paper`` (Eq. 11 as printed: norm of the token mean, summed over layers).
        """

        inference: str = "unified"
        proj_align_weight: float = 0.1
        token_align_weight: float = 0.1
        proj_form: str = "l1"
        proj_margin: float = 0.0
        token_form: str = "code"

        def validate(self) -> None:
            super().validate()
            for name in ("proj_align_weight", "token_align_weight", "proj_margin"):
                check_range(self, name, 0.0)
            if self.proj_form not in PROJ_FORMS:
                raise ConfigError(f"proj_form = {self.proj_form!r}; expected one of {PROJ_FORMS}")
            if self.token_form not in TOKEN_FORMS:
                raise ConfigError(f"token_form = {self.token_form!r}; expected one of {TOKEN_FORMS}")

    def alignment_terms(self, outputs, trace: Trace) -> dict[str, Tensor]:
        """L_token and L_proj (optimised), and the two quantities the released code only logs."""
        cfg, b = self.config, outputs.branches
        layers, n, start = list(cfg.rep_layers), cfg.n_rep_tokens, trace.prompt_start
        cls_h, rep_h = stack_layers(trace.hidden, layers, start, n)
        terms = {
            "l_token": token_alignment(cls_h, rep_h, cfg.token_form),
            "l_proj": proj_alignment(b["z_p"], b["z_c"], cfg.proj_form, cfg.proj_margin),
        }
        with torch.no_grad():
            cls_a, rep_a = stack_layers(trace.attn_out, layers, start, n)
            terms["l_token_attn"] = token_alignment(cls_a, rep_a, "code")
            terms["l_proj_ln"] = proj_alignment(b["rep_ln_post_mean"], b["cls_ln_post"], "l1")
            terms["l_token_attn_logged"] = LOGGED_ONLY_WEIGHT * terms["l_token_attn"]
            terms["l_proj_ln_logged"] = LOGGED_ONLY_WEIGHT * terms["l_proj_ln"]
        return terms

    def compute_terms(self, images: Tensor, labels: Tensor, trace: Traces | None = None):
        trace = trace or Traces()
        image = trace.image = trace.image or Trace(layers=tuple(self.config.rep_layers))
        image.record_hidden = image.record_attn_out = True
        outputs = self(images, rule="seen", trace=trace)
        terms = self.task_terms(outputs, images, labels)
        terms.update(self.alignment_terms(outputs, image))
        cfg = self.config
        terms["l_token_weighted"] = cfg.token_align_weight * terms["l_token"]
        terms["l_proj_weighted"] = cfg.proj_align_weight * terms["l_proj"]
        # Summed in the released trainer's order, so float rounding matches too.
        terms["loss"] = (terms["task"] + terms["reg_img"] + terms["reg_text"]
                         + terms["l_token_weighted"] + terms["l_proj_weighted"])
        return terms, outputs
