"""open_clip names as open_clip users write them: ``--clip-model M --clip-pretrained TAG``, local files only."""

import pytest
import torch
from typer.testing import CliRunner

from alignednorm.backbone.tiny import TINY_MODEL_NAME, make_tiny_clip
from alignednorm.cli import app
from alignednorm.clip_names import backbone_source, resolve_pretrained
from alignednorm.errors import CheckpointError


def test_found_in_the_hugging_face_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointError, match="not on this machine and nothing is downloaded"):
        resolve_pretrained("ViT-B-16", "laion2b_s34b_b88k")
    snapshot = tmp_path / "hub" / "models--laion--CLIP-ViT-B-16-laion2B-s34B-b88K" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_pytorch_model.bin").write_bytes(b"weights")
    assert resolve_pretrained("ViT-B-16", "laion2b_s34b_b88k") == (snapshot / "open_clip_pytorch_model.bin",
                                                                  "ViT-B-16")
    with pytest.raises(CheckpointError, match="'laion9' is not a pretrained tag.*laion2b_s34b_b88k"):
        resolve_pretrained("ViT-B-16", "laion9")


def test_option_combinations():
    with pytest.raises(CheckpointError, match="needs --clip-model"):
        backbone_source(None, None, "openai")
    with pytest.raises(CheckpointError, match="not both"):
        backbone_source("a.pt", "ViT-B-16", "openai")
    with pytest.raises(CheckpointError, match="no backbone given"):
        backbone_source(None, None, None)


def test_local_dir_model_runs_end_to_end(json_dataset, tmp_path, monkeypatch):
    import json
    from importlib import resources

    from open_clip import factory

    config = resources.files("alignednorm") / "configs" / "open_clip" / f"{TINY_MODEL_NAME}.json"
    monkeypatch.setitem(factory._MODEL_CONFIGS, TINY_MODEL_NAME, json.loads(config.read_text()))  # undone after
    folder = tmp_path / "weights"
    folder.mkdir()
    torch.save(make_tiny_clip(seed=2).state_dict(), folder / "open_clip_pytorch_model.bin")
    assert resolve_pretrained(TINY_MODEL_NAME, f"local-dir:{folder}")[0].name == "open_clip_pytorch_model.bin"
    result = CliRunner().invoke(app, ["eval", "--dataset", "oxford_pets", "--data-root", str(json_dataset.root),
                                      "--clip-model", TINY_MODEL_NAME, "--clip-pretrained", f"local-dir:{folder}",
                                      "--output", str(tmp_path / "runs")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "zeroshot oxford_pets/all" in result.output
