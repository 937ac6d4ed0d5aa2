"""Checks shared by the analysis compute functions: array conversion and prompt positions.

Every check raises :class:`~alignednorm.errors.DataError` (bad arrays) or
:class:`~alignednorm.errors.ConfigError` (bad parameters) with a one-line message naming the
value and what was expected.
"""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Real

import numpy as np
import torch
from torch import Tensor

from alignednorm.errors import ConfigError, DataError

#: Prompt positions: one ``(start, count)`` for every layer, or ``{layer: (start, count)}``.
Positions = tuple[int, int] | Mapping[int, tuple[int, int]]


def as_tensor(x, name: str, ndim: int | tuple[int, ...], dtype: torch.dtype = torch.float64) -> Tensor:
    """``x`` (tensor or array-like) as a finite floating tensor with ``ndim`` dimensions.

    Tensors keep their device (the device comes from the inputs); only the dtype changes.
    """
    dims = (ndim,) if isinstance(ndim, int) else ndim
    t = x.detach() if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
    if t.dim() not in dims:
        raise DataError(f"{name} has shape {tuple(t.shape)}; expected {' or '.join(f'{d}-D' for d in dims)}")
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64, torch.bool)):
        raise DataError(f"{name} has dtype {t.dtype}; expected a floating point tensor")
    t = t.to(dtype)
    if t.numel() and not torch.isfinite(t).all():
        raise DataError(f"{name} contains NaN or infinite values; expected finite numbers")
    return t


def as_labels(y, name: str, n: int) -> Tensor:
    """Integer class labels ``(n,)`` as a CPU int64 tensor."""
    t = y.detach().cpu() if isinstance(y, Tensor) else torch.as_tensor(np.asarray(y))
    if t.dim() != 1 or t.shape[0] != n:
        raise DataError(f"{name} has shape {tuple(t.shape)}; expected ({n},), one label per embedding")
    if t.is_floating_point() or t.dtype == torch.bool:
        raise DataError(f"{name} has dtype {t.dtype}; expected integer class labels")
    return t.to(torch.int64)


def positive(value: float, name: str) -> float:
    """``value`` if it is a finite number > 0."""
    if not (isinstance(value, Real) and not isinstance(value, bool) and np.isfinite(value) and value > 0):
        raise ConfigError(f"{name}={value!r}; expected a finite number > 0")
    return float(value)


def positions_for(prompts: Positions | None, layer: int, length: int, name: str = "prompts") -> tuple[int, int]:
    """The ``(start, count)`` of the prompt tokens at ``layer`` in a sequence of ``length`` tokens.

    A layer missing from a mapping, or ``prompts=None``, has no prompts: ``(0, 0)``.
    """
    if prompts is None:
        return 0, 0
    pos = prompts.get(layer, (0, 0)) if isinstance(prompts, Mapping) else prompts
    try:
        start, count = (int(v) for v in pos)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} for layer {layer} is {pos!r}; expected a (start, count) pair of integers") from None
    if start < 0 or count < 0 or start + count > length:
        raise DataError(f"{name} for layer {layer} is (start={start}, count={count}) but the sequence has "
                        f"{length} tokens; expected 0 <= start and start + count <= {length}")
    return start, count


def check_layers(per_layer: Mapping, name: str) -> list[int]:
    """The sorted layer keys of a non-empty ``{layer: tensor}`` mapping."""
    if not isinstance(per_layer, Mapping) or not per_layer:
        raise DataError(f"{name} is an empty or non-mapping {type(per_layer).__name__}; "
                        "expected a non-empty {layer: tensor} mapping")
    return sorted(per_layer)
