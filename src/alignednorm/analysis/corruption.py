"""Nemesis's corruption experiments on a trained CoOp-style context (Fu et al., ICLR 2024, §2, §3.2, A.2.3).

One position j of the learned context is corrupted at a time and the test accuracy is measured:

* **REPLACE**: v_j ← a fresh zero-mean Gaussian vector of *variance* ``var`` (the paper's 0, 0.001,
  0.01, 0.1, 0.5; σ = √var, var 0 is the zero vector). The official ``coop_crt.py`` passes the factor
  as the standard deviation and hard-codes width 512; we follow the paper and the backbone's width.
  A class-specific context gets a fresh vector per class.
* **RESCALE**: v_j ← s · v_j (0.001, 0.01, 0.1, 0.5 shrink the norm, 2 enlarges it).

The **Low-Norm Effect** occurrence count of an operation and factor is the number of positions
whose corrupted model is *more* accurate than the uncorrupted one (Tables A2 / A3); Figure 1(b)
sums it over the four shrinking RESCALE factors (0..4·L). Over seeds the default is "count per
seed, then the mean" (:func:`mean_low_norm_frequency`).

Works for any method with a :class:`~alignednorm.prompts.text_context.TextContext` named
``context`` and CoOp's ``encode_prompts`` / ``cosine_logits`` (``coop``, ``nemesis``). Image
features are computed once (the image tower is frozen); only the text side is re-encoded.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from alignednorm.errors import ConfigError

REPLACE_VARIANCES = (0.0, 0.001, 0.01, 0.1, 0.5)
RESCALE_FACTORS = (0.001, 0.01, 0.1, 0.5, 2.0)
SHRINKING_FACTORS = (0.001, 0.01, 0.1, 0.5)
OPERATIONS = ("replace", "rescale")


@dataclass
class CorruptionResult:
    """Accuracy (%) with each single position corrupted by one operation and factor."""

    operation: str
    factor: float
    baseline: float
    accuracy: list[float]

    @property
    def change(self) -> list[float]:
        """Accuracy change per position against the uncorrupted context (positive: the corruption helped)."""
        return [a - self.baseline for a in self.accuracy]

    @property
    def low_norm_count(self) -> int:
        """Positions whose corrupted model beats the original (the Low-Norm Effect's occurrences)."""
        return sum(a > self.baseline for a in self.accuracy)


def corrupt_context(ctx: Tensor, position: int, operation: str, factor: float,
                    generator: torch.Generator | None = None) -> Tensor:
    """A copy of ``ctx`` (``(L, W)`` or ``(C, L, W)``) with ``position`` replaced or rescaled."""
    out = ctx.detach().clone()
    if operation == "rescale":
        out[..., position, :] *= factor
    elif operation == "replace":
        if factor < 0:
            raise ConfigError(f"REPLACE variance = {factor}; expected a value >= 0")
        shape = out[..., position, :].shape
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        out[..., position, :] = (math.sqrt(factor) * noise).to(out)
    else:
        raise ConfigError(f"corruption operation = {operation!r}; expected one of {OPERATIONS}")
    return out


@torch.no_grad()
def image_features(method, batches: Iterable[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Unnormalised image features ``(N, E)`` and labels ``(N,)`` of every batch (frozen image tower)."""
    device = method.context.ctx.device
    features, labels = [], []
    for images, y in batches:
        features.append(method.backbone.encode_image(images.to(device)).features)
        labels.append(y.to(device))
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def accuracy_with_context(method, features: Tensor, labels: Tensor, ctx: Tensor | None = None) -> float:
    """Top-1 accuracy (%) of the method's cosine logits with the context ``ctx`` (default: its own)."""
    text = method.encode_prompts(method.context.embeddings(ctx), method.context.token_ids)
    logits = method.cosine_logits(features, text)[0]
    return float((logits.argmax(dim=-1) == labels).float().mean() * 100)


def corruption_sweep(method, batches: Iterable[tuple[Tensor, Tensor]],
                     replace_variances: Sequence[float] = REPLACE_VARIANCES,
                     rescale_factors: Sequence[float] = RESCALE_FACTORS, seed: int = 0) -> list[CorruptionResult]:
    """Corrupt each position with each operation and factor; one :class:`CorruptionResult` per (operation, factor).

    The method's own context is never modified. REPLACE draws from a generator seeded with ``seed``.
    """
    was_training = method.training
    method.eval()
    try:
        features, labels = image_features(method, batches)
        baseline = accuracy_with_context(method, features, labels)
        ctx, generator = method.context.ctx.detach(), torch.Generator().manual_seed(seed)
        results = []
        for operation, factors in (("replace", replace_variances), ("rescale", rescale_factors)):
            for factor in factors:
                accuracy = [accuracy_with_context(method, features, labels,
                                                  corrupt_context(ctx, j, operation, factor, generator))
                            for j in range(method.context.n_ctx)]
                results.append(CorruptionResult(operation, float(factor), baseline, accuracy))
        return results
    finally:
        method.train(was_training)


def low_norm_frequency(results: Sequence[CorruptionResult], factors: Sequence[float] = SHRINKING_FACTORS) -> int:
    """Figure 1(b): the Low-Norm Effect counts summed over the shrinking RESCALE factors."""
    return sum(r.low_norm_count for r in results if r.operation == "rescale" and r.factor in factors)


def mean_low_norm_frequency(per_seed: Sequence[Sequence[CorruptionResult]],
                            factors: Sequence[float] = SHRINKING_FACTORS) -> float:
    """The frequency counted per seed, then averaged over seeds (the default reading of the paper)."""
    if not per_seed:
        raise ConfigError("no seeds given to average the Low-Norm Effect frequency over")
    return sum(low_norm_frequency(r, factors) for r in per_seed) / len(per_seed)


def format_table(results: Sequence[CorruptionResult]) -> str:
    """Markdown in the shape of the paper's Tables A2 / A3: one row per operation and factor, the
    accuracy change per position, and the number of positions that beat the original."""
    if not results:
        return ""
    positions = len(results[0].accuracy)
    header = "| operation | factor | " + " | ".join(f"v{j + 1}" for j in range(positions)) + " | count |"
    rows = [header, "|" + "---|" * (positions + 3)]
    rows.append("| original | - | " + " | ".join(f"{results[0].baseline:.2f}" for _ in range(positions)) + " | - |")
    for r in results:
        arrow = "↑" if r.operation == "rescale" and r.factor > 1 else "↓" if r.operation == "rescale" else ""
        cells = " | ".join(f"{c:+.2f}" for c in r.change)
        rows.append(f"| {r.operation}{arrow} | {r.factor:g} | {cells} | {r.low_norm_count} |")
    return "\n".join(rows)
