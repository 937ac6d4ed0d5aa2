"""The lean block path computes open_clip's frozen blocks bit for bit: outputs and the input's gradient."""

from __future__ import annotations

import pytest
import torch
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

from alignednorm.backbone.blocks import lean_applies, run_block
from alignednorm.backbone.clip import ClipBackbone, causal_mask
from alignednorm.backbone.tiny import make_tiny_clip


def _blocks() -> dict[str, nn.Module]:
    with torch.random.fork_rng():  # the global generator is left as it was
        clip = make_tiny_clip(seed=3, layers=2, width=128, heads=2)
        torch.manual_seed(4)
        scaled = ResidualAttentionBlock(128, 4, ls_init_value=0.1, act_layer=nn.GELU, norm_layer=nn.LayerNorm)
    with torch.no_grad():  # float16 values, as OpenAI's checkpoints hold: their products' rounding shows row order
        for module in (clip, scaled):
            for param in module.parameters():
                param.copy_(param.half().float())
                param.requires_grad_(False)  # a backbone is frozen (and a frozen weight's product is what shows it)
    return {"vision (QuickGELU)": clip.visual.transformer.resblocks[1],
            "text (QuickGELU)": clip.transformer.resblocks[0], "LayerScale, GELU, nn.LayerNorm": scaled}


def _run(fn, x0: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x0.clone().requires_grad_(True)
    out = fn(x)
    return out.detach(), torch.autograd.grad((out * weights).sum(), [x])[0]


@pytest.mark.parametrize("name", list(_blocks()))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_lean_block_equals_open_clip_bitwise(name, causal, training):
    block = _blocks()[name].train(training)
    g = torch.Generator().manual_seed(0)
    x0, weights = torch.randn(4, 19, 128, generator=g), torch.randn(4, 19, 128, generator=g)
    mask = causal_mask(19, x0.device, x0.dtype) if causal else None
    assert lean_applies(block, x0.clone().requires_grad_(True), mask)
    ours = _run(lambda x: ClipBackbone._block(block, x, mask, 1, None), x0, weights)
    theirs = _run(lambda x: block(x, attn_mask=mask), x0, weights)
    assert torch.equal(ours[0], theirs[0])
    assert torch.equal(ours[1], theirs[1])  # what flows back to the prompts
    with torch.no_grad():  # evaluation: the modules' fused inference path where torch takes it, else the lean one
        fused = not training and not causal
        assert lean_applies(block, x0, mask) is not fused
        assert torch.equal(ClipBackbone._block(block, x0, mask, 1, None), block(x0, attn_mask=mask))
        if not fused:
            assert torch.equal(run_block(block, x0, mask)[0], block(x0, attn_mask=mask))


def test_lean_block_declines_what_it_does_not_reproduce():
    with torch.random.fork_rng():
        cross = ResidualAttentionBlock(128, 4, is_cross_attention=True)
        plain = ResidualAttentionBlock(128, 4)
        x = torch.randn(2, 5, 128, requires_grad=True)
    assert not lean_applies(cross, x, None)
    assert not lean_applies(plain, x, torch.ones(5, 5, dtype=torch.bool).triu(1))  # MHA turns it to -inf
    assert lean_applies(plain, x, None)
