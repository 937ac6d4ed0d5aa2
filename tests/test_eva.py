"""EVA-CLIP (timm ``Eva`` image tower, CLIP's text tower under ``model.text``) run block by block.

Every open_clip EVA config is built as open_clip builds it (``create_model``: ``CustomTextCLIP``
around ``TimmModel``), with its own timm trunk at tiny width and depth: a tiny entry point of the
same timm function is registered for the test and removed after it, like the tiny open_clip config.
"""

import functools
import logging
import socket

import open_clip
import pytest
import timm
import torch
from open_clip import factory as open_clip_factory
from timm.layers import apply_rot_embed_cat
from timm.models import _registry as timm_registry

from alignednorm.backbone import loading
from alignednorm.backbone.clip import ClipBackbone
from alignednorm.backbone.eva import sequence_rope, tower_problems
from alignednorm.backbone.hooks import LayerPrompt, PromptState, Trace
from alignednorm.backbone.loading import load_clip
from alignednorm.clip_names import backbone_source
from alignednorm.errors import CheckpointError
from alignednorm.methods import StepState, create_method, list_methods

TINY_TRUNK = {"img_size": 32, "patch_size": 16, "embed_dim": 64, "num_heads": 2}
EVA_CONFIGS = sorted(n for n in open_clip.list_models()
                     if (open_clip.get_model_config(n)["vision_cfg"].get("timm_model_name") in loading.EVA_TRUNKS))


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Nothing here may download: building timm towers and loading files stay on this machine."""

    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def register_tiny_eva(monkeypatch, name: str, depth: int = 3, **trunk_overrides) -> str:
    """Register ``tiny-<name>``: open_clip config ``name`` at width 64 and ``depth`` blocks per tower;
    returns the name."""
    cfg = open_clip.get_model_config(name)
    trunk = cfg["vision_cfg"]["timm_model_name"]
    tiny_trunk = f"test_tiny_{trunk}"
    entry = functools.partial(timm.models.model_entrypoint(trunk), depth=depth, **TINY_TRUNK, **trunk_overrides)
    monkeypatch.setitem(timm_registry._model_entrypoints, tiny_trunk, entry)
    monkeypatch.setattr(loading, "EVA_TRUNKS", (*loading.EVA_TRUNKS, tiny_trunk))
    cfg["embed_dim"] = 32
    cfg["vision_cfg"].update(image_size=32, timm_model_name=tiny_trunk)
    cfg["text_cfg"].update(width=64, heads=2, layers=depth)
    monkeypatch.setitem(open_clip_factory._MODEL_CONFIGS, f"tiny-{name}", cfg)
    return f"tiny-{name}"


def build_random(name: str, seed: int = 0) -> torch.nn.Module:
    """open_clip's own build of ``name`` with random weights; biases, norms, embeddings and the head
    made non-trivial."""
    torch.manual_seed(seed)
    model = open_clip.create_model(name).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param.dim() == 1 or param_name.endswith(("pos_embed", "cls_token")):
                param.add_(0.05 * torch.randn_like(param))
        head = model.visual.trunk.head
        head.weight.normal_(std=head.in_features**-0.5)  # timm starts it near zero
    return model


def _inputs(backbone, batch=2):
    images = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return images, backbone.tokenize(["a photo of a cat.", "x"][:batch] + ["a red circle"] * (batch - 2))


@pytest.fixture
def eva02(monkeypatch):
    """A tiny random EVA02-B-16 (RoPE, SwiGLU, LayerNorm inside attention) in a ClipBackbone."""
    model = build_random(register_tiny_eva(monkeypatch, "EVA02-B-16"))
    return ClipBackbone(model)


@pytest.mark.parametrize("name", EVA_CONFIGS)
def test_every_eva_config_runs_block_by_block_like_open_clip(name, monkeypatch):
    model = build_random(register_tiny_eva(monkeypatch, name))
    assert loading.model_problems(model) == []
    backbone = ClipBackbone(model)
    assert backbone.is_eva and backbone.is_vit and backbone.vision_layers == 3 and backbone.vision_width == 64
    images, tokens = _inputs(backbone)
    with torch.no_grad():
        assert torch.allclose(backbone.encode_image(images).features, model.encode_image(images), atol=1e-5)
        assert torch.allclose(backbone.encode_text(tokens).features, model.encode_text(tokens), atol=1e-5)


def test_layer_scale_is_applied(monkeypatch):
    model = build_random(register_tiny_eva(monkeypatch, "EVA02-B-16", init_values=0.3))
    images, _ = _inputs(ClipBackbone(model))
    with torch.no_grad():
        assert torch.allclose(ClipBackbone(model).encode_image(images).features, model.encode_image(images), atol=1e-5)


def test_prompts_count_as_prefix_tokens_and_patches_keep_their_rotary_rows(eva02):
    """Against timm's own attention told that class token + prompts are its prefix tokens."""
    import copy

    images, _ = _inputs(eva02)
    n = 3
    prompts = torch.randn(n, 64, generator=torch.Generator().manual_seed(2))
    trunk = copy.deepcopy(eva02.model.visual.trunk)
    for block in trunk.blocks:
        block.attn.num_prefix_tokens = 1 + n  # no rotation for them, the grid's rotation for every patch
    with torch.no_grad():
        x = trunk.norm_pre(trunk._pos_embed(trunk.patch_embed(images))[0])
        x = torch.cat([x[:, :1], prompts.expand(2, -1, -1), x[:, 1:]], dim=1)
        for block in trunk.blocks:
            x = block(x, rope=trunk.rope.get_embed())
        expected = trunk.head(trunk.norm(x)[:, 0])
        out = eva02.encode_image(images, hook=lambda layer: LayerPrompt(prompts, "insert", 1) if layer == 1 else None)
    assert (out.prompt_start, out.prompt_count) == (1, n)
    assert torch.allclose(out.hidden, x, atol=1e-5) and torch.allclose(out.features, expected, atol=1e-5)


