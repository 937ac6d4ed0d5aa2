"""Uniformity (Eq. 13) and tolerance (Eq. 14) on points with known answers, and block-wise = dense."""

import math

import numpy as np
import pytest
import torch

from alignednorm.analysis.uniformity import DEFAULT_T, embedding_geometry, tolerance, uniformity
from alignednorm.errors import ConfigError, DataError


def _dense_uniformity(f: torch.Tensor, t: float) -> float:
    """The definition, with the full N x N matrix (reference for small N)."""
    f = torch.nn.functional.normalize(f.double(), dim=1)
    d2 = torch.cdist(f, f).pow(2)
    off = ~torch.eye(len(f), dtype=torch.bool)
    return math.log(torch.exp(-t * d2[off]).mean().item())


def _dense_tolerance(f: torch.Tensor, y: torch.Tensor) -> float:
    f = torch.nn.functional.normalize(f.double(), dim=1)
    same = (y[:, None] == y[None, :]) & ~torch.eye(len(f), dtype=torch.bool)
    return (f @ f.T)[same].mean().item()


def test_identical_points():
    f = torch.tensor([[0.6, 0.8]]).repeat(5, 1)
    assert uniformity(f) == pytest.approx(0.0, abs=1e-12)
    assert tolerance(f, torch.zeros(5, dtype=torch.long)) == pytest.approx(1.0)


def test_antipodal_points():
    v = torch.tensor([[1.0, 2.0, 2.0]])
    f = torch.cat([v, -v])  # ||f_i - f_j||^2 = 4 after normalisation
    assert uniformity(f) == pytest.approx(-4 * DEFAULT_T)
    assert uniformity(f, t=2.0) == pytest.approx(-8.0)
    assert uniformity(f, t=np.float32(2.0)) == pytest.approx(-8.0)  # numpy scalars are numbers too
    assert tolerance(f, torch.tensor([3, 3])) == pytest.approx(-1.0)


def test_hand_computed_small_cases():
    e = torch.eye(3)
    assert uniformity(e, t=1.0) == pytest.approx(-2.0)  # every pair at squared distance 2
    # e1, e1, e2: ordered pairs at d^2 = 0 (x2) and d^2 = 2 (x4) -> log((2 + 4 e^{-2t}) / 6)
    f = torch.stack([e[0], e[0], e[1]])
    assert uniformity(f, t=0.5) == pytest.approx(math.log((1 + 2 * math.exp(-1.0)) / 3))
    # labels [0, 0, 1, 1]: pairs (e1, e1) -> 1 and (e2, e3) -> 0: tolerance 0.5
    g = torch.stack([e[0], e[0], e[1], e[2]])
    assert tolerance(g, torch.tensor([0, 0, 1, 1])) == pytest.approx(0.5)


def test_large_t_stays_finite():
    # exp(-2000) underflows in float64; the log-sum-exp keeps the exact answer.
    assert uniformity(torch.eye(4), t=1000.0, block_size=3) == pytest.approx(-2000.0)


@pytest.mark.parametrize("block_size", [1, 4, 7, 36, 37, 500])
def test_blockwise_equals_dense(block_size):
    g = torch.Generator().manual_seed(0)
    f = torch.randn(37, 5, generator=g)
    assert uniformity(f, t=1.3, block_size=block_size) == pytest.approx(_dense_uniformity(f, 1.3), rel=1e-12)


def test_blockwise_equals_dense_larger():
    g = torch.Generator().manual_seed(1)
    f = torch.randn(1500, 16, generator=g) + 0.5  # not centred, so the pairs are not uniform
    assert uniformity(f, block_size=256) == pytest.approx(_dense_uniformity(f, DEFAULT_T), rel=1e-12)
    assert uniformity(f, t=2.0, block_size=333) == pytest.approx(_dense_uniformity(f, 2.0), rel=1e-12)


def test_tolerance_equals_pairwise_definition():
    g = torch.Generator().manual_seed(2)
    f = torch.randn(60, 8, generator=g)
    y = torch.randint(0, 7, (60,), generator=g)
    assert tolerance(f, y) == pytest.approx(_dense_tolerance(f, y), rel=1e-12)
    assert tolerance(3.0 * f, y.numpy()) == pytest.approx(tolerance(f, y), rel=1e-6)  # scale-free (float32 input)


def test_embedding_geometry_record():
    e = torch.eye(3).repeat(2, 1)
    rec = embedding_geometry(e, torch.tensor([0, 1, 2, 0, 1, 2]))
    assert rec["tolerance"] == pytest.approx(1.0) and rec["n"] == 6 and rec["classes"] == 3 and rec["t"] == 0.01
    assert rec["uniformity"] == pytest.approx(math.log((6 + 24 * math.exp(-0.02)) / 30))


@pytest.mark.parametrize(("call", "error", "match"), [
    (lambda: uniformity(torch.ones(1, 3)), DataError, "at least 2"),
    (lambda: uniformity(torch.ones(3, 3), t=0.0), ConfigError, "t=0.0"),
    (lambda: uniformity(torch.ones(3, 3), t=True), ConfigError, "t=True"),
    (lambda: uniformity(torch.ones(3, 3), block_size=0), ConfigError, "block_size=0"),
    (lambda: uniformity(torch.tensor([[1.0, 0.0], [0.0, 0.0]])), DataError, "row 1 has norm 0"),
    (lambda: tolerance(torch.eye(3), torch.tensor([0, 1, 2])), DataError, "at least 2 embeddings"),
    (lambda: tolerance(torch.eye(3), torch.tensor([0, 1])), DataError, r"\(3,\)"),
    (lambda: tolerance(torch.eye(3), torch.tensor([0.0, 1.0, 1.0])), DataError, "integer"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()
