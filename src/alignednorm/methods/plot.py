"""PLOT (Chen et al., ICLR 2023): N sets of CoOp contexts matched to local image features by optimal transport.

Each class k gets N prompts (one per set, :class:`~alignednorm.prompts.prompt_sets.ContextSets`), an
image gives M local features, and the logit is ``exp(logit_scale) · Σ_{m,n} T*_{mn} cos(f_m, g^n_k)``
with T* the Sinkhorn plan between uniform marginals on the cost ``1 − cos`` (Eq. 5–7;
:func:`~alignednorm.prompts.optimal_transport.ot_scores`), trained with cross-entropy; both encoders
frozen, only the contexts learn. As the Nemesis repository's copy (ShyFoo/Nemesis ``trainers/plot.py``,
the code behind the Nemesis paper's Table 2):

* the local features are **all** image-tower outputs in the joint space (``local_features: all``):
  on a ResNet every attention-pool output, the pooled (mean-token) query included; the original
  PLOT repository drops the pooled one (``local_features: spatial``);
* the plan has no gradient, ε = 0.1, at most 100 iterations, stop when the mean change of the row
  scaling is below 0.01 (``ot_eps``, ``ot_max_iter``, ``ot_threshold``).

ViT CLIPs are our extension (the official ``clip_plot`` ViT needs a visual prompt PLOT never passes):
the local features are the projected tokens after ``ln_post``, the class token first.

Options the official trainer crashes on: ``middle`` / ``front`` class tokens with N > 1 work here
(every set gets the layout); word init and class-specific contexts are refused with an error.

Names (paper ↔ official ``TRAINER.PLOT`` ↔ here): N ↔ ``N`` ↔ ``n_sets``; M (context length) ↔
``N_CTX`` ↔ ``n_ctx``; ``CLASS_TOKEN_POSITION`` ↔ ``class_token_position``; ``prompt_learner.ctx``
``(N, L, D)`` ↔ ``context.ctx``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from alignednorm.backbone.hooks import Trace, Traces
from alignednorm.errors import ConfigError
from alignednorm.methods.base import MethodTraits, Outputs, check_range, register_method
from alignednorm.methods.coop import CoOp
from alignednorm.prompts.optimal_transport import OTScores, ot_scores
from alignednorm.prompts.prompt_sets import ContextSets

LOCAL_FEATURES = ("all", "spatial")


@register_method("plot")
class Plot(CoOp):
    """PLOT: N learnable prompt sets, class scores by optimal transport to the image's local features."""

    traits = MethodTraits(official_names=CoOp.traits.official_names, citation="""@inproceedings{chen2023plot,
  title = {PLOT: Prompt Learning with Optimal Transport for Vision-Language Models},
  author = {Chen, Guangyi and Yao, Weiran and Song, Xiangchen and Li, Xinyue and Rao, Yongming and Zhang, Kun},
  booktitle = {ICLR}, year = {2023}}""")

    @dataclass
    class Config(CoOp.Config):
        """PLOT settings on top of CoOp's (official ``TRAINER.PLOT`` keys in brackets).

        Attributes:
            n_sets: the number of prompt sets N (N; the official scripts use 4).
            local_features: ``all``: every image-tower output, the pooled one included (the Nemesis
                repository's PLOT); ``spatial``: the grid positions only (the original PLOT repository).
            ot_eps: Sinkhorn's entropic regularisation ε (0.1 in the code).
            ot_max_iter: Sinkhorn's most iterations (100).
            ot_threshold: stop once the mean change of the row scaling is below it (0.01).
        """

        n_sets: int = 4
        local_features: str = "all"
        ot_eps: float = 0.1
        ot_max_iter: int = 100
        ot_threshold: float = 0.01

        def validate(self) -> None:
            super().validate()
            check_range(self, "n_sets", 1)
            check_range(self, "ot_max_iter", 1)
            check_range(self, "ot_threshold", 0.0)
            if not self.ot_eps > 0:
                raise ConfigError(f"ot_eps = {self.ot_eps!r}; expected a positive Sinkhorn regularisation")
            if self.local_features not in LOCAL_FEATURES:
                raise ConfigError(f"local_features = {self.local_features!r}; expected one of {LOCAL_FEATURES}")
            if self.ctx_init:
                raise ConfigError(f"ctx_init = {self.ctx_init!r}; PLOT's prompt sets start from random vectors (the "
                                  "official trainer crashes with word init, and N copies of one phrase would stay "
                                  "equal: the transport gives equal sets equal gradients); use ctx_init=''")
            if self.class_specific:
                raise ConfigError("class_specific = True; PLOT's prompt sets are shared by all classes here (the "
                                  "official trainer crashes on class-specific contexts); use class_specific=false")

    def __init__(self, backbone, config=None):
        super().__init__(backbone, config)
        cfg = self.config
        self.context = ContextSets(backbone, cfg.n_sets, cfg.n_ctx, cfg.class_token_position)

    # ------------------------------------------------------------------ forward
    def compute_text_features(self, trace: Trace | None = None) -> Tensor:
        """Text features ``(N·C, E)`` (not normalised), row ``n·C + k`` = set n, class k."""
        embeddings, token_ids = self.context()
        return self.encode_prompts(embeddings, token_ids, trace, built_alike=self.context.n_sets == 1)

    def encode_prompts(self, embeddings: Tensor, token_ids: Tensor, trace: Trace | None = None,
                       built_alike: bool | None = None) -> Tensor:
        """CoOp's text encoding; ``token_ids`` ``(C, T)`` of one set serve every set of
        ``embeddings`` ``(S·C, T, W)``."""
        if token_ids.shape[0] != embeddings.shape[0]:
            token_ids = token_ids.repeat(embeddings.shape[0] // token_ids.shape[0], 1)
        return super().encode_prompts(embeddings, token_ids, trace, built_alike)

    def local_features(self, images: Tensor, trace: Trace | None = None) -> Tensor:
        """The image tower's outputs ``(B, 1 + G, E)`` (pooled first; not normalised)."""
        return self.backbone.encode_image_tokens(images, trace=trace)

    def scores(self, local: Tensor, text: Tensor) -> OTScores:
        """OT similarities of local features ``(B, 1 + G, E)`` and text features ``(S·C, E)`` of S sets."""
        cfg = self.config
        if cfg.local_features == "spatial":
            local = local[:, 1:]
        prompts = text.view(-1, len(self.classnames), text.shape[-1])  # (S, C, E)
        return ot_scores(local, prompts, cfg.ot_eps, cfg.ot_max_iter, cfg.ot_threshold)

    def forward(self, images: Tensor, rule: str = "any", trace: Traces | None = None) -> Outputs:
        trace = trace or Traces()
        return self.outputs_from(self.local_features(images, trace.image), self.text_features(trace.text))

    def outputs_from(self, local: Tensor, text: Tensor) -> Outputs:
        """Outputs from unnormalised local features ``(B, 1 + G, E)`` and text features ``(N·C, E)``."""
        ot = self.scores(local, text)
        pooled = local[:, 0]
        transport = ot.transport
        return Outputs(logits=self.logit_scale * ot.scores, features=pooled / pooled.norm(dim=-1, keepdim=True),
                       branches={"local_features_unnorm": local, "text_features_unnorm": text,
                                 "ot_similarity": ot.similarity, "ot_scores": ot.scores, "ot_plan": transport.plan,
                                 "ot_kernel": transport.kernel, "ot_r": transport.r, "ot_c": transport.c,
                                 "ot_error": transport.error,
                                 "ot_iterations": torch.tensor(transport.iterations, device=local.device)})

    def cosine_logits(self, image: Tensor, text: Tensor):
        raise ConfigError("plot scores images by optimal transport over local features, not by the cosine of "
                          "global features (CoOp's rule); analyses built on that rule do not apply to it")
