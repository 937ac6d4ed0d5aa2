"""Attention analyses: how much attention prompt tokens receive, and class-token attention maps.

AlignedNorm's "entanglement collapse" (Fig. 3c, Figs. 6-7) is near-zero attention from the class
token and the patch tokens to the prompt tokens. The inputs are attention probabilities
``(B, heads, T, T)`` (softmax output, rows sum to 1; ``Trace.attention``), query on axis 2 and
key on axis 3, and where the prompt tokens sit in each layer's input sequence.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from alignednorm.analysis._inputs import Positions, as_tensor, check_layers, positions_for
from alignednorm.errors import ConfigError, DataError


def prompt_attention_share(attn: Mapping[int, Tensor], prompts: Positions | None, cls_index: int = 0,
                           atol: float = 1e-3) -> dict[str, np.ndarray]:
    """Share of attention the class token and the patch tokens give to the prompt tokens.

    For layer ``l`` and head ``h`` with prompt keys ``P``: ``cls[l, h] = mean_b sum_{k in P}
    A[b, h, cls, k]`` and ``patch[l, h] = mean_b mean_{q in patches} sum_{k in P} A[b, h, q, k]``,
    where the patches are every position that is neither the class token nor a prompt.

    Args:
        attn: ``{layer: (B, heads, T_l, T_l)}`` attention probabilities.
        prompts: ``(start, count)`` for every layer, or ``{layer: (start, count)}``; layers
            absent from the mapping carry no prompts.
        cls_index: position of the class token.
        atol: tolerance of the check that every attention row sums to 1.

    Returns:
        ``layers`` ``(L,)``; ``cls`` and ``patch`` ``(L, heads)`` shares in [0, 1] (NaN for a
        layer without prompts); ``uniform`` ``(L,)`` = ``count / T_l``, the share uniform
        attention would give, as a reference line.
    """
    layers = check_layers(attn, "attn")
    rows = [_layer_share(_probabilities(attn[layer], f"attn[{layer}]", atol), prompts, layer, cls_index)
            for layer in layers]
    heads = {len(r[0]) for r in rows}
    if len(heads) != 1:
        raise DataError(f"attn layers have different head counts {sorted(heads)}; expected one head count")
    return {"layers": np.array(layers), "cls": np.stack([r[0] for r in rows]),
            "patch": np.stack([r[1] for r in rows]), "uniform": np.array([r[2] for r in rows])}


def _probabilities(a, name: str, atol: float) -> Tensor:
    """``a`` as a ``(B, heads, T, T)`` tensor whose rows are probability distributions."""
    t = as_tensor(a, name, 4, torch.float32)  # float32 halves memory; rows still sum to 1 within 1e-6
    if t.shape[2] != t.shape[3]:
        raise DataError(f"{name} has shape {tuple(t.shape)}; expected (B, heads, T, T) self-attention")
    sums = t.sum(dim=-1)
    if (t < -atol).any() or ((sums - 1).abs() > atol).any():
        raise DataError(f"{name} rows sum to {sums.min().item():.4g}..{sums.max().item():.4g}; expected "
                        "attention probabilities (non-negative rows summing to 1), not logits")
    return t


def _layer_share(a: Tensor, prompts: Positions | None, layer: int, cls_index: int) -> tuple:
    """``(cls (heads,), patch (heads,), uniform)`` for one layer's ``(B, H, T, T)`` probabilities."""
    tokens = a.shape[-1]
    start, count = positions_for(prompts, layer, tokens)
    cls = _cls_position(cls_index, tokens, layer)
    if count == 0:
        nan = np.full(a.shape[1], np.nan)
        return nan, nan, 0.0
    to_prompts = a[..., start : start + count].sum(dim=-1)  # (B, H, T): mass each query puts on prompts
    patches = _patch_positions(tokens, cls, start, count)
    cls_share = to_prompts[:, :, cls].mean(dim=0)
    patch_share = to_prompts[:, :, patches].mean(dim=(0, 2)) if len(patches) else torch.full_like(cls_share, np.nan)
    return cls_share.cpu().numpy(), patch_share.cpu().numpy(), count / tokens


def _cls_position(cls_index: int, tokens: int, layer: int | str) -> int:
    if not -tokens <= cls_index < tokens:
        raise ConfigError(f"cls_index={cls_index} but layer {layer} has {tokens} tokens")
    return cls_index % tokens


def _patch_positions(tokens: int, cls: int, start: int, count: int) -> list[int]:
    """Every position that is neither the class token nor a prompt token."""
    return [i for i in range(tokens) if i != cls and not start <= i < start + count]


def class_attention_map(attn: Tensor | np.ndarray, prompts: tuple[int, int] | None = None, cls_index: int = 0,
                        heads: Sequence[int] | None = None) -> np.ndarray:
    """Class-token attention to the patch tokens as a ``grid x grid`` map, for image overlays.

    Args:
        attn: ``(B, heads, T, T)`` or ``(heads, T, T)`` attention probabilities of one layer.
        prompts: ``(start, count)`` of the prompt tokens in this sequence, or ``None``.
        cls_index: position of the class token.
        heads: heads to average; all when ``None``.

    Returns:
        ``(B, grid, grid)`` maps (``B = 1`` for a 3-D input), row-major patch order, holding the
        attention probabilities themselves (not rescaled).

    Raises:
        DataError: the number of patch tokens is not a perfect square.
    """
    a = as_tensor(attn, "attn", (3, 4), torch.float32)
    a = a.unsqueeze(0) if a.dim() == 3 else a  # (B, H, T, T)
    tokens = a.shape[-1]
    if heads is not None:
        bad = [h for h in heads if not 0 <= h < a.shape[1]]
        if bad or not len(heads):
            raise ConfigError(f"heads={list(heads)}; expected a non-empty list of indices in [0, {a.shape[1]})")
        a = a[:, list(heads)]
    start, count = positions_for(prompts, 0, tokens) if prompts is not None else (0, 0)
    patches = _patch_positions(tokens, _cls_position(cls_index, tokens, "given"), start, count)
    grid = math.isqrt(len(patches))
    if grid * grid != len(patches) or grid == 0:
        raise DataError(f"attn has {len(patches)} patch tokens (T={tokens}, prompts={count}); expected a perfect "
                        "square grid of patches")
    row = a[:, :, cls_index % tokens, patches].mean(dim=1)  # (B, grid*grid)
    return row.reshape(-1, grid, grid).cpu().numpy()  # (B, grid, grid)