def test_sequence_rope_rows():
    patch_rope = torch.randn(4, 8)
    identity = torch.tensor([0.0] * 4 + [1.0] * 4)
    plain = sequence_rope(patch_rope, PromptState())
    assert torch.equal(plain[0], identity) and torch.equal(plain[1:], patch_rope)
    after_class = sequence_rope(patch_rope, PromptState(start=1, n=2))
    assert torch.equal(after_class[:3], identity.expand(3, -1)) and torch.equal(after_class[3:], patch_rope)
    appended = sequence_rope(patch_rope, PromptState(start=5, n=2))  # MaPLe appends after the patches
    assert torch.equal(appended[1:5], patch_rope) and torch.equal(appended[5:], identity.expand(2, -1))
    q = torch.randn(2, 2, 7, 4)  # the identity rotation leaves queries and keys exactly as they are
    assert torch.equal(apply_rot_embed_cat(q, appended)[:, :, 5:], q[:, :, 5:])


def test_trace_prefix_and_recorded_attention(eva02):
    images, _ = _inputs(eva02)
    prompts = torch.randn(2, 64)
    hook = lambda layer: LayerPrompt(prompts, "insert", 1) if layer == 2 else None
    trace = Trace(attention_layers=(1, 2, 3), record_attn_out=True)
    with torch.no_grad():
        traced = eva02.encode_image(images, hook=hook, trace=trace)
        plain = eva02.encode_image(images, hook=hook)
        resumed = eva02.encode_image(prefix=eva02.image_prefix(images, 2), hook=hook)
    # probabilities written out (recorded) and fused attention (not recorded) give the same features
    assert torch.allclose(traced.features, plain.features, atol=1e-5)
    assert torch.allclose(resumed.features, plain.features, atol=1e-6)
    assert torch.equal(eva02.pool_image(traced.tokens), traced.features)
    assert trace.positions == {1: (0, 0), 2: (1, 2), 3: (1, 2)}
    assert trace.attention[3].shape == (2, 2, 7, 7) and trace.attn_out[2].shape == (2, 7, 64)
    assert torch.allclose(trace.attention[3].sum(-1), torch.ones(2, 2, 7), atol=1e-5)
    assert torch.equal(trace.hidden[3], traced.hidden)


def test_custom_text_tower_with_a_vit_matches_open_clip():
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16},
           "text_cfg": {"width": 64, "heads": 1, "layers": 2, "proj_bias": True}}  # nn.Linear text projection
    torch.manual_seed(0)
    model = open_clip.model.CustomTextCLIP(**cfg).eval()
    assert loading.model_problems(model) == []
    backbone = ClipBackbone(model)
    images, tokens = _inputs(backbone)
    assert backbone.text_tower is model.text and backbone.token_embedding is model.text.token_embedding
    with torch.no_grad():
        assert torch.allclose(backbone.encode_image(images).features, model.encode_image(images), atol=1e-5)
        assert torch.allclose(backbone.encode_text(tokens).features, model.encode_text(tokens), atol=1e-5)


# ------------------------------------------------------------------------------------ methods
@pytest.fixture(scope="module")
def deep_eva02():
    """A 12-block tiny EVA02-B-16, deep enough for every method's default config."""
    with pytest.MonkeyPatch.context() as patch:
        return ClipBackbone(build_random(register_tiny_eva(patch, "EVA02-B-16", depth=12), seed=3))


