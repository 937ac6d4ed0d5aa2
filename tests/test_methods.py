"""Every registered method, driven by the registry, with its default config on a 12-layer tiny CLIP.

A new method needs no edit here: only its saved keys go into ``method_state_keys.json``.
"""

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from alignednorm.backbone.clip import ClipBackbone
from alignednorm.backbone.tiny import make_tiny_clip
from alignednorm.errors import CheckpointError, ConfigError
from alignednorm.methods import RULES, StepState, create_method, get_method_class, list_methods, make_config

STATE_KEYS = json.loads((Path(__file__).parent / "method_state_keys.json").read_text())


@pytest.fixture(scope="module")
def backbone():
    return ClipBackbone(make_tiny_clip(seed=1, layers=12))


def _batch(n=4, classes=3):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 32, 32, generator=gen), torch.arange(n) % classes


@pytest.mark.parametrize("name", list_methods())
def test_forward_gradients_and_frozen_backbone(name, backbone):
    method = create_method(name, backbone)
    method.set_classnames(["red circle", "blue_square", "green star"])
    images, labels = _batch()
    for rule in RULES:
        assert method.predict(images, rule).shape == (4, 3)
    learnable = method.learnable_parameters()
    assert bool(learnable) == method.traits.learns
    if not learnable:
        return
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    with torch.no_grad():  # away from the init: zero-initialised LoRA factors give their partners zero gradients
        for p in learnable:
            p.add_(0.01 * torch.randn_like(p))
    method.train()
    terms = method.training_step((images, labels), StepState(epoch=0, max_epochs=2))
    assert terms["loss"].dim() == 0 and torch.isfinite(terms["loss"])
    terms["loss"].backward()
    assert all(p.grad is None for p in backbone.parameters())
    # Every learnable tensor gets a gradient, and a non-zero one (timm's num_params == num_grad).
    no_grad = [n for n, p in method.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert no_grad == []
    torch.optim.SGD(learnable, lr=1e-1).step()
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", list_methods())
def test_saved_keys_are_pinned(name, backbone):
    method = create_method(name, backbone)
    assert name in STATE_KEYS, f"add {name}'s saved keys to tests/method_state_keys.json"
    assert sorted(method.learnable_state_dict()) == STATE_KEYS[name]


@pytest.mark.parametrize("name", list_methods())
def test_prompt_trained_on_some_classes_predicts_on_others(name, backbone):
    method = create_method(name, backbone)
    with torch.no_grad():
        for p in method.learnable_parameters():
            p.add_(0.01 * torch.randn_like(p))
    method.set_trained_classnames(["cat", "dog", "bird"], "memory")
    other = create_method(name, backbone)
    other.load_learnable_state_dict(method.learnable_state_dict())
    other.set_trained_classnames(["cat", "dog", "bird"], "memory")
    images, _ = _batch()
    new_classes = ["car", "tree"]
    if get_method_class(name).traits.class_specific:
        with pytest.raises(CheckpointError, match="one prompt per class"):
            other.check_classnames(new_classes, "unseen")
        return
    other.check_classnames(new_classes, "unseen")
    for m in (method, other):
        m.set_classnames(new_classes)
        m.eval()
    assert torch.allclose(method.predict(images, "unseen"), other.predict(images, "unseen"), atol=1e-6)
    with pytest.raises(CheckpointError, match="'seen' rule"):
        other.check_classnames(new_classes, "seen")


@pytest.mark.parametrize("name", list_methods())
def test_config_yaml_roundtrip(name):
    config = make_config(name)
    yaml = OmegaConf.to_yaml(OmegaConf.structured(config))
    assert make_config(name, OmegaConf.to_container(OmegaConf.create(yaml))) == config


@pytest.mark.parametrize("name", list_methods())
def test_text_cache_is_invalidated(name, backbone):
    method = create_method(name, backbone).eval()
    images, _ = _batch()
    method.set_classnames(["cat", "dog"])
    first = method.predict(images)
    method.set_classnames(["cat", "dog", "bird"])  # a new label space
    assert method.predict(images).shape == (4, 3)
    if not method.learnable_parameters():
        return
    method.set_classnames(["cat", "dog"])
    state = {k: v + 0.05 * torch.randn_like(v) for k, v in method.learnable_state_dict().items()}
    method.load_learnable_state_dict(state)  # new learned values
    assert not torch.allclose(method.predict(images), first)


def test_bad_config_and_checkpoint_messages(backbone):
    with pytest.raises(ConfigError, match="unknown key 'prc_bta'.*did you mean 'prc_beta'"):
        make_config("mmrlpp", {"prc_bta": 0.5})
    with pytest.raises(ConfigError, match="unknown key 'prc_beta' for method 'mmrl'"):
        make_config("mmrl", {"prc_beta": 0.5})  # MMRL replaces tokens: it has no mixing weight
    with pytest.raises(ConfigError, match="reg_weight = -1.0 is out of range"):
        make_config("alignednorm", {"reg_weight": -1.0})
    with pytest.raises(ConfigError, match="reg_weight = nan; expected a finite number"):
        make_config("alignednorm", {"reg_weight": float("nan")})
    with pytest.raises(ConfigError, match="unknown method 'mmrlp'; did you mean mmrlpp"):
        get_method_class("mmrlp")
    method = create_method("mmrlpp", backbone, {"n_rep_tokens": 2, "rep_dim": 16})
    state = method.learnable_state_dict()
    state["rep_tokens"] = torch.zeros(9, 9)
    with pytest.raises(CheckpointError, match=r"wrong shapes \['rep_tokens: checkpoint \(9, 9\) vs model \(2, 16\)'\]"):
        method.load_learnable_state_dict(state)


def test_decoupled_and_unified_rules_and_overrides(backbone):
    images, _ = _batch()
    decoupled = create_method("mmrlpp", backbone, {"inference": "decoupled"})
    decoupled.set_classnames(["a", "b", "c"])
    decoupled.eval()
    out = decoupled(images, rule="unseen")
    assert torch.equal(out.logits, out.branches["logits_cls"])
    assert torch.equal(decoupled(images, rule="any").logits, out.branches["logits_cls"])
    assert torch.equal(decoupled(images, rule="seen").logits, out.branches["logits_fusion"])
    with decoupled.overridden({"inference": "unified"}):
        assert torch.equal(decoupled(images, rule="unseen").logits, out.branches["logits_fusion"])
    assert decoupled.config.inference == "decoupled"
    with pytest.raises(ConfigError, match="unknown key 'beta'"), decoupled.overridden({"beta": 0.1}):
        pass
    with pytest.raises(ConfigError, match="inference rule 'base' is not one of"):
        decoupled.predict(images, "base")


@pytest.mark.parametrize("name", list_methods())
def test_traits_have_their_declared_types_and_are_not_shadowed(name, backbone):
    """Framework traits live in one ``MethodTraits``: a method's own attributes cannot shadow them."""
    import dataclasses
    import typing

    from alignednorm.methods.base import MethodTraits

    cls = get_method_class(name)
    for traits in (cls.traits, create_method(name, backbone).traits):
        assert isinstance(traits, MethodTraits)
        hints = typing.get_type_hints(MethodTraits)
        for f in dataclasses.fields(MethodTraits):
            assert isinstance(getattr(traits, f.name), hints[f.name]), f.name


def test_traits_refuse_a_wrong_type():
    from alignednorm.methods.base import MethodTraits

    with pytest.raises(TypeError, match="frozen_image_features"):
        MethodTraits(frozen_image_features="yes")
