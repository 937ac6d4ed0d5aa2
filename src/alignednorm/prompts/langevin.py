"""Stochastic-gradient Langevin dynamics on prompt tensors (specs/empl.md §3.3), reusable by any sampler.

K chains start near a mean ``v̄`` and follow the energy's gradient plus Gaussian noise:

    v⁰ = v̄ + σ₀ r ε,                          ε ~ N(0, I)            (§3.3, init)
    v^{t+1} = v^t − (η r² / 2) ∇_v E(v^t) + ν √η r ξ,   ξ ~ N(0, I)  (§3.3, one step)

``r`` is a scale (EMPL passes the RMS entry of ``v̄``): with it the update is plain Langevin in the
units ``u = v / r`` (``Δu = −(η/2) ∇_u E + √η ξ``), so η, σ₀ mean the same for CLIPs whose token
embeddings differ in size. ``ν`` scales the noise (1: SGLD; 0: gradient descent on the energy).

Gradients: the energy's gradient is always computed (under :func:`torch.enable_grad`, also inside
``torch.no_grad()`` evaluation) with ``torch.autograd.grad``, which returns it without touching any
parameter's ``.grad``. With ``create_graph=False`` it is taken at a detached copy of ``v^t`` and used
as a constant, so samples stay differentiable in ``v̄`` only along the identity path (first-order,
like first-order MAML) and a detached ``v⁰`` gives detached samples; with ``create_graph=True`` the
steps are differentiated through (second order: a double backward through the energy).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from alignednorm.errors import ConfigError


@dataclass
class LangevinResult:
    """Samples and the energy path.

    Attributes:
        samples: ``(N, ...)`` the chains after the last step.
        energies: ``(S, N)`` detached energy of every chain at the start of each step (``(0, N)`` for S = 0).
    """

    samples: Tensor
    energies: Tensor


def gaussian_noise(like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard normal noise shaped like ``like``, from ``generator`` when given (reproducible), else torch's RNG."""
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)


def init_chains(mean: Tensor, num: int, init_noise: float, scale: float | Tensor = 1.0,
                generator: torch.Generator | None = None) -> Tensor:
    """``num`` chain starts ``v⁰ = v̄ + σ₀ r ε``: ``(...)`` mean → ``(num, ...)`` (specs/empl.md §3.3)."""
    start = mean.unsqueeze(0).expand((num,) + mean.shape)  # (N, ...)
    if init_noise == 0:
        return start.clone()
    return start + init_noise * scale * gaussian_noise(start, generator)


def langevin_step(v: Tensor, grad: Tensor, step_size: float, noise: Tensor | None = None,
                  scale: float | Tensor = 1.0, noise_scale: float = 1.0) -> Tensor:
    """One update ``v − (η r²/2) ∇E + ν √η r ξ`` (specs/empl.md §3.3); ``noise=None`` means ξ = 0."""
    out = v - 0.5 * step_size * scale**2 * grad
    if noise is not None and noise_scale:
        out = out + noise_scale * math.sqrt(step_size) * scale * noise
    return out


def langevin_sample(energy: Callable[[Tensor], Tensor], init: Tensor, steps: int, step_size: float, *,
                    noise_scale: float = 1.0, scale: float | Tensor = 1.0, create_graph: bool = False,
                    generator: torch.Generator | None = None) -> LangevinResult:
    """Run ``steps`` Langevin updates of the chains ``init`` ``(N, ...)``.

    Args:
        energy: maps chains ``(N, ...)`` to their energies ``(N,)`` (chains must not interact: the
            gradient of the sum is then every chain's own gradient).
        init: the chain starts, e.g. from :func:`init_chains`.
        steps, step_size: S and η.
        noise_scale: ν (0: no noise is drawn).
        scale: r, the unit of the update (a number or a 0-dim tensor, used as a constant).
        create_graph: differentiate through the gradient (second order); needs ``init`` in a graph.
        generator: the noise source (seeded: reproducible samples); ``None``: torch's global RNG.
    """
    if steps < 0 or step_size < 0 or noise_scale < 0:
        raise ConfigError(f"langevin steps = {steps}, step_size = {step_size}, noise_scale = {noise_scale}; "
                          "expected non-negative values")
    if torch.is_inference_mode_enabled():
        raise ConfigError("Langevin sampling needs gradients; call it under torch.no_grad(), "
                          "not torch.inference_mode()")
    scale = scale.detach() if isinstance(scale, Tensor) else scale
    second_order = create_graph and init.requires_grad
    # Fused attention kernels have no second derivative: differentiate through the math kernel.
    def kernels():
        return sdpa_kernel(SDPBackend.MATH) if second_order else contextlib.nullcontext()

    v, energies = init, []
    for _ in range(steps):
        with torch.enable_grad(), kernels():
            point = v if second_order else v.detach().requires_grad_(True)
            e = energy(point)  # (N,)
            (grad,) = torch.autograd.grad(e.sum(), point, create_graph=second_order)
        energies.append(e.detach())
        noise = gaussian_noise(v, generator) if noise_scale else None
        v = langevin_step(v, grad, step_size, noise, scale, noise_scale)
    stacked = torch.stack(energies) if energies else init.new_zeros(0, init.shape[0])
    return LangevinResult(v, stacked)
