"""Seeded t-SNE of base and new embeddings."""

import logging

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from alignednorm.analysis.tsne import tsne_embed
from alignednorm.errors import ConfigError, DataError


def _clusters(n: int, offset: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    centres = torch.eye(6)[labels + int(offset)] * 5.0
    return centres + 0.1 * torch.randn(n, 6, generator=g), labels


def test_small_n_reduces_perplexity_and_reports_it(caplog):
    base, yb = _clusters(10, 0, 0)
    new, yn = _clusters(8, 2, 1)
    with caplog.at_level(logging.WARNING, logger="alignednorm.analysis.tsne"):
        out = tsne_embed(base, new, yb, yn + 2, seed=3, max_iter=250)
    assert out["coords"].shape == (18, 2) and np.isfinite(out["coords"]).all()
    assert float(out["perplexity"]) == pytest.approx(17 / 3) and float(out["requested_perplexity"]) == 30.0
    assert "perplexity 30" in caplog.text
    assert list(out["group"]) == ["base"] * 10 + ["new"] * 8
    np.testing.assert_array_equal(out["labels"], np.concatenate([yb.numpy(), yn.numpy() + 2]))
    again = tsne_embed(base, new, yb, yn + 2, seed=3, max_iter=250)
    np.testing.assert_allclose(again["coords"], out["coords"])  # seeded


def test_subsampling_labels_default_and_empty_group():
    base, _ = _clusters(12, 0, 0)
    out = tsne_embed(base.numpy(), np.zeros((0, 6)), perplexity=3.0, max_points=7, max_iter=250)
    assert out["coords"].shape == (7, 2) and (out["labels"] == -1).all() and (out["group"] == "base").all()
    assert float(out["perplexity"]) == 3.0 and len(set(out["index"].tolist())) == 7


def test_bad_input():
    base, _ = _clusters(4, 0, 0)
    with pytest.raises(DataError, match="at least 3"):
        tsne_embed(base[:1], base[:1])
    with pytest.raises(DataError, match="dimension"):
        tsne_embed(base, torch.ones(3, 4))
    with pytest.raises(ConfigError, match="perplexity=0"):
        tsne_embed(base, base, perplexity=0)
    with pytest.raises(ConfigError, match="max_iter=10"):
        tsne_embed(base, base, max_iter=10)
