"""Checkpoint loading in every supported format, on tiny files written here."""

import warnings

import pytest
import torch

from alignednorm.backbone.loading import load_clip, read_state_dict, read_torchscript_archive
from alignednorm.backbone.tiny import TINY_MODEL_NAME, make_tiny_clip, register_tiny_configs, save_openai_state_dict
from alignednorm.errors import CheckpointError


@pytest.fixture(scope="module")
def small_clip():
    return make_tiny_clip(seed=5, layers=2, width=64, context_length=16)


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k].float(), sb[k].float()), k


def _images_and_text(model):
    return torch.randn(2, 3, 32, 32), torch.randint(1, 400, (2, 16))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_openai_state_dict_roundtrip(tmp_path, small_clip, suffix):
    path = save_openai_state_dict(small_clip, tmp_path / f"clip{suffix}", half=False)
    loaded = load_clip(path)
    _same_weights(small_clip, loaded)
    images, _text = _images_and_text(small_clip)
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(images), small_clip.encode_image(images), atol=1e-6)


def test_torchscript_archive_read_without_running_code(tmp_path, small_clip):
    images, text = _images_and_text(small_clip)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace_module(small_clip, {"encode_image": (images,), "encode_text": (text,)})
        torch.jit.save(traced, str(tmp_path / "ViT-tiny.pt"))
    tensors = read_torchscript_archive(tmp_path / "ViT-tiny.pt")
    expected = small_clip.state_dict()
    assert set(tensors) == set(expected)
    assert all(torch.equal(tensors[k], expected[k]) for k in expected)
    loaded = load_clip(tmp_path / "ViT-tiny.pt")
    assert loaded.visual.transformer.resblocks[0].mlp.gelu.__class__.__name__ == "QuickGELU"


def test_open_clip_checkpoint_with_model_name(tmp_path):
    register_tiny_configs()
    import open_clip

    model = open_clip.create_model(TINY_MODEL_NAME)
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
               tmp_path / "epoch_3.pt")
    _same_weights(model, load_clip(tmp_path / "epoch_3.pt", model_name=TINY_MODEL_NAME))
    with pytest.raises(CheckpointError, match="unknown open_clip model 'ViT-Tiny-Nope'"):
        load_clip(tmp_path / "epoch_3.pt", model_name="ViT-Tiny-Nope")


def test_bad_checkpoints_name_the_problem(tmp_path, small_clip):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "missing.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.pt: unknown checkpoint format"):
        load_clip(tmp_path / "garbage.pt")
    torch.save({"a": 1}, tmp_path / "dict.pt")
    with pytest.raises(CheckpointError, match="expected a state dict of tensors"):
        load_clip(tmp_path / "dict.pt")
    state = {k: v for k, v in small_clip.state_dict().items() if k != "ln_final.bias"}
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match=r"missing keys \['ln_final.bias'\]"):
        load_clip(tmp_path / "partial.pt")
    state = dict(small_clip.state_dict())
    state["visual.ln_post.weight"] = torch.ones(7)
    torch.save(state, tmp_path / "shapes.pt")
    with pytest.raises(CheckpointError, match=r"wrong shapes \['visual.ln_post.weight: checkpoint \(7,\)"):
        load_clip(tmp_path / "shapes.pt")
