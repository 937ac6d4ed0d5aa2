"""Norm analyses: the norm ratio r(x), per-layer token norms and soft-prompt norms per position.

- ``r(x) = ||z_p(x)|| / ||z_c(x)||`` (AlignedNorm Fig. 3a): ``z_p``/``z_c`` are the projected
  prompt- and class-branch features *before* L2 normalisation.
- Per-layer norms (Fig. 3b): the class token ``c_l`` and the prompt tokens ``P_l`` of every
  block's raw output (before ``ln_post``), the quantities Eq. 11 aligns.
- Prompt-vector norms per position (Nemesis §1): ``||v_j||_p`` along the embedding dimension.

Every function returns numpy arrays (float64) so plots, JSON and CSV read them directly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from alignednorm.analysis._inputs import Positions, as_tensor, check_layers, positions_for
from alignednorm.errors import ConfigError, DataError

NORM_ORDERS = {"l1": 1.0, "l2": 2.0, "linf": float("inf")}


def norm_ratio(z_p: Tensor | np.ndarray, z_c: Tensor | np.ndarray) -> np.ndarray:
    """The norm ratio ``r(x) = ||z_p(x)|| / ||z_c(x)||`` of each image.

    Args:
        z_p: prompt-branch features ``(N, E)``, projected, not normalised.
        z_c: class-branch features ``(N, E)``, projected, not normalised.

    Returns:
        ``(N,)`` ratios.

    Raises:
        DataError: shapes differ, or a class-branch feature has norm 0.
    """
    p = as_tensor(z_p, "z_p", 2)
    c = as_tensor(z_c, "z_c", 2)
    if p.shape != c.shape:
        raise DataError(f"z_p has shape {tuple(p.shape)} and z_c {tuple(c.shape)}; expected equal (N, E) shapes")
    denom = c.norm(dim=1)
    if (denom == 0).any():
        raise DataError(f"z_c row {int((denom == 0).nonzero()[0])} has norm 0; expected non-zero class features")
    return (p.norm(dim=1) / denom).cpu().numpy()


def summarize(values: Tensor | np.ndarray) -> dict[str, float]:
    """Mean, population std (``ddof=0``), median, min, max and count of a 1-D array."""
    v = as_tensor(values, "values", 1).cpu().numpy()
    if v.size == 0:
        raise DataError("values is empty; expected at least one number to summarise")
    return {"mean": float(v.mean()), "std": float(v.std()), "median": float(np.median(v)),
            "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}


def ratio_summary(base: Tensor | np.ndarray, new: Tensor | np.ndarray) -> dict[str, dict[str, float] | float]:
    """Summary statistics of r(x) on base and new images, and the base-new gap of the means.

    Args:
        base: ``(N_base,)`` ratios on base-class test images.
        new: ``(N_new,)`` ratios on new-class test images.

    Returns:
        ``{"base": summarize(base), "new": summarize(new), "gap": mean(base) - mean(new)}``. The
        gap is signed; a method whose prompt branch behaves alike on base and new has gap ≈ 0.
    """
    b, n = summarize(base), summarize(new)
    return {"base": b, "new": n, "gap": b["mean"] - n["mean"]}


def layer_norms(hidden: Mapping[int, Tensor], prompts: Positions | None, cls_index: int = 0) -> dict[str, np.ndarray]:
    """Per-layer norms of the class token and the prompt tokens, averaged over the batch.

    Args:
        hidden: ``{layer: (B, T_l, W)}`` raw block outputs (``Trace.hidden``); ``T_l`` may differ
            between layers when prompts are inserted part-way.
        prompts: ``(start, count)`` of the prompt tokens for every layer, or ``{layer: (start,
            count)}``; layers absent from the mapping (or ``None``) carry no prompts.
        cls_index: position of the class token.

    Returns:
        A dict of arrays over the ``L`` layers, in increasing layer order:

        - ``layers`` ``(L,)``: the layer numbers;
        - ``cls`` ``(L,)``: mean over images of ``||c_l||``;
        - ``prompt_mean`` ``(L,)``: mean over images and prompt tokens of ``||p_{l,k}||``
          (the released code's per-token form of Eq. 11);
        - ``prompt_of_mean`` ``(L,)``: mean over images of ``||mean_k p_{l,k}||`` (the paper's
          norm-of-mean form of Eq. 11);
        - ``prompt_tokens`` ``(L, K)``: mean over images of each token's norm, ``K`` the largest
          prompt count; NaN where a layer has fewer (or no) prompts.
        Prompt entries of unprompted layers are NaN.
    """
    layers = check_layers(hidden, "hidden")
    per_layer = [_one_layer(as_tensor(hidden[layer], f"hidden[{layer}]", 3), prompts, layer, cls_index)
                 for layer in layers]
    width = max(len(tokens) for _, tokens in per_layer)
    tokens = np.full((len(layers), width), np.nan)
    for i, (_, tok) in enumerate(per_layer):
        tokens[i, : len(tok)] = tok
    cls, p_mean, p_of_mean = (np.array([row[0][k] for row in per_layer]) for k in range(3))
    return {"layers": np.array(layers), "cls": cls, "prompt_mean": p_mean, "prompt_of_mean": p_of_mean,
            "prompt_tokens": tokens}


def _one_layer(h: Tensor, prompts: Positions | None, layer: int, cls_index: int) -> tuple[tuple, np.ndarray]:
    """``((cls, prompt_mean, prompt_of_mean), per_token)`` for one layer's ``(B, T, W)`` output."""
    if not -h.shape[1] <= cls_index < h.shape[1]:
        raise ConfigError(f"cls_index={cls_index} but layer {layer} has {h.shape[1]} tokens")
    cls = h[:, cls_index].norm(dim=-1).mean().item()
    start, count = positions_for(prompts, layer, h.shape[1])
    if count == 0:
        return (cls, np.nan, np.nan), np.zeros(0)
    p = h[:, start : start + count]  # (B, K, W)
    per_token = p.norm(dim=-1).mean(dim=0)  # (K,)
    of_mean = p.mean(dim=1).norm(dim=-1).mean().item()
    return (cls, per_token.mean().item(), of_mean), per_token.cpu().numpy()


def prompt_vector_norms(ctx: Tensor | np.ndarray, p: str | float = "l2") -> np.ndarray:
    """Norm of every soft-prompt vector along the embedding dimension (Nemesis §1).

    Args:
        ctx: context vectors ``(n_ctx, W)`` (generic CoOp context) or ``(C, n_ctx, W)``
            (class-specific context, or PLOT's prompt sets).
        p: ``"l1"``, ``"l2"``, ``"linf"`` (or 1, 2, ``inf``).

    Returns:
        ``(n_ctx,)`` or ``(C, n_ctx)`` norms, one per position.
    """
    order = NORM_ORDERS.get(p) if isinstance(p, str) else float(p) if isinstance(p, int | float) else None
    if order not in NORM_ORDERS.values():
        raise ConfigError(f"p={p!r}; expected one of {sorted(NORM_ORDERS)} (or 1, 2, inf)")
    v = as_tensor(ctx, "ctx", (2, 3))
    return torch.linalg.vector_norm(v, ord=order, dim=-1).cpu().numpy()


def prompt_norms_over_epochs(per_epoch: Sequence[Tensor | np.ndarray]) -> np.ndarray:
    """Per-position prompt norms of every epoch as one ``(epochs, n_ctx)`` table.

    Args:
        per_epoch: one array per epoch, ``(n_ctx,)`` or ``(C, n_ctx)`` (from
            :func:`prompt_vector_norms`); a leading class/prompt-set axis is averaged.

    Returns:
        ``(epochs, n_ctx)`` norms.
    """
    if not len(per_epoch):
        raise DataError("per_epoch is empty; expected one array of prompt norms per epoch")
    tables = [as_tensor(a, f"per_epoch[{i}]", (1, 2)) for i, a in enumerate(per_epoch)]
    rows = [t.reshape(-1, t.shape[-1]).mean(dim=0).cpu().numpy() for t in tables]  # each (n_ctx,)
    if len({len(r) for r in rows}) != 1:
        raise DataError(f"per_epoch arrays have lengths {sorted({len(r) for r in rows})}; expected one n_ctx")
    return np.stack(rows)
