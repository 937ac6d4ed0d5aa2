"""Optimal-transport scoring of an image against a class (PLOT, Chen et al., ICLR 2023, §3.2–3.3).

An image gives M local features f_m, a class gives N prompt features g_n (one per prompt set). The
score is ``⟨T*, S⟩ = Σ_{m,n} T*_{mn} cos(f_m, g_n)``, i.e. ``1 − d_OT`` with cost ``C = 1 − S``, where
T* is the entropic transport plan between uniform marginals (1/M over local features, 1/N over
sets), found by Sinkhorn's iterations on the Gibbs kernel ``K = exp(−C / ε)`` (Eq. 5–7):
``r ← a / (K c)``, ``c ← b / (Kᵀ r)``, ``T* = diag(r) K diag(c)``.

As the official code (ShyFoo/Nemesis ``trainers/plot.py``, CHENGY12/PLOT): ε = 0.1, at most 100
iterations, starting from ``r = c = 1``; the loop stops after the first iteration whose mean
``|r − r_prev|`` over *all* problems of the batch and all rows is below 0.01 (the change of ``c`` is
not tested; ``r``'s entries are large, so this stops well before convergence: the plan differs from
the converged one, and so do the logits). The plan carries no gradient (``torch.no_grad``): the
gradient reaches the prompts only through S in ``⟨T*, S⟩``. Unlike the official code, the plan is
always computed in float32 (the kernel underflows in float16), and a non-finite plan raises an error
instead of the official ``return None``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class Transport:
    """Sinkhorn's outcome for P problems of M rows and N columns.

    Attributes:
        plan: ``(P, M, N)`` the transport plan T* (no gradient).
        kernel: ``(P, M, N)`` the Gibbs kernel ``exp(−cost / ε)``.
        r: ``(P, M)`` row scaling at exit.
        c: ``(P, N)`` column scaling at exit.
        iterations: iterations run (the stop test passed at the last one, or ``max_iter``).
        error: mean ``|r − r_prev|`` of the last iteration (0-d).
    """

    plan: Tensor
    kernel: Tensor
    r: Tensor
    c: Tensor
    iterations: int
    error: Tensor


@torch.no_grad()
def sinkhorn(cost: Tensor, eps: float = 0.1, max_iter: int = 100, threshold: float = 0.01) -> Transport:
    """Entropic transport plans between uniform marginals for a batch of cost matrices.

    Args:
        cost: ``(P, M, N)`` costs (PLOT: ``1 − cos``), computed in float32.
        eps: the entropic regularisation ε.
        max_iter: the most iterations.
        threshold: stop after the first iteration whose mean ``|r − r_prev|`` (over every problem and
            row) is below it; 0 runs ``max_iter`` iterations.
    """
    with torch.autocast(cost.device.type, enabled=False):
        cost = cost.detach().float()
        problems, rows, cols = cost.shape
        kernel = torch.exp(-cost / eps)
        a = cost.new_full((problems, rows), 1.0 / rows)
        b = cost.new_full((problems, cols), 1.0 / cols)
        r, c = torch.ones_like(a), torch.ones_like(b)
        error, iterations = cost.new_zeros(()), 0
        for iterations in range(1, max_iter + 1):
            previous = r
            r = a / (kernel @ c.unsqueeze(-1)).squeeze(-1)
            c = b / (kernel.transpose(1, 2) @ r.unsqueeze(-1)).squeeze(-1)
            error = (r - previous).abs().mean()
            if error.item() < threshold:
                break
        plan = r.unsqueeze(-1) * c.unsqueeze(-2) * kernel
    if not torch.isfinite(plan).all():
        raise FloatingPointError(f"the Sinkhorn transport plan is not finite (eps = {eps}: exp(-cost / eps) "
                                 "under- or overflowed for costs in "
                                 f"[{float(cost.min()):.3g}, {float(cost.max()):.3g}])")
    return Transport(plan, kernel, r, c, iterations, error)


@dataclass
class OTScores:
    """Optimal-transport similarities of a batch of images against every class.

    Attributes:
        scores: ``(B, C)`` ``Σ T* ⊙ S`` per image and class (with gradient through S).
        similarity: ``(B·C, M, N)`` S, row ``b·C + c`` the problem of image b and class c.
        transport: the Sinkhorn outcome of the ``B·C`` problems.
    """

    scores: Tensor
    similarity: Tensor
    transport: Transport


def ot_scores(local: Tensor, prompts: Tensor, eps: float = 0.1, max_iter: int = 100,
              threshold: float = 0.01) -> OTScores:
    """PLOT's class scores from local image features and prompt-set text features.

    Args:
        local: ``(B, M, E)`` local image features (normalised here).
        prompts: ``(N, C, E)`` text features of N prompt sets for C classes (normalised here).
        eps, max_iter, threshold: Sinkhorn's settings (see :func:`sinkhorn`).
    """
    f, g = F.normalize(local, dim=-1), F.normalize(prompts, dim=-1)
    batch, tokens, _ = f.shape
    sets, classes, _ = g.shape
    sim = torch.einsum("bme,nce->bcmn", f, g).reshape(batch * classes, tokens, sets)  # (B·C, M, N)
    transport = sinkhorn(1.0 - sim, eps, max_iter, threshold)
    scores = (transport.plan * sim).sum(dim=(1, 2)).view(batch, classes)
    return OTScores(scores, sim, transport)
