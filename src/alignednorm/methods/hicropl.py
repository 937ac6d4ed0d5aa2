"""HiCroPL (Zheng et al., ICCV 2025): hierarchical cross-modal prompt learning.

Prompts: ``n_ctx`` text and ``n_ctx`` visual tokens at every block ``1..d`` (text: in place of the
first word embeddings of ``"{prefix} {class}."``; vision: appended after the patches), replacing
the previous block's outputs there, as IVLP (``prompts/deep.py``). Knowledge flows across the towers
(``prompts/cross_tower.py``): in layers ``1..k`` a knowledge mapper rewrites the visual prompts from
per-layer proxies of the text prompts, in layers ``k+1..d`` the text prompts from proxies of the
visual ones (§3.2–3.3). Outputs are fused with frozen CLIP (§3.4): the image feature is
``N(N(f) + N(f_clip))``, the text feature ``N(N(w) + w_llm)`` with ``w_llm`` the frozen embedding of
the class's LLM descriptions (per sentence normalised, averaged, normalised: the official
``gpt_clip_classifier``). Loss (Eq. 9): ``CE + λ·[(1 − mean cos(w, w_llm)) + (1 − mean cos(f, f_clip))]``.

**Mapping modes** (``mapping``). The official prompt learner copies the mapper outputs into the
prompt parameters in place, without gradient (``.data.copy_``), at every forward:

* ``reference`` (official): each :meth:`training_step` first overwrites the visual prompts of layers
  ``1..k`` and the text prompts of layers ``k+1..d`` with the mapper outputs (computed from their
  current values), then the encoders use the prompt parameters as leaves; Adam steps the mapped
  values. The mappers, proxies and query tokens get no gradient: in this mode they are frozen
  (``requires_grad=False``, not counted as learnable) but saved with the prompts, because every
  evaluation maps through them. Evaluation too, as the official forward (``eval_remaps``, on by
  default): every eval-mode forward writes the mapping into the stored prompts first. Official
  Dassl validates after each epoch before saving, so training continues from prompts mapped once
  more per validation batch, the saved (best-epoch) prompts include those mappings, and test batch
  j sees the prompts mapped j more times. ``eval_remaps: false`` is the side-effect-free variant:
  an eval forward maps the stored values without writing them back (the official first test batch,
  whatever the number of batches).
* ``differentiable``: the stored prompts are the mapper's inputs, the mapped prompts a function of
  them in every forward (training or eval), and gradients reach prompts, proxies and mappers. This
  is what the paper describes; at ViT-B/16 it learns 33.4 M parameters instead of the prompts'
  0.246 M (the paper's count, which is the prompts alone: 12 × 16 × (512 + 768)).

Both modes save the same tensors. The teacher image encoder may be another CLIP file
(``teacher_checkpoint``, official ``TEACHER_NAME``); the description embeddings come from the
backbone, as in the official code. Without descriptions in the label space the label space's
templates stand in for them (warned once; :attr:`HiCroPL.used_description_fallback`, term
``description_fallback``).

Names (paper ↔ official ``trainers/hicropl.py`` ↔ here): text prompts ↔ ``prompt_learner.ctx`` /
``cross_prompts_text[l-1]`` ↔ ``text_prompts.l``; visual prompts ↔ ``cross_prompts_visual[l-1]`` ↔
``vision_prompts.l``; LKP and proxy tokens ↔ ``attn_pooling_{text,visual}_nets``,
``{text,visual}_proxy_token`` ↔ ``cross.{text,vision}_proxies.l``; mappers ↔ ``text2visual_net``,
``visual2text_net`` ↔ ``cross.text_to_vision``, ``cross.vision_to_text``; λ ↔ ``LAMBD`` ↔
``distill_weight``; d ↔ ``PROMPT_DEPTH`` ↔ ``prompt_depth``; k ↔ ``CROSS_LAYER`` ↔ ``cross_layer``.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alignednorm.backbone.clip import ClipBackbone
from alignednorm.backbone.hooks import Traces
from alignednorm.errors import ConfigError
from alignednorm.methods.base import MethodTraits, Outputs, StepState, check_range, register_method
from alignednorm.methods.maple import DeepPromptConfig, DeepPromptMethod
from alignednorm.methods.official_names import OfficialNames
from alignednorm.prompts.cross_tower import CrossTowerFlow, CrossTowerOutput
from alignednorm.prompts.deep import PromptStack, context_init, round_fp16
from alignednorm.prompts.label_space import LabelSpace

log = logging.getLogger(__name__)
MAPPINGS = ("reference", "differentiable")


def _number_visual_proxies(state: dict) -> dict:
    """Number the visual proxies by layer: official index j is layer k + 1 + j (k: the text proxies)."""
    k = len({n.split(".")[2] for n in state if n.startswith("cross.text_proxies.")})
    return {re.sub(r"\.\+(\d+)\.", lambda m: f".{k + 1 + int(m[1])}.", n): t for n, t in state.items()}


# Official names (zzeoZheng/HiCroPL ``trainers/hicropl.py``): prompts and cross-tower nets of
# ``prompt_learner`` (``ctx`` is ``cross_prompts_text.0``). Visual proxies are numbered from layer k + 1 in
# the official lists; they get a ``+`` mark here and their layer once k is known.
OFFICIAL_NAMES = OfficialNames(
    rules=(
        (r"prompt_learner\.ctx$", lambda m: "text_prompts.1"),
        (r"prompt_learner\.cross_prompts_text\.(\d+)$", lambda m: f"text_prompts.{int(m[1]) + 1}"),
        (r"prompt_learner\.cross_prompts_visual\.(\d+)$", lambda m: f"vision_prompts.{int(m[1]) + 1}"),
        (r"prompt_learner\.text2visual_net\.(.+)$", lambda m: f"cross.text_to_vision.{m[1]}"),
        (r"prompt_learner\.visual2text_net\.(.+)$", lambda m: f"cross.vision_to_text.{m[1]}"),
        (r"prompt_learner\.attn_pooling_text_nets\.(\d+)\.(.+)$",
         lambda m: f"cross.text_proxies.{int(m[1]) + 1}.{m[2]}"),
        (r"prompt_learner\.text_proxy_token\.(\d+)$", lambda m: f"cross.text_proxies.{int(m[1]) + 1}.query"),
        (r"prompt_learner\.attn_pooling_visual_nets\.(\d+)\.(.+)$", lambda m: f"cross.vision_proxies.+{m[1]}.{m[2]}"),
        (r"prompt_learner\.visual_proxy_token\.(\d+)$", lambda m: f"cross.vision_proxies.+{m[1]}.query"),
    ),
    example="prompt_learner.ctx", finish=_number_visual_proxies)


@register_method("hicropl")
class HiCroPL(DeepPromptMethod):
    """Deep prompts in both towers, mapped across them at layer k, fused with frozen CLIP."""

    traits = MethodTraits(uses_descriptions=True, official_names=OFFICIAL_NAMES,
                          citation="""@article{zheng2025hierarchical,
  title={Hierarchical Cross-modal Prompt Learning for Vision-Language Models},
  author={Zheng, Hao and Yang, Shunzhi and He, Zhuoxin and Yang, Jinfeng and Huang, Zhenhua},
  journal={arXiv preprint arXiv:2507.14976},
  year={2025}
}""")


    @dataclass
    class Config(DeepPromptConfig):
        """HiCroPL settings (official ``TRAINER.HICROPL`` keys in brackets).

        Attributes:
            n_ctx: prompt tokens per block in each tower (N_CTX). ``ctx_init`` is used only when
                ``n_ctx ≤ 4``, as the official code; longer contexts start random.
            prompt_depth: d, the prompted blocks from the first (PROMPT_DEPTH).
            cross_layer: k: text → vision mapping in layers 1..k, vision → text in k+1..d (CROSS_LAYER).
            distill_weight: λ of the two distillation terms (LAMBD).
            mapping: ``reference`` (mapper output written into the prompts without gradient, the
                official behaviour) or ``differentiable`` (gradients reach mappers and proxies); see
                the module docstring.
            eval_remaps: in ``reference`` mode, eval-mode forwards (validation, test) also write the
                mapping into the stored prompts, as the official forward does (default); false keeps
                evaluation free of side effects. See the module docstring.
            mapper_heads: attention heads of the proxies and mappers (8 in the official code).
            teacher_checkpoint: CLIP file of the frozen image teacher (TEACHER_NAME); empty: the backbone.
        """

        n_ctx: int = 16
        prompt_depth: int = 12
        cross_layer: int = 6
        distill_weight: float = 12.0
        mapping: str = "reference"
        eval_remaps: bool = True
        mapper_heads: int = 8
        teacher_checkpoint: str = ""

        def validate(self) -> None:
            check_range(self, "n_ctx", 1)
            check_range(self, "prompt_depth", 1)
            check_range(self, "cross_layer", 0, self.prompt_depth)
            check_range(self, "distill_weight", 0.0)
            check_range(self, "mapper_heads", 1)
            if self.mapping not in MAPPINGS:
                raise ConfigError(f"HiCroPL.Config.mapping = {self.mapping!r}; expected one of {MAPPINGS}")

    def __init__(self, backbone, config=None):
        super().__init__(backbone, config)
        backbone.require_vit(f"method {self.name!r}")
        cfg, bb = self.config, backbone
        self.check_depth("prompt_depth", min(bb.text_layers, bb.vision_layers))
        if cfg.prompt_depth > min(bb.text_layers, bb.vision_layers):
            log.warning("hicropl: prompt_depth %d exceeds the backbone's layers; the prompts of the missing blocks "
                        "are mapped but never used", cfg.prompt_depth)
        blocks = list(range(1, cfg.prompt_depth + 1))
        self.text_prompts = PromptStack(blocks, cfg.n_ctx, bb.text_width)
        self.vision_prompts = PromptStack(blocks, cfg.n_ctx, bb.vision_width)
        ctx, self.prompt_prefix = context_init(bb, cfg.ctx_init if cfg.n_ctx <= 4 else "", cfg.n_ctx, bb.text_width)
        with torch.no_grad():
            self.text_prompts["1"].copy_(ctx)
            for b in blocks:  # official: one N(0, 0.02²) draw for the visual prompts of every layer
                self.vision_prompts[str(b)].copy_(self.vision_prompts["1"])
        self.cross = CrossTowerFlow(cfg.prompt_depth, cfg.cross_layer, bb.text_width, bb.vision_width,
                                    cfg.mapper_heads)
        self.cross.requires_grad_(cfg.mapping == "differentiable")
        self.teacher = self._load_teacher(cfg.teacher_checkpoint) if cfg.teacher_checkpoint else None
        self._fixed: tuple[LabelSpace, Tensor] | None = None
        self._warned_fallback = False

    def _load_teacher(self, path: str) -> ClipBackbone:
        teacher = ClipBackbone.from_file(path)
        if teacher.embed_dim != self.backbone.embed_dim or teacher.image_size != self.backbone.image_size:
            raise ConfigError(f"teacher_checkpoint = {path!r}: embedding width {teacher.embed_dim} / image size "
                              f"{teacher.image_size} differ from the backbone's {self.backbone.embed_dim} / "
                              f"{self.backbone.image_size}")
        return teacher

    # ------------------------------------------------------------------ prompts
    def stored_prompts(self) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
        """``({l: (n, W_t)}, {l: (n, W_v)})``: the prompt parameters of every layer."""
        blocks = self.text_prompts.blocks()
        return {b: self.text_prompts[str(b)] for b in blocks}, {b: self.vision_prompts[str(b)] for b in blocks}

    def mapping(self) -> CrossTowerOutput:
        """The cross-tower flow applied to the stored prompts (no gradient in ``reference`` mode)."""
        grad = contextlib.nullcontext() if self.config.mapping == "differentiable" else torch.no_grad()
        with grad:
            return self.cross(*self.stored_prompts())

    def prompts_in_use(self) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
        """The text and visual prompts the encoders consume, ``{layer: (n, W)}`` each.

        ``reference`` mode in training, or in evaluation with ``eval_remaps``: the stored prompts (the
        forward has just written the mapping into them); otherwise the stored prompts with the mapped
        layers replaced.
        """
        text, vision = self.stored_prompts()
        if self._remaps_in_place():
            return text, vision
        mapped = self.mapping()
        return {**text, **mapped.text}, {**vision, **mapped.vision}

    def _remaps_in_place(self) -> bool:
        """Whether forwards in the current mode write the mapping into the stored prompts (official)."""
        return self.config.mapping == "reference" and (self.training or self.config.eval_remaps)

    @torch.no_grad()
    def map_in_place(self) -> CrossTowerOutput:
        """The official prompt learner's rewrite: mapper outputs copied into the prompt parameters."""
        mapped = self.cross(*self.stored_prompts())
        for b, tokens in mapped.vision.items():
            self.vision_prompts[str(b)].copy_(tokens)
        for b, tokens in mapped.text.items():
            self.text_prompts[str(b)].copy_(tokens)
        self.invalidate_text_cache()
        return mapped

    # ------------------------------------------------------------------ frozen side
    @property
    def used_description_fallback(self) -> bool:
        """True when the label space has no class descriptions and its templates stand in for them."""
        return self.label_space is not None and self.label_space.descriptions is None

    def description_features(self) -> Tensor:
        """``(C, E)`` normalised frozen class embeddings of the descriptions (official ``fixed_embeddings``)."""
        space = self._require_label_space()
        if self._fixed is None or self._fixed[0] is not space:
            if space.descriptions is None:
                if not self._warned_fallback:
                    log.warning("hicropl: the label space has no class descriptions; its %d template(s) stand in for "
                                "them (set data.descriptions to the LLM description file)", len(space.templates))
                    self._warned_fallback = True
                fixed = self.frozen_text_features()
            else:
                fixed = description_embeddings(self.backbone, space)
            self._fixed = (space, fixed)
        return self._fixed[1]

    def set_description_features(self, features: Tensor) -> None:
        """Use precomputed ``(C, E)`` normalised description embeddings for the current label space.

        E.g. the official ``cache/<dataset>_clip_weights_random.pt``, or embeddings computed elsewhere.
        """
        space = self._require_label_space()
        if tuple(features.shape) != (len(space), self.backbone.embed_dim):
            raise ConfigError(f"description features of shape {tuple(features.shape)}; expected "
                              f"({len(space)}, {self.backbone.embed_dim}) for this label space")
        self._fixed = (space, features)
        self.invalidate_text_cache()

    @torch.no_grad()
    def frozen_image_features(self, images: Tensor) -> Tensor:
        """``(B, E)`` normalised features of the frozen image teacher (official ``ZS_image_encoder``)."""
        features = (self.teacher or self.backbone).encode_image(images).features
        return features / features.norm(dim=-1, keepdim=True)

    # ------------------------------------------------------------------ forward
    def compute_text_features(self, trace=None) -> Tensor:
        """Prompted class embeddings ``(C, E)``, before normalisation and fusion."""
        text, _ = self.prompts_in_use()
        return self.encode_prompted_text(text[1], {b: t for b, t in text.items() if b >= 2}, trace)

    def forward(self, images: Tensor, rule: str = "any", trace: Traces | None = None) -> Outputs:
        trace = trace or Traces()
        if self._remaps_in_place() and not self.training:  # official: every eval forward rewrites the prompts
            self.map_in_place()
        text = self.text_features(trace.text)
        _, vision = self.prompts_in_use()
        image = self.encode_prompted_image(images, vision[1], {b: t for b, t in vision.items() if b >= 2},
                                           trace.image)
        frozen_image, fixed = self.frozen_image_features(images), self.description_features()
        # §3.4 fusion with x / ‖x‖ as the official forward; it adds the float16-rounded fixed embeddings.
        f = image / image.norm(dim=-1, keepdim=True)
        f = f + frozen_image
        f = f / f.norm(dim=-1, keepdim=True)
        w = text / text.norm(dim=-1, keepdim=True)
        w = w + (round_fp16(fixed) if self.config.official_fp16_rounding else fixed)
        w = w / w.norm(dim=-1, keepdim=True)
        logits = self.backbone.logit_scale.exp() * f @ w.t()
        return Outputs(logits=logits, features=f, branches={
            "image_features_prompted": image, "text_features_prompted": text, "image_features": f,
            "text_features": w, "frozen_image_features": frozen_image, "frozen_text_features": fixed})

    # ------------------------------------------------------------------ loss
    def loss_terms(self, outputs: Outputs, labels: Tensor) -> dict[str, Tensor]:
        """Eq. 9: cross-entropy plus λ times the text and image distillation to frozen CLIP (cos eps 1e-7)."""
        b = outputs.branches
        ce = F.cross_entropy(outputs.logits, labels)
        distill_text = 1.0 - F.cosine_similarity(b["text_features"], b["frozen_text_features"], dim=1, eps=1e-7).mean()
        distill_image = 1.0 - F.cosine_similarity(b["image_features"], b["frozen_image_features"], dim=1,
                                                  eps=1e-7).mean()
        distill = distill_text + distill_image
        loss = ce + self.config.distill_weight * distill
        fallback = torch.tensor(float(self.used_description_fallback), device=loss.device)
        return {"loss": loss, "ce": ce.detach(), "distill_text": distill_text.detach(),
                "distill_image": distill_image.detach(), "distill": distill.detach(), "description_fallback": fallback}

    def compute_terms(self, images: Tensor, labels: Tensor, trace: Traces | None = None
                      ) -> tuple[dict[str, Tensor], Outputs, CrossTowerOutput | None]:
        """One training forward: loss terms, outputs and (``reference`` mode) the mapping written in place."""
        # Official order: the prompt learner rewrites its prompts, then the encoders run on them.
        mapped = self.map_in_place() if self.config.mapping == "reference" else None
        outputs = self(images, rule="seen", trace=trace)
        return self.loss_terms(outputs, labels), outputs, mapped

    def training_step(self, batch: tuple[Tensor, Tensor], state: StepState | None = None) -> dict[str, Tensor]:
        return self.compute_terms(*batch)[0]

    # ------------------------------------------------------------------ state
    def saved_parameters(self) -> dict[str, nn.Parameter]:
        """What a run keeps: the prompts and the cross-tower nets (frozen in ``reference`` mode, but used)."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad or n.startswith("cross.")}



def description_embeddings(backbone: ClipBackbone, space: LabelSpace) -> Tensor:
    """``(C, E)``: per class, frozen CLIP features of its descriptions, each normalised, averaged, normalised."""
    device = backbone.token_embedding.weight.device
    rows = []
    for name in space.classnames:
        sentences = list(space.descriptions[name])
        try:
            ids = backbone.tokenize(sentences)
        except ConfigError as exc:
            raise ConfigError(f"{space.description_source or 'class descriptions'}: class {name!r}: {exc}") from None
        with torch.no_grad():
            x = backbone.encode_text(ids.to(device)).features
        x = x / x.norm(dim=-1, keepdim=True)
        x = x.mean(dim=0)
        rows.append(x / x.norm())
    return torch.stack(rows)
