"""Energies a classifier's logits implicitly define, for energy-based sampling of prompts (specs/empl.md §3.2).

A CLIP classifier with logits ``z_c`` defines, without any extra network (the JEM view of a classifier):

* the **free energy** ``E(x) = −T · logsumexp_c(z_c / T)`` (label-free, usable at test time):
  low when the classifier is confident about ``x``;
* the **conditional energy** ``E(x, y) = −z_y`` (needs the label: training only);
* a **Gaussian prior** ``(λ/2) · ‖(v − v̄) / r‖²`` that keeps samples ``v`` near a mean ``v̄``
  (measured in units of ``r``, e.g. the RMS entry of ``v̄``, so λ means the same on every CLIP).

EMPL (unofficial reconstruction) draws prompt contexts from ``E(V; x) + prior(V)``; the energies
here know nothing about prompts and work on any logits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from alignednorm.errors import ConfigError

ENERGIES = ("free", "conditional")


def free_energy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``E = −T · logsumexp_c(z_c / T)`` over the last axis: ``(..., C)`` → ``(...)`` (specs/empl.md §3.2)."""
    if temperature <= 0:
        raise ConfigError(f"temperature = {temperature!r}; expected a positive number")
    return -temperature * torch.logsumexp(logits / temperature, dim=-1)


def conditional_energy(logits: Tensor, labels: Tensor) -> Tensor:
    """``E = −z_y``: ``(B, ..., C)`` logits and ``(B,)`` labels → ``(B, ...)`` (specs/empl.md §3.2)."""
    index = labels.reshape(labels.shape + (1,) * (logits.dim() - labels.dim()))  # (B, 1, ..., 1)
    index = index.expand(logits.shape[:-1] + (1,))  # (B, ..., 1)
    return -logits.gather(-1, index).squeeze(-1)


def classifier_energy(logits: Tensor, kind: str, labels: Tensor | None = None, temperature: float = 1.0) -> Tensor:
    """The energy ``kind`` (``free`` or ``conditional``) of logits ``(B, ..., C)`` → ``(B, ...)``."""
    if kind == "free":
        return free_energy(logits, temperature)
    if kind == "conditional":
        if labels is None:
            raise ConfigError("energy = 'conditional' needs labels; it is a training-time energy (use 'free' at test)")
        return conditional_energy(logits, labels)
    raise ConfigError(f"energy = {kind!r}; expected one of {ENERGIES}")


def gaussian_prior(samples: Tensor, mean: Tensor, weight: float, scale: float | Tensor = 1.0) -> Tensor:
    """``(λ/2) · ‖(v − v̄) / r‖²`` per sample: ``(N, ...)`` samples, mean broadcastable → ``(N,)``."""
    if weight == 0:
        return samples.new_zeros(samples.shape[0])
    return 0.5 * weight * ((samples - mean) / scale).pow(2).flatten(1).sum(dim=-1)
