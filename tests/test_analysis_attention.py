"""Attention analyses on a hand-made attention matrix."""

import math

import numpy as np
import pytest
import torch

from alignednorm.analysis.attention import class_attention_map, prompt_attention_share
from alignednorm.errors import ConfigError, DataError


def _attention() -> torch.Tensor:
    """(B=1, heads=2, T=5, T=5): class token 0, prompts at 1-2, patches 3-4."""
    head0 = torch.tensor([
        [0.1, 0.2, 0.3, 0.2, 0.2],  # class token: 0.5 on prompts
        [0.2, 0.2, 0.2, 0.2, 0.2],
        [0.2, 0.2, 0.2, 0.2, 0.2],
        [0.25, 0.25, 0.25, 0.25, 0.0],  # patch: 0.5 on prompts
        [0.0, 0.0, 0.1, 0.4, 0.5],  # patch: 0.1 on prompts
    ])
    head1 = torch.full((5, 5), 0.2)  # uniform: 0.4 on prompts everywhere
    return torch.stack([head0, head1]).unsqueeze(0)


def test_prompt_attention_share_hand_made():
    a = _attention()
    s = prompt_attention_share({7: a, 8: torch.cat([a, a])}, (1, 2))
    np.testing.assert_array_equal(s["layers"], [7, 8])
    np.testing.assert_allclose(s["cls"], [[0.5, 0.4], [0.5, 0.4]], atol=1e-6)
    np.testing.assert_allclose(s["patch"], [[0.3, 0.4], [0.3, 0.4]], atol=1e-6)  # mean of 0.5 and 0.1
    np.testing.assert_allclose(s["uniform"], [0.4, 0.4])


def test_prompt_attention_share_layer_without_prompts_is_nan():
    s = prompt_attention_share({1: _attention(), 2: _attention()}, {2: (1, 2)})
    assert np.isnan(s["cls"][0]).all() and np.isnan(s["patch"][0]).all() and s["uniform"][0] == 0.0
    np.testing.assert_allclose(s["cls"][1], [0.5, 0.4], atol=1e-6)


def test_prompt_attention_share_rejects_logits_and_bad_shapes():
    with pytest.raises(DataError, match="not logits"):
        prompt_attention_share({1: torch.randn(1, 2, 5, 5)}, (1, 2))
    with pytest.raises(DataError, match="self-attention"):
        prompt_attention_share({1: torch.full((1, 2, 5, 4), 0.25)}, (1, 2))
    with pytest.raises(DataError, match="start"):
        prompt_attention_share({1: _attention()}, (4, 2))
    with pytest.raises(DataError, match="head counts"):
        prompt_attention_share({1: _attention(), 2: _attention()[:, :1]}, (1, 2))
    with pytest.raises(ConfigError, match="cls_index=9"):
        prompt_attention_share({1: _attention()}, (1, 2), cls_index=9)


def test_class_attention_map_grid():
    row = torch.tensor([0.2, 0.1, 0.2, 0.3, 0.2])  # class token over [cls, 4 patches]
    a = torch.zeros(1, 5, 5)  # (heads=1, T, T)
    a[0] = row
    m = class_attention_map(a)
    assert m.shape == (1, 2, 2)
    np.testing.assert_allclose(m[0], [[0.1, 0.2], [0.3, 0.2]], atol=1e-7)


def test_class_attention_map_skips_prompts_and_averages_heads():
    a = torch.full((2, 3, 7, 7), 1 / 7)  # (B=2, heads=3, T=7, T=7): cls, 2 prompts, 4 patches
    a[:, 0, 0] = torch.tensor([0.0, 0.5, 0.1, 0.1, 0.1, 0.1, 0.1])
    m = class_attention_map(a, prompts=(1, 2), heads=[0])
    np.testing.assert_allclose(m, np.full((2, 2, 2), 0.1), atol=1e-7)
    mean = class_attention_map(a, prompts=(1, 2))
    np.testing.assert_allclose(mean, np.full((2, 2, 2), (0.1 + 2 / 7) / 3), atol=1e-6)
    with pytest.raises(DataError, match="perfect square"):
        class_attention_map(a)  # 6 non-class tokens
    with pytest.raises(ConfigError, match="heads"):
        class_attention_map(a, prompts=(1, 2), heads=[3])
    assert math.isclose(float(class_attention_map(a.numpy(), (1, 2)).sum()), float(mean.sum()), rel_tol=1e-6)
