"""Nemesis's norm terms on soft prompts (Fu et al., ICLR 2024, §3.3; specs/nemesis.md §3–6).

Both terms are ``L = (1/M) Σ_j α_j ‖v_j‖_p`` (Eq. 3 / Eq. 4): per-position norms of the context
along the embedding axis, weighted by α (length L, broadcast over a leading class axis for a
class-specific context, whose loss is then the *sum* over classes of position means, as the code),
divided by M = the number of non-zero α (1 when all are zero: the loss is then exactly 0).

* **PUN** (position-uniform): α_j = ω at every position (M = L).
* **PAN** (position-aware): α_j = ω only at the positions whose τ-rescaled corruption makes the
  pre-inference strictly more often correct on the batch (Eq. 4's indicator), 0 elsewhere.

Combined per step (Eq. 5): ``CE + ω_E · (β L_PUN + (1 − β) L_PAN)`` with the logistic epoch schedule
``ω_E = 1 − 1/(1 + exp(−k (E − E_max/2)))``, k = 0.2, E counted from 0 (A.2.2).

Naming trap (paper ↔ official config ↔ here): ω ↔ ``A`` ↔ ``omega`` (PAN's forced 50 on Food101 /
OxfordPets ↔ ``pan_omega``); ω_E ↔ the code's ``omega`` / ``omega_schedule()`` ↔ :func:`omega_schedule`;
τ ↔ ``CW`` ↔ ``tau``; N ↔ ``NP`` ↔ ``pan_positions``; β ↔ ``BETA``; p ↔ ``NT`` (two/one/inf ↔ l2/l1/linf).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from alignednorm.errors import ConfigError

NORMS = {"l2": 2.0, "l1": 1.0, "linf": math.inf}
# The official config's NT values.
OFFICIAL_NORMS = {"two": "l2", "one": "l1", "inf": "linf"}


def _order(norm: str) -> float:
    if norm not in NORMS:
        raise ConfigError(f"norm = {norm!r}; expected one of {tuple(NORMS)}")
    return NORMS[norm]


def position_norms(ctx: Tensor, norm: str = "l2") -> Tensor:
    """‖v_j‖_p along the embedding axis: ``(L, W)`` → ``(L,)``, ``(C, L, W)`` → ``(C, L)``."""
    return torch.linalg.vector_norm(ctx, ord=_order(norm), dim=-1)


def logged_position_norms(ctx: Tensor, norm: str = "l2") -> Tensor:
    """The per-position norms the official trainer logs (``v{j}_norm``): averaged over classes, ``(L,)``."""
    norms = position_norms(ctx.detach(), norm)
    return norms.mean(dim=0) if norms.dim() > 1 else norms


def matrix_norm(ctx: Tensor, norm: str = "l2") -> Tensor:
    """The logged ``matrix_norm``: Frobenius (l2), induced 1- (l1) or ∞-norm (linf) of ``(L, W)``;
    class mean for CSC."""
    _order(norm)
    order = {"l2": "fro", "l1": 1, "linf": math.inf}[norm]
    return torch.linalg.matrix_norm(ctx.detach(), ord=order).mean()


def weighted_norm(alpha: Tensor, norms: Tensor) -> Tensor:
    """``Σ α ⊙ norms / max(1, count_nonzero(α))`` (official ``normalize``); α ``(L,)`` broadcasts over classes."""
    count = torch.count_nonzero(alpha).clamp(min=1)  # no selected position: divide by 1, the loss is 0
    return (alpha * norms).sum() / count


def pun_weights(length: int, omega: float, device=None) -> Tensor:
    """PUN's α: ω at each of the ``length`` positions."""
    return omega * torch.ones(length, device=device)


def omega_schedule(epoch: int, max_epochs: int, rate: float = 0.2) -> float:
    """ω_E = 1 − 1/(1 + exp(−k (E − E_max/2))) with E counted from 0 (A.2.2; official ``omega_schedule``)."""
    return 1.0 - 1.0 / (1.0 + math.exp(-rate * (epoch - 0.5 * max_epochs)))


def corrupted_contexts(ctx: Tensor, positions: Sequence[int], factor: float) -> Tensor:
    """``N + 1`` context sets ``(N+1, *ctx.shape)``: set 0 unchanged, set n with position ``positions[n-1]``
    multiplied by ``factor`` (for every class of a class-specific context). RESCALE corruption (§2)."""
    sets = ctx.detach().unsqueeze(0).repeat(len(positions) + 1, *([1] * ctx.dim()))
    for n, j in enumerate(positions, start=1):
        sets[n, ..., j, :] *= factor
    return sets


@dataclass
class PanDecision:
    """The outcome of PAN's pre-inference on one batch.

    Attributes:
        positions: the N drawn positions (0-based).
        logits: ``(N+1, B, C)`` pre-inference logits (set 0 clean); ``None`` without the search.
        pred: ``(N+1, B)`` top-1 predictions.
        ori_correct: correct predictions of the clean set (0-d).
        crt_correct: ``(N,)`` correct predictions of each corrupted set.
        alpha: ``(L,)`` PAN weights: ω at the selected positions, 0 elsewhere.
    """

    positions: list[int]
    alpha: Tensor
    logits: Tensor | None = None
    pred: Tensor | None = None
    ori_correct: Tensor | None = None
    crt_correct: Tensor | None = None

    @property
    def selected(self) -> list[int]:
        return [j for j in range(self.alpha.shape[0]) if float(self.alpha[j]) != 0.0]


def pan_weights(logits: Tensor, labels: Tensor, positions: Sequence[int], length: int, omega: float) -> PanDecision:
    """Eq. 4: α_{l_n} = ω iff corrupted set n has strictly more correct predictions than the clean set.

    Args:
        logits: ``(N+1, B, C)`` pre-inference logits, set 0 clean, set n rescaled at ``positions[n-1]``.
        labels: ``(B,)``.
        positions: the N corrupted positions.
        length: context length L.
        omega: the PAN weight ω.
    """
    pred = logits.argmax(dim=-1)  # (N+1, B); no squeeze, so a batch of one works
    correct = (pred == labels.unsqueeze(0)).sum(dim=-1)  # (N+1,)
    ori, crt = correct[0], correct[1:]
    alpha = torch.zeros(length, device=logits.device)
    alpha[list(positions)] = (crt > ori).float() * omega
    return PanDecision(list(positions), alpha, logits, pred, ori, crt)


def random_pan_weights(positions: Sequence[int], length: int, omega: float, device=None) -> PanDecision:
    """The "w/o selection" ablation (official ``NP = "random<K>"``): α = ω at the drawn positions, unconditionally."""
    alpha = torch.zeros(length, device=device)
    alpha[list(positions)] = omega
    return PanDecision(list(positions), alpha)
