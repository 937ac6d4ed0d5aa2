"""Nemesis's corruption experiments: REPLACE variance → σ, RESCALE exactness, Low-Norm Effect counting."""

import math

import pytest
import torch

from alignednorm.analysis.corruption import (
    CorruptionResult,
    corrupt_context,
    corruption_sweep,
    format_table,
    low_norm_frequency,
    mean_low_norm_frequency,
)
from alignednorm.errors import ConfigError
from alignednorm.methods import create_method


def test_rescale_is_exact_and_leaves_the_input():
    ctx = torch.randn(4, 8)
    out = corrupt_context(ctx, 2, "rescale", 0.1)
    assert torch.equal(out[2], ctx[2] * 0.1) and torch.equal(out[[0, 1, 3]], ctx[[0, 1, 3]])
    csc = torch.randn(3, 4, 8)
    assert torch.equal(corrupt_context(csc, 1, "rescale", 2.0)[:, 1], csc[:, 1] * 2.0)


def test_replace_uses_the_variance():
    ctx = torch.zeros(2, 20_000)
    out = corrupt_context(ctx, 1, "replace", 0.01, torch.Generator().manual_seed(0))
    assert float(out[1].std()) == pytest.approx(math.sqrt(0.01), rel=0.03) and not out[0].any()
    assert not corrupt_context(torch.ones(2, 5), 0, "replace", 0.0)[0].any()  # variance 0: the zero vector
    csc = corrupt_context(torch.zeros(3, 2, 1000), 0, "replace", 0.5, torch.Generator().manual_seed(1))
    assert not torch.equal(csc[0, 0], csc[1, 0])  # a fresh vector per class
    with pytest.raises(ConfigError, match="operation = 'drop'"):
        corrupt_context(ctx, 0, "drop", 1.0)


def test_low_norm_counting_on_a_fixed_table():
    results = [CorruptionResult("rescale", 0.5, 50.0, [51.0, 50.0, 49.0]),
               CorruptionResult("rescale", 0.1, 50.0, [52.0, 53.0, 10.0]),
               CorruptionResult("rescale", 2.0, 50.0, [60.0, 60.0, 60.0]),  # enlarging: not in Figure 1(b)
               CorruptionResult("replace", 0.1, 50.0, [55.0, 40.0, 40.0])]
    assert [r.low_norm_count for r in results] == [1, 2, 3, 1]
    assert low_norm_frequency(results) == 3
    assert mean_low_norm_frequency([results, results[:1]]) == 2.0
    table = format_table(results)
    assert "| rescale↓ | 0.5 | +1.00 | +0.00 | -1.00 | 1 |" in table and "rescale↑ | 2" in table


def test_sweep_on_a_tiny_coop(tiny_backbone):
    torch.manual_seed(0)
    method = create_method("coop", tiny_backbone, {"n_ctx": 3})
    method.set_classnames(["red circle", "blue square", "green star"])
    before = method.context.ctx.detach().clone()
    batches = [(torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2]))]
    results = corruption_sweep(method, batches, replace_variances=(0.0,), rescale_factors=(1.0, 0.5))
    assert torch.equal(method.context.ctx.detach(), before)
    assert [(r.operation, r.factor) for r in results] == [("replace", 0.0), ("rescale", 1.0), ("rescale", 0.5)]
    assert all(len(r.accuracy) == 3 for r in results)
    # Rescaling by 1 changes nothing; the baseline is the method's own accuracy.
    method.eval()
    with torch.no_grad():
        acc = float((method.predict(batches[0][0]).argmax(-1) == batches[0][1]).float().mean() * 100)
    assert results[1].accuracy == [acc] * 3 and results[1].baseline == acc
