"""Every registered method, driven by the registry, on a tiny CLIP."""

import dataclasses

import pytest
import torch
from omegaconf import OmegaConf

from alignednorm.backbone.clip import ClipBackbone
from alignednorm.backbone.tiny import make_tiny_clip
from alignednorm.errors import CheckpointError, ConfigError
from alignednorm.methods import create_method, get_method_class, list_methods, make_config

SMALL = {"rep_layers": [2, 3], "n_rep_tokens": 2, "rep_dim": 16, "proj_lora_dim": 4, "res_lora_dim": 2}


def _small_config(name):
    fields = {f.name for f in dataclasses.fields(get_method_class(name).Config)}
    return {k: v for k, v in SMALL.items() if k in fields}


@pytest.fixture(scope="module")
def backbone():
    return ClipBackbone(make_tiny_clip(seed=1, layers=3))


def _batch(n=4, classes=3):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 32, 32, generator=gen), torch.arange(n) % classes


@pytest.mark.parametrize("name", list_methods())
def test_method_contract(name, backbone):
    method = create_method(name, backbone, _small_config(name))
    method.set_classnames(["red circle", "blue_square", "green star"], "a photo of a {}.")
    images, labels = _batch()
    for subset in ("base", "new", "all"):
        assert method.predict(images, subset).shape == (4, 3)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    learnable = method.learnable_parameters()
    if not learnable:
        return
    method.train()
    terms = method.training_step((images, labels))
    assert terms["loss"].dim() == 0 and torch.isfinite(terms["loss"])
    terms["loss"].backward()
    # Gradients reach learnable parameters only; at least one gets a non-zero gradient.
    assert all(p.grad is None for p in backbone.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in learnable)
    torch.optim.AdamW(learnable, lr=1e-2).step()
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", list_methods())
def test_save_load_with_other_classnames(name, backbone):
    method = create_method(name, backbone, _small_config(name))
    with torch.no_grad():
        for p in method.learnable_parameters():
            p.add_(0.01 * torch.randn_like(p))
    state = method.learnable_state_dict()
    assert all("backbone" not in k for k in state)
    other = create_method(name, backbone, _small_config(name))
    other.load_learnable_state_dict(state)
    images, _ = _batch()
    for m in (method, other):
        m.set_classnames(["cat", "dog"], "a photo of a {}.")
        m.eval()
    assert torch.allclose(method.predict(images, "new"), other.predict(images, "new"), atol=1e-6)


@pytest.mark.parametrize("name", list_methods())
def test_config_yaml_roundtrip(name):
    config = make_config(name, _small_config(name))
    yaml = OmegaConf.to_yaml(OmegaConf.structured(config))
    back = make_config(name, OmegaConf.to_container(OmegaConf.create(yaml)))
    assert back == config


def test_bad_config_and_checkpoint_messages(backbone):
    with pytest.raises(ConfigError, match="unknown key 'prc_bta'.*did you mean 'prc_beta'"):
        make_config("mmrlpp", {"prc_bta": 0.5})
    with pytest.raises(ConfigError, match="reg_weight = -1.0 is out of range"):
        make_config("alignednorm", {"reg_weight": -1.0})
    with pytest.raises(ConfigError, match="unknown method 'mmrlp'; did you mean mmrlpp"):
        get_method_class("mmrlp")
    method = create_method("mmrlpp", backbone, _small_config("mmrlpp"))
    state = method.learnable_state_dict()
    state["rep_tokens"] = torch.zeros(9, 9)
    with pytest.raises(CheckpointError, match=r"wrong shapes \['rep_tokens: checkpoint \(9, 9\) vs model \(2, 16\)'\]"):
        method.load_learnable_state_dict(state)


def test_decoupled_and_unified_rules(backbone):
    images, _ = _batch()
    cfg = _small_config("mmrlpp")
    decoupled = create_method("mmrlpp", backbone, {**cfg, "inference": "decoupled"})
    decoupled.set_classnames(["a", "b", "c"])
    decoupled.eval()
    out = decoupled(images, subset="new")
    assert torch.equal(out.logits, out.branches["logits_cls"])
    assert torch.equal(decoupled(images, subset="base").logits, out.branches["logits_fusion"])
    unified = create_method("mmrlpp", backbone, {**cfg, "inference": "unified"})
    unified.load_learnable_state_dict(decoupled.learnable_state_dict())
    unified.set_classnames(["a", "b", "c"])
    unified.eval()
    assert torch.allclose(unified(images, subset="new").logits, out.branches["logits_fusion"])