@pytest.mark.parametrize("name", list_methods())
def test_every_method_trains_and_predicts_on_eva02(name, deep_eva02):
    torch.manual_seed(0)
    method = create_method(name, deep_eva02)
    method.set_classnames(["red circle", "blue square", "green star"])
    images, labels = torch.randn(4, 3, 32, 32), torch.arange(4) % 3
    assert method.predict(images).shape == (4, 3)
    learnable = method.learnable_parameters()
    if not learnable:
        return
    with torch.no_grad():  # away from the init: zero-initialised LoRA factors give their partners zero gradients
        for p in learnable:
            p.add_(0.01 * torch.randn_like(p))
    method.train()
    terms = method.training_step((images, labels), StepState(epoch=0, max_epochs=2))
    assert torch.isfinite(terms["loss"])
    terms["loss"].backward()
    no_grad = [n for n, p in method.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert no_grad == [] and all(p.grad is None for p in deep_eva02.parameters())


def test_mmrlpp_representation_branch_uses_the_eva_head_bias(deep_eva02):
    method = create_method("alignednorm", deep_eva02).eval()
    method.set_classnames(["cat", "dog"])
    images = torch.randn(2, 3, 32, 32)
    head = deep_eva02.model.visual.trunk.head
    with torch.no_grad():
        branches = method(images).branches
        # B starts at zero: the representation branch is the frozen head on the tokens' mean
        assert torch.allclose(branches["z_p"], head(branches["rep_ln_post_mean"]), atol=1e-5)
        assert torch.allclose(branches["z_c"], head(branches["cls_ln_post"]), atol=1e-5)


# ------------------------------------------------------------------------------------ loading
def test_saved_eva02_loads_with_and_without_its_name(tmp_path, monkeypatch, caplog):
    name = register_tiny_eva(monkeypatch, "EVA02-B-16")
    model = build_random(name, seed=4)
    state = model.state_dict()
    assert any(k.startswith("visual.trunk.") for k in state) and any(k.startswith("text.") for k in state)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "eva.pt")
    images, tokens = _inputs(ClipBackbone(model))
    with torch.no_grad():
        expected = model.encode_image(images), model.encode_text(tokens)
    with caplog.at_level(logging.INFO, logger="alignednorm.backbone.loading"):
        unnamed = load_clip(tmp_path / "eva.pt")  # the shapes say which config: no --clip-model needed
    assert f"weights fit open_clip's {name}; loaded as {name}" in caplog.text
    for loaded in (load_clip(tmp_path / "eva.pt", name), unnamed):
        backbone = ClipBackbone(loaded)
        with torch.no_grad():
            assert torch.allclose(backbone.encode_image(images).features, expected[0], atol=1e-5)
            assert torch.allclose(backbone.encode_text(tokens).features, expected[1], atol=1e-5)
    del state["visual.trunk.blocks.0.attn.q_proj.weight"]
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match=r"partial.pt: weights do not fit the model: missing keys "
                                              r"\['visual.trunk.blocks.0.attn.q_proj.weight'\]"):
        load_clip(tmp_path / "partial.pt", name)


def test_eva02_from_a_local_dir_and_the_hugging_face_cache(tmp_path, monkeypatch, json_dataset):
    from typer.testing import CliRunner

    from alignednorm.cli import app

    name = register_tiny_eva(monkeypatch, "EVA02-B-16")
    folder = tmp_path / "weights"
    folder.mkdir()
    torch.save(build_random(name).state_dict(), folder / "open_clip_pytorch_model.bin")
    assert backbone_source(None, name, f"local-dir:{folder}") == (folder / "open_clip_pytorch_model.bin", name)
    result = CliRunner().invoke(app, ["eval", "--dataset", "oxford_pets", "--data-root", str(json_dataset.root),
                                      "--clip-model", name, "--clip-pretrained", f"local-dir:{folder}",
                                      "--output", str(tmp_path / "runs")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    # The real EVA02-B-16 tag resolves to open_clip's Hugging Face repository, in the local cache only.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = tmp_path / "hub" / "models--timm--eva02_base_patch16_clip_224.merged2b_s8b_b131k" / "snapshots" / "a1"
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_pytorch_model.bin").write_bytes(b"weights")
    assert backbone_source(None, "EVA02-B-16", "merged2b_s8b_b131k") == (
        snapshot / "open_clip_pytorch_model.bin", "EVA02-B-16")


def test_eva_towers_the_runner_would_run_wrongly_are_refused(monkeypatch):
    avg = register_tiny_eva(monkeypatch, "EVA02-B-16")
    open_clip_factory._MODEL_CONFIGS[avg]["vision_cfg"]["timm_pool"] = "avg"
    with pytest.raises(CheckpointError, match=rf"open_clip model '{avg}' cannot be run block by block: it has "
                                              r"image pooling 'avg' instead of the class token \('token'\)\. "):
        loading._build_config(avg)
    with pytest.raises(TypeError, match=r"would run this Eva image tower wrongly: it has image pooling 'avg'"):
        ClipBackbone(open_clip.create_model(avg))  # built in memory, not by the loader
    # Built towers are read too: register tokens and rotary embeddings of other kinds (timm's ROPE-ViTs)
    registers = open_clip.timm_model.TimmModel("test_tiny_eva02_base_patch16_clip_224", 32, pool="token", proj=None)
    registers.trunk.reg_token = torch.nn.Parameter(torch.zeros(1, 1, 64))
    assert tower_problems(registers) == ["register tokens in the Eva tower"]
    monkeypatch.setitem(timm_registry._model_entrypoints, "test_tiny_rope_mixed", functools.partial(
        timm.models.model_entrypoint("vit_base_patch16_rope_mixed_224"), depth=1, **TINY_TRUNK))
    mixed = open_clip.timm_model.TimmModel("test_tiny_rope_mixed", 32, pool="token", proj=None)
    assert "a RotaryEmbeddingMixed rotary embedding instead of EVA02's RotaryEmbeddingCat" in tower_problems(mixed)
