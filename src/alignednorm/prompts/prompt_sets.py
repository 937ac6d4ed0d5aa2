"""N CoOp contexts sharing one class list: PLOT's prompt sets (Chen et al., ICLR 2023, §3.1).

Set n gives every class k the prompt ``[SOS][v^n_1] … [v^n_L][CLASS_k][.][EOS]`` (class tokens at the
``end``, in the ``middle`` or at the ``front``, as :class:`~alignednorm.prompts.text_context.TextContext`),
so the text tower sees ``N·C`` prompts, row ``n·C + k`` (set-major, as the official ``tokenized_prompts``
repeated N times). The per-class token buffers are CoOp's, built once for all sets.

Names (paper ↔ official ``TRAINER.PLOT`` ↔ here): N ↔ ``N`` ↔ ``n_sets``; the context
``prompt_learner.ctx`` ``(N, L, D)`` ↔ ``ContextSets.ctx``. The official prompt learner builds
``middle`` / ``front`` prompts for the first C rows only and so crashes with N > 1; here every set
gets them. Word init and class-specific sets are refused by the method's config (see ``methods/plot.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from alignednorm.errors import ConfigError
from alignednorm.prompts.text_context import TextContext


class ContextSets(TextContext):
    """N random-init context sets of length L, ``ctx`` ``(N, L, W)``, around CoOp's per-class buffers.

    Args:
        backbone: the :class:`~alignednorm.backbone.clip.ClipBackbone` (read, not kept).
        n_sets: the number of prompt sets N.
        n_ctx: context length L.
        position: class tokens at the ``end``, in the ``middle`` or at the ``front``.
        std: standard deviation of the N(0, std²) init (0.02 as the official code).
    """

    def __init__(self, backbone, n_sets: int = 4, n_ctx: int = 16, position: str = "end", std: float = 0.02):
        super().__init__(backbone, n_ctx, "", False, position, std)
        if n_sets < 1:
            raise ConfigError(f"n_sets = {n_sets}; expected at least 1 prompt set")
        self.n_sets = n_sets
        self.ctx = nn.Parameter(torch.empty(n_sets, self.n_ctx, self.width).normal_(std=std).to(self.ctx.device))

    def embeddings(self, ctx: Tensor | None = None) -> Tensor:
        """Prompt embeddings ``(S·C, T, W)`` of S context sets ``(S, L, W)`` (default: the N own), row ``s·C + k``."""
        self._require_classes()
        ctx = self.ctx if ctx is None else ctx
        prefix, suffix = self.token_prefix, self.token_suffix  # (C, 1, W), (C, T-1-L, W)
        sets, classes = ctx.shape[0], prefix.shape[0]
        ctx = ctx.to(prefix.dtype).unsqueeze(1).expand(-1, classes, -1, -1)  # (S, C, L, W)
        x = torch.cat([prefix.expand(sets, -1, -1, -1), ctx, suffix.expand(sets, -1, -1, -1)], dim=2)
        if self.position != "end":  # move the class tokens (per class: names differ in length)
            index = self.layout.unsqueeze(0).unsqueeze(-1).expand(sets, -1, -1, x.shape[-1])
            x = x.gather(2, index)
        return x.reshape(sets * classes, x.shape[2], x.shape[3])  # (S·C, T, W)

    def forward(self, ctx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(embeddings (S·C, T, W), token_ids (S·C, T))`` for the text encoder."""
        x = self.embeddings(ctx)
        return x, self.token_ids.repeat(x.shape[0] // self.token_ids.shape[0], 1)
