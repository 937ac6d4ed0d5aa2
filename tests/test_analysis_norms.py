"""Norm analyses on vectors whose norms are known by hand."""

import math

import numpy as np
import pytest
import torch

from alignednorm.analysis.norms import (
    layer_norms,
    norm_ratio,
    prompt_norms_over_epochs,
    prompt_vector_norms,
    ratio_summary,
)
from alignednorm.errors import AlignedNormError, ConfigError, DataError


def test_norm_ratio_of_known_vectors():
    z_p = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    z_c = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    np.testing.assert_allclose(norm_ratio(z_p, z_c), [5.0, 0.5])
    np.testing.assert_allclose(norm_ratio(z_p.numpy(), z_c.numpy()), [5.0, 0.5])  # arrays work too


@pytest.mark.parametrize(("z_p", "z_c", "match"), [
    (torch.ones(3, 2), torch.ones(2, 2), "equal"),
    (torch.ones(2, 2), torch.tensor([[1.0, 0.0], [0.0, 0.0]]), "norm 0"),
    (torch.ones(2), torch.ones(2), "2-D"),
    (torch.full((2, 2), float("nan")), torch.ones(2, 2), "NaN"),
])
def test_norm_ratio_rejects_bad_input(z_p, z_c, match):
    with pytest.raises(DataError, match=match) as err:
        norm_ratio(z_p, z_c)
    assert isinstance(err.value, AlignedNormError) and "\n" not in str(err.value)


def test_ratio_summary_means_and_gap():
    s = ratio_summary(np.array([1.0, 2.0, 3.0]), torch.tensor([1.0, 1.0]))
    assert s["base"]["mean"] == pytest.approx(2.0) and s["new"]["mean"] == pytest.approx(1.0)
    assert s["gap"] == pytest.approx(1.0)
    assert s["base"]["std"] == pytest.approx(math.sqrt(2 / 3))  # population std
    assert s["base"]["median"] == 2.0 and s["base"]["n"] == 3 and s["new"]["std"] == 0.0
    with pytest.raises(DataError, match="empty"):
        ratio_summary(np.array([]), np.array([1.0]))


def _hidden() -> dict[int, torch.Tensor]:
    # Layer 1: [cls, patch, patch], no prompts. Layer 2: [cls, p1, p2, patch] with prompts at (1, 2).
    h1 = torch.tensor([[[3.0, 4.0], [1.0, 1.0], [2.0, 2.0]]]).repeat(2, 1, 1)  # (B=2, T=3, W=2)
    h2 = torch.tensor([[[6.0, 8.0], [1.0, 0.0], [0.0, 1.0], [9.0, 9.0]],
                       [[0.0, 2.0], [3.0, 0.0], [0.0, 3.0], [9.0, 9.0]]])  # (B=2, T=4, W=2)
    return {2: h2, 1: h1}


def test_layer_norms_of_known_tokens():
    n = layer_norms(_hidden(), {2: (1, 2)})
    np.testing.assert_array_equal(n["layers"], [1, 2])
    np.testing.assert_allclose(n["cls"], [5.0, (10.0 + 2.0) / 2])
    assert math.isnan(n["prompt_mean"][0]) and math.isnan(n["prompt_of_mean"][0])
    assert n["prompt_mean"][1] == pytest.approx((1.0 + 3.0) / 2)  # mean per-token norm over images and tokens
    # norm of the token mean: ||(0.5, 0.5)|| and ||(1.5, 1.5)||, averaged over the two images
    assert n["prompt_of_mean"][1] == pytest.approx((math.sqrt(0.5) + math.sqrt(4.5)) / 2)
    assert n["prompt_tokens"].shape == (2, 2) and np.isnan(n["prompt_tokens"][0]).all()
    np.testing.assert_allclose(n["prompt_tokens"][1], [2.0, 2.0])


def test_layer_norms_one_position_for_every_layer_and_errors():
    h = {1: torch.tensor([[[3.0, 4.0], [0.0, 2.0]]])}  # (1, 2, 2)
    n = layer_norms(h, (1, 1))
    assert n["prompt_mean"][0] == pytest.approx(2.0)
    with pytest.raises(DataError, match=r"start \+ count <= 2"):
        layer_norms(h, (1, 2))
    with pytest.raises(ConfigError, match="start, count"):
        layer_norms(h, {1: "x"})
    with pytest.raises(DataError, match="3-D"):
        layer_norms({1: torch.ones(2, 2)}, None)
    with pytest.raises(DataError, match="non-empty"):
        layer_norms({}, None)


def test_prompt_vector_norms_per_position():
    ctx = torch.tensor([[3.0, -4.0], [1.0, -1.0]])  # (n_ctx=2, W=2)
    np.testing.assert_allclose(prompt_vector_norms(ctx), [5.0, math.sqrt(2)])
    np.testing.assert_allclose(prompt_vector_norms(ctx, "l1"), [7.0, 2.0])
    np.testing.assert_allclose(prompt_vector_norms(ctx, "linf"), [4.0, 1.0])
    np.testing.assert_allclose(prompt_vector_norms(ctx, float("inf")), [4.0, 1.0])
    per_class = prompt_vector_norms(torch.stack([ctx, 2 * ctx]))  # (C=2, n_ctx=2, W)
    np.testing.assert_allclose(per_class, [[5.0, math.sqrt(2)], [10.0, 2 * math.sqrt(2)]])
    with pytest.raises(ConfigError, match="'l3'"):
        prompt_vector_norms(ctx, "l3")
    with pytest.raises(DataError, match="2-D or 3-D"):
        prompt_vector_norms(torch.ones(3))


def test_prompt_norms_over_epochs_averages_leading_axis():
    table = prompt_norms_over_epochs([np.array([1.0, 2.0]), np.array([[1.0, 2.0], [3.0, 4.0]])])
    np.testing.assert_allclose(table, [[1.0, 2.0], [2.0, 3.0]])
    with pytest.raises(DataError, match="one n_ctx"):
        prompt_norms_over_epochs([np.ones(2), np.ones(3)])
    with pytest.raises(DataError, match="empty"):
        prompt_norms_over_epochs([])
