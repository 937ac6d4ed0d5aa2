"""MMRL++ (Guo & Gu, 2025): a shared representation space mapped into both towers from layer J.

Exactly as the official code computes it (specs/mmrlpp.md §1–3): shared tokens R, one
shared-residual aligner per tower, insertion after the first token at layer J and progressive
mixing (weight ``prc_beta``) at later layers, a class branch through CLIP's frozen projection
and a representation branch (``ln_post`` per token → mean → ``proj + A B``; on EVA-CLIP ``ln_post`` is
the trunk's final norm and ``proj`` its linear head, bias included).

Names: ``class_branch_weight`` is the code's ``ALPHA`` (weight of the class-token logits; the
AlignedNorm paper's α is ``1 − class_branch_weight``); ``prc_beta`` is the code's ``BETA``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alignednorm.backbone.hooks import Prefix, Trace, Traces
from alignednorm.errors import ConfigError
from alignednorm.losses.anchoring import cosine_anchor
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
from alignednorm.prompts.representation import ResidualAligner, representation_hook

INFERENCE_RULES = ("decoupled", "unified")

# Official MMRL / MMRL++ / AlignedNorm names (yunncheng/MMRL ``trainers/mmrl*.py``; Dassl saves the whole
# CustomCLIP): the representation learner and the representation branch's low-rank projection.
OFFICIAL_NAMES = OfficialNames(
    rules=(
        (r"representation_learner\.compound_rep_tokens$", "rep_tokens"),
        (r"representation_learner\.srra_r2vproj\.weight$", "vision_aligner.weight"),
        (r"representation_learner\.srra_r2tproj\.weight$", "text_aligner.weight"),
        (r"representation_learner\.srra_r2vproj\.srra\.(\d+)\.(A|B|bias)$", r"vision_aligner.\2.\1"),
        (r"representation_learner\.srra_r2tproj\.srra\.(\d+)\.(A|B|bias)$", r"text_aligner.\2.\1"),
        (r"representation_learner\.compound_rep_tokens_r2vproj\.(\d+)\.(weight|bias)$", r"vision_aligner.layers.\1.\2"),
        (r"representation_learner\.compound_rep_tokens_r2tproj\.(\d+)\.(weight|bias)$", r"text_aligner.layers.\1.\2"),
        (r"image_encoder\.A$", "proj_A"),
        (r"image_encoder\.B$", "proj_B"),
        (r"image_encoder\.proj_rep$", "proj_rep"),
    ),
    example="representation_learner.compound_rep_tokens",
    reverse=(
        (r"rep_tokens$", "representation_learner.compound_rep_tokens"),
        (r"vision_aligner\.weight$", "representation_learner.srra_r2vproj.weight"),
        (r"text_aligner\.weight$", "representation_learner.srra_r2tproj.weight"),
        (r"vision_aligner\.(A|B|bias)\.(\d+)$", r"representation_learner.srra_r2vproj.srra.\2.\1"),
        (r"text_aligner\.(A|B|bias)\.(\d+)$", r"representation_learner.srra_r2tproj.srra.\2.\1"),
        (r"vision_aligner\.layers\.(\d+)\.(weight|bias)$", r"representation_learner.compound_rep_tokens_r2vproj.\1.\2"),
        (r"text_aligner\.layers\.(\d+)\.(weight|bias)$", r"representation_learner.compound_rep_tokens_r2tproj.\1.\2"),
        (r"proj_A$", "image_encoder.A"),
        (r"proj_B$", "image_encoder.B"),
        (r"proj_rep$", "image_encoder.proj_rep"),
    ),
)



@dataclass
class RepresentationConfig(MethodConfig):
    """Settings MMRL and MMRL++ share (official config keys in brackets).

    Attributes:
        n_rep_tokens: representation tokens n (N_REP_TOKENS).
        rep_layers: 1-based blocks whose input carries the tokens, ascending (REP_LAYERS).
        rep_dim: width r of the shared representation space (REP_DIM).
        class_branch_weight: weight of the class-token branch in the fused logits and in the
            cross-entropy (ALPHA; the AlignedNorm paper's α is 1 − this).
        reg_weight: weight λ of both cosine anchors to frozen CLIP (REG_WEIGHT).
        inference: ``decoupled`` (seen classes: fused logits; unseen or mixed: class branch, as the
            official code) or ``unified`` (fused logits for every sample).
        logit_scale: the constant the official code multiplies cosines by (100, which is OpenAI
            CLIP's learned scale); ``None`` uses the backbone's own ``exp(logit_scale)``, right for
            CLIPs trained with another temperature (the mini benchmark's).
    """

    n_rep_tokens: int = 5
    rep_layers: list[int] = field(default_factory=lambda: list(range(6, 13)))
    rep_dim: int = 512
    class_branch_weight: float = 0.7
    reg_weight: float = 1.0
    inference: str = "decoupled"
    logit_scale: float | None = 100.0

    def validate(self) -> None:
        for name in ("n_rep_tokens", "rep_dim"):
            check_range(self, name, 1)
        check_range(self, "class_branch_weight", 0.0, 1.0)
        check_range(self, "reg_weight", 0.0)
        layers = list(self.rep_layers)
        if not layers or layers != list(range(layers[0], layers[0] + len(layers))) or layers[0] < 1:
            raise ConfigError(f"rep_layers = {layers}; expected ascending consecutive 1-based layers")
        if self.inference not in INFERENCE_RULES:
            raise ConfigError(f"inference = {self.inference!r}; expected one of {INFERENCE_RULES}")


@register_method("mmrlpp")
class MMRLpp(Method):
    """MMRL++ with the decoupled (official) or unified inference rule."""

    traits = MethodTraits(official_names=OFFICIAL_NAMES, citation="""@article{guo2025mmrlpp,
  title = {MMRL++: Parameter-Efficient and Interaction-Aware Representation Learning for Vision-Language Models},
  author = {Guo, Yuncheng and Gu, Xiaodong}, journal = {arXiv preprint}, year = {2025}}""")


    @dataclass
    class Config(RepresentationConfig):
        """MMRL++ settings: MMRL's plus the shared-residual aligner and progressive mixing.

        Attributes:
            res_lora_dim: rank of each layer's aligner residual (RES_LORA_DIM).
            proj_lora_dim: rank of the representation branch's projection adapter (PROJ_LORA_DIM).
            prc_beta: weight of the freshly mapped tokens when mixing at layers after J (BETA).
        """

        res_lora_dim: int = 4
        proj_lora_dim: int = 64
        prc_beta: float = 0.9

        def validate(self) -> None:
            super().validate()
            for name in ("res_lora_dim", "proj_lora_dim"):
                check_range(self, name, 1)
            check_range(self, "prc_beta", 0.0, 1.0)

    def __init__(self, backbone, config=None):
        super().__init__(backbone, config)
        backbone.require_vit(f"method {self.name!r}")
        cfg = self.config
        depth = min(backbone.vision_layers, backbone.text_layers)
        if max(cfg.rep_layers) > depth:
            raise ConfigError(f"rep_layers = {list(cfg.rep_layers)} goes past the backbone's {depth} layers")
        self.rep_tokens = nn.Parameter(torch.randn(cfg.n_rep_tokens, cfg.rep_dim) * 0.02)
        self.build_aligners()
        self.build_rep_projection()

    # ------------------------------------------------------------------ modules
    def build_aligners(self) -> None:
        cfg, bb = self.config, self.backbone
        self.vision_aligner = ResidualAligner(len(cfg.rep_layers), cfg.rep_dim, bb.vision_width, cfg.res_lora_dim)
        self.text_aligner = ResidualAligner(len(cfg.rep_layers), cfg.rep_dim, bb.text_width, cfg.res_lora_dim)

    def build_rep_projection(self) -> None:
        """``proj + A B``: a low-rank adapter on CLIP's frozen projection, ``B`` starting at zero."""
        q = self.config.proj_lora_dim
        self.proj_A = nn.Parameter(torch.empty(self.backbone.vision_width, q))
        nn.init.kaiming_uniform_(self.proj_A, a=math.sqrt(5))
        self.proj_B = nn.Parameter(torch.zeros(q, self.backbone.embed_dim))

    def project_rep(self, pooled: Tensor) -> Tensor:
        """``z_p``: pooled representation tokens ``(B, W)`` through ``proj + A B`` (EVA's head also adds its bias)."""
        return self.backbone.project_image(pooled, self.proj_A @ self.proj_B)

    @property
    def logit_scale(self) -> float:
        if self.config.logit_scale is None:
            return super().logit_scale
        return self.config.logit_scale

    @property
    def first_layer(self) -> int:
        """J: the first block whose input carries representation tokens."""
        return self.config.rep_layers[0]

    @property
    def prc_beta(self) -> float:
        return self.config.prc_beta

    # ------------------------------------------------------------------ class names
    def on_label_space(self, space: LabelSpace) -> None:
        ids = self.backbone.tokenize(space.prompts()).to(self.rep_tokens.device)
        self.register_buffer("token_ids", ids, persistent=False)
        with torch.no_grad():  # blocks before J see no prompts: their output for these prompts never changes
            prefix = self.backbone.text_prefix(ids, self.first_layer).states
        self.register_buffer("text_prefix", prefix, persistent=False)

    # ------------------------------------------------------------------ forward
    def mapped_tokens(self) -> tuple[Tensor, Tensor]:
        """Vision ``(K, n, W_v)`` and text ``(K, n, W_t)`` tokens for every prompted layer."""
        return self.vision_aligner(self.rep_tokens), self.text_aligner(self.rep_tokens)

    def compute_text_features(self, trace: Trace | None = None) -> Tensor:
        """Prompted text features ``(C, E)``, not normalised (a full pass when traced)."""
        hook = representation_hook(self.text_aligner(self.rep_tokens), list(self.config.rep_layers), self.prc_beta)
        prefix = None if trace is not None else Prefix(self.first_layer, self.text_prefix)
        return self.backbone.encode_text(self.token_ids, hook=hook, trace=trace, prefix=prefix).features

    def image_branches(self, images: Tensor, vision_tokens: Tensor, trace: Trace | None = None) -> dict[str, Tensor]:
        """``z_c`` and ``z_p`` ``(B, E)`` before normalisation, plus the ``ln_post`` inputs to them."""
        hook = representation_hook(vision_tokens, list(self.config.rep_layers), self.prc_beta)
        with torch.no_grad():  # nothing learnable acts before J
            prefix = self.backbone.image_prefix(images, self.first_layer, trace)
        out = self.backbone.encode_image(hook=hook, trace=trace, prefix=prefix)
        n, start = self.config.n_rep_tokens, out.prompt_start
        rep_ln_mean = out.tokens[:, start : start + n].mean(dim=1)  # ln_post per token, then mean
        return {
            "z_c": out.features,
            "z_p": self.project_rep(rep_ln_mean),
            "cls_ln_post": out.tokens[:, 0],
            "rep_ln_post_mean": rep_ln_mean,
            "image_prefix": prefix.states,
        }

    def forward(self, images: Tensor, rule: str = "any", trace: Traces | None = None) -> Outputs:
        trace = trace or Traces()
        text = self.text_features(trace.text)
        branches = self.image_branches(images, self.vision_aligner(self.rep_tokens), trace.image)
        f_c, f_p = (F.normalize(branches["z_c"], dim=-1), F.normalize(branches["z_p"], dim=-1))
        w = F.normalize(text, dim=-1)
        scale, alpha = self.logit_scale, self.config.class_branch_weight
        logits_cls, logits_rep = scale * f_c @ w.t(), scale * f_p @ w.t()
        logits_fusion = alpha * logits_cls + (1 - alpha) * logits_rep
        branches.update(f_c=f_c, f_p=f_p, text_features=w, text_features_unnorm=text, logits_cls=logits_cls,
                        logits_rep=logits_rep, logits_fusion=logits_fusion)
        return Outputs(logits=self.select_logits(branches, rule), features=f_c, branches=branches)

    def select_logits(self, branches: dict[str, Tensor], rule: str) -> Tensor:
        """Decoupled: fused logits for seen classes, class branch otherwise; unified: fused always."""
        if self.config.inference == "unified" or rule == "seen":
            return branches["logits_fusion"]
        return branches["logits_cls"]

    # ------------------------------------------------------------------ loss
    def task_terms(self, outputs: Outputs, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """MMRL++'s loss: weighted CE of both branches + λ·(image and text cosine anchors)."""
        b, alpha, lam = outputs.branches, self.config.class_branch_weight, self.config.reg_weight
        # The frozen teacher continues from the shared prompt-free prefix.
        frozen_image = F.normalize(self.backbone.frozen_features(Prefix(self.first_layer, b["image_prefix"])), dim=-1)
        ce_cls = F.cross_entropy(b["logits_cls"], labels)
        ce_rep = F.cross_entropy(b["logits_rep"], labels)
        reg_img = lam * cosine_anchor(b["f_c"], frozen_image)
        reg_text = lam * cosine_anchor(b["text_features"], self.frozen_text_features())
        task = alpha * ce_cls + (1 - alpha) * ce_rep
        acc = (b["logits_fusion"].argmax(-1) == labels).float().mean() * 100
        return {"ce_cls": ce_cls, "ce_rep": ce_rep, "task": task, "reg_img": reg_img, "reg_text": reg_text,
                "acc": acc.detach()}

    def compute_terms(self, images: Tensor, labels: Tensor, trace: Traces | None = None
                      ) -> tuple[dict[str, Tensor], Outputs]:
        """The loss terms and the outputs they came from (traces filled when given)."""
        outputs = self(images, rule="seen", trace=trace)
        terms = self.task_terms(outputs, images, labels)
        terms["loss"] = terms["task"] + terms["reg_img"] + terms["reg_text"]
        return terms, outputs

    def training_step(self, batch: tuple[Tensor, Tensor], state: StepState | None = None) -> dict[str, Tensor]:
        return self.compute_terms(*batch)[0]
