"""Uniformity (Eq. 13) and tolerance (Eq. 14) of L2-normalised embeddings, exact at any N.

- Uniformity ``U = log E_{i != j} exp(-t ||f_i - f_j||^2)`` with ``t = 0.01`` (the AlignedNorm
  paper's value, Fig. 5; Wang & Isola's contrastive-learning papers use ``t = 2``). Lower means
  more uniformly spread. Pairs ``i = j`` are excluded, as in Eq. 13; the mean over ordered pairs
  ``i != j`` equals the mean over unordered pairs ``i < j``.
- Tolerance ``T = E_{i != j, y_i = y_j} f_i^T f_j`` (Eq. 14): the mean cosine similarity over
  all same-class pairs, pooled (every pair weighs the same, so large classes weigh more).

Neither function ever holds an ``N x N`` matrix. Uniformity runs over ``block x block`` tiles of
the upper triangle in float64 and combines the tiles with a log-sum-exp, so it stays exact and
finite even when ``exp`` underflows (large ``t``). Tolerance needs no pairs at all:
``sum_{i != j in c} f_i^T f_j = ||sum_{i in c} f_i||^2 - sum_{i in c} ||f_i||^2``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from alignednorm.analysis._inputs import as_labels, as_tensor, positive
from alignednorm.errors import ConfigError, DataError

#: Eq. 13's temperature as used in the AlignedNorm paper.
DEFAULT_T = 0.01


def prepare_embeddings(embeddings, normalize: bool = True, name: str = "embeddings") -> Tensor:
    """``(N, D)`` embeddings as float64 on their own device, L2-normalised along ``D`` when asked."""
    f = as_tensor(embeddings, name, 2)
    if normalize:
        norms = f.norm(dim=1, keepdim=True)
        if (norms == 0).any():
            raise DataError(f"{name} row {int((norms[:, 0] == 0).nonzero()[0])} has norm 0; "
                            "expected non-zero embeddings to L2-normalise")
        f = f / norms
    return f


def uniformity(embeddings: Tensor, t: float = DEFAULT_T, block_size: int = 2048, normalize: bool = True) -> float:
    """Uniformity ``log E_{i != j} exp(-t ||f_i - f_j||^2)`` (Eq. 13), exact and block-wise.

    Args:
        embeddings: ``(N, D)`` image embeddings, ``N >= 2``.
        t: temperature, > 0 (default 0.01, the paper's).
        block_size: rows per tile; memory is ``O(block_size^2 + N * D)``.
        normalize: L2-normalise the rows first (Eq. 13 is defined on normalised ``f``).

    Returns:
        The uniformity, a float <= 0 (0 when all points coincide).
    """
    t = positive(t, "t")
    if not (isinstance(block_size, int) and block_size > 0):
        raise ConfigError(f"block_size={block_size!r}; expected a positive integer")
    f = prepare_embeddings(embeddings, normalize)
    n = f.shape[0]
    if n < 2:
        raise DataError(f"embeddings has {n} row(s); uniformity needs at least 2 embeddings")
    sq = (f * f).sum(dim=1)  # (N,)
    parts = []
    for i in range(0, n, block_size):
        for j in range(i, n, block_size):
            parts.append(_tile_logsumexp(f, sq, i, j, block_size, t))
    # log mean = log sum over ordered pairs i != j - log N(N-1)
    return (torch.logsumexp(torch.stack(parts), dim=0) - math.log(n * (n - 1))).item()


def _tile_logsumexp(f: Tensor, sq: Tensor, i: int, j: int, block: int, t: float) -> Tensor:
    """log-sum-exp of ``-t d^2`` over the tile ``rows i.., cols j..``, counting its mirror tile too."""
    a, b = f[i : i + block], f[j : j + block]
    d2 = (sq[i : i + block, None] + sq[None, j : j + block] - 2.0 * a @ b.T).clamp_min(0.0)  # (bi, bj)
    logits = -t * d2
    if i == j:
        # A diagonal tile already holds both orders of each pair; drop i = j (Eq. 13).
        logits.fill_diagonal_(float("-inf"))
        return torch.logsumexp(logits.flatten(), dim=0)
    # An off-diagonal tile stands for itself and its transpose (pairs (i, j) and (j, i)).
    return torch.logsumexp(logits.flatten(), dim=0) + math.log(2.0)


def tolerance(embeddings: Tensor, labels: Tensor, normalize: bool = True) -> float:
    """Tolerance ``E_{i != j, y_i = y_j} f_i^T f_j`` (Eq. 14), pooled over all same-class pairs.

    Args:
        embeddings: ``(N, D)`` image embeddings.
        labels: ``(N,)`` integer class labels.
        normalize: L2-normalise the rows first (Eq. 14 is defined on normalised ``f``).

    Returns:
        The tolerance, in [-1, 1] for normalised embeddings (1 when each class collapses to a point).

    Raises:
        DataError: no class has two or more embeddings.
    """
    f = prepare_embeddings(embeddings, normalize)
    y = as_labels(labels, "labels", f.shape[0]).to(f.device)
    _, inverse, counts = torch.unique(y, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), f.shape[1], dtype=f.dtype, device=f.device).index_add_(0, inverse, f)  # (C, D)
    self_dots = torch.zeros(len(counts), dtype=f.dtype, device=f.device).index_add_(0, inverse, (f * f).sum(dim=1))
    pairs = (counts * (counts - 1)).sum().item()  # ordered same-class pairs i != j
    if pairs == 0:
        raise DataError(f"labels has {len(counts)} classes with one embedding each; tolerance needs a class "
                        "with at least 2 embeddings")
    return (((sums * sums).sum(dim=1) - self_dots).sum() / pairs).item()


def embedding_geometry(embeddings: Tensor, labels: Tensor, t: float = DEFAULT_T, block_size: int = 2048,
                       normalize: bool = True) -> dict[str, float | int]:
    """Uniformity and tolerance of one set of embeddings, with what they were computed on.

    Args:
        embeddings: ``(N, D)`` image embeddings.
        labels: ``(N,)`` integer class labels.
        t, block_size, normalize: as in :func:`uniformity`.

    Returns:
        ``{"uniformity", "tolerance", "t", "n", "classes"}``.
    """
    y = as_labels(labels, "labels", len(embeddings))
    return {"uniformity": uniformity(embeddings, t, block_size, normalize),
            "tolerance": tolerance(embeddings, y, normalize), "t": float(t), "n": len(embeddings),
            "classes": int(torch.unique(y).numel())}
