"""The analyses read what the backbone records: a tiny CLIP with prompts inserted at layer 2."""

import numpy as np
import torch

from alignednorm.analysis import class_attention_map, layer_norms, prompt_attention_share
from alignednorm.backbone.hooks import LayerPrompt, Trace


def test_trace_feeds_norms_and_attention(tiny_backbone):
    torch.manual_seed(0)
    tokens = 5.0 * torch.randn(2, tiny_backbone.vision_width)  # 2 prompt tokens, large norm
    trace = Trace(attention_layers=(2, 3))
    with torch.no_grad():
        tiny_backbone.encode_image(torch.randn(3, 3, 32, 32), hook=lambda layer: (
            LayerPrompt(tokens, "insert", at=1) if layer == 2 else None), trace=trace)
    positions = {2: (1, 2), 3: (1, 2)}  # layer 1 ran without prompts
    recorded = getattr(trace, "positions", None)
    if recorded:  # newer backbones record the positions themselves
        assert {k: tuple(v) for k, v in recorded.items() if v[1]} == positions

    norms = layer_norms(trace.hidden, positions)
    np.testing.assert_array_equal(norms["layers"], [1, 2, 3])
    assert np.isnan(norms["prompt_mean"][0]) and np.isfinite(norms["prompt_mean"][1:]).all()
    expected = trace.hidden[3][:, 1:3].norm(dim=-1).mean(dim=0).numpy()
    np.testing.assert_allclose(norms["prompt_tokens"][2], expected, rtol=1e-5)
    np.testing.assert_allclose(norms["cls"][2], trace.hidden[3][:, 0].norm(dim=-1).mean().item(), rtol=1e-5)

    share = prompt_attention_share(trace.attention, positions)
    heads = trace.attention[2].shape[1]
    assert share["cls"].shape == share["patch"].shape == (2, heads)
    assert ((share["cls"] >= 0) & (share["cls"] <= 1)).all() and ((share["patch"] >= 0) & (share["patch"] <= 1)).all()
    np.testing.assert_allclose(share["uniform"], [2 / 7, 2 / 7])  # 1 class + 2 prompts + 4 patches

    maps = class_attention_map(trace.attention[3], positions[3])
    assert maps.shape == (3, 2, 2) and (maps >= 0).all() and (maps.sum(axis=(1, 2)) <= 1 + 1e-6).all()
