"""CoCoOp by hand-computed small cases: the meta-net's shift, per-image prompts, and its relation to CoOp."""

import pytest
import torch
import torch.nn.functional as F

from alignednorm.backbone.clip import ClipBackbone
from alignednorm.backbone.tiny import make_tiny_clip
from alignednorm.errors import ConfigError
from alignednorm.methods import create_method, make_config


@pytest.fixture(scope="module")
def backbone():
    return ClipBackbone(make_tiny_clip(seed=4, layers=2))


def test_meta_net_shape_and_zero_shift_is_coop(backbone):
    cocoop = create_method("cocoop", backbone)
    hidden = cocoop.meta_net[0]
    assert (hidden.in_features, hidden.out_features, cocoop.meta_net[2].out_features) == (32, 2, 64)  # E → E/16 → W
    assert cocoop.context.ctx.shape == (4, 64)  # "a photo of a": 4 tokens
    coop = create_method("coop", backbone, {"n_ctx": 4, "ctx_init": "a photo of a"})
    with torch.no_grad():
        coop.context.ctx.copy_(cocoop.context.ctx + 0.3)
        cocoop.context.ctx.add_(0.3)
        cocoop.meta_net[2].weight.zero_()
        cocoop.meta_net[2].bias.zero_()
    for m in (coop, cocoop):
        m.set_classnames(["cat", "dog", "bird"])
        m.eval()
    images = torch.randn(3, 3, 32, 32)
    assert torch.allclose(cocoop.predict(images), coop.predict(images), atol=1e-5)


def test_each_image_gets_its_own_shifted_prompts(backbone):
    cocoop = create_method("cocoop", backbone).eval()
    with torch.no_grad():
        for p in cocoop.meta_net.parameters():
            p.normal_(std=0.5)
    cocoop.set_classnames(["cat", "dog"])
    images = torch.randn(2, 3, 32, 32)
    logits = cocoop.predict(images)
    with torch.no_grad():
        f = F.normalize(backbone.encode_image(images).features, dim=-1)
        for b in range(2):  # the official per-image loop, by hand
            shifted = cocoop.context.ctx + cocoop.meta_net(f[b])  # the same bias on every context token
            text = cocoop.encode_prompts(cocoop.context.embeddings(shifted), cocoop.context.token_ids)
            expected = cocoop.logit_scale * f[b] @ F.normalize(text, dim=-1).t()
            assert torch.allclose(logits[b], expected, atol=1e-5)
    assert not torch.allclose(logits[0].softmax(-1), logits[1].softmax(-1))


def test_config_is_unified_with_class_at_the_end():
    with pytest.raises(ConfigError, match="CoCoOp uses a unified context"):
        make_config("cocoop", {"class_specific": True})
    with pytest.raises(ConfigError, match="meta_ratio = 0"):
        make_config("cocoop", {"meta_ratio": 0})
