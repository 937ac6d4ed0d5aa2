"""``alignednorm export``: a self-contained shareable folder that loads and predicts like the run."""

import json
import shutil

import torch
from typer.testing import CliRunner

import alignednorm
from alignednorm.backbone.tiny import make_tiny_clip, save_openai_state_dict
from alignednorm.cli import app
from alignednorm.errors import AlignedNormError, CheckpointError

runner = CliRunner()


def test_export_load_and_predict(json_dataset, tmp_path):
    clip = save_openai_state_dict(make_tiny_clip(seed=3, layers=3), tmp_path / "clip.pt")
    args = ["train", "--method", "alignednorm", "--dataset", "oxford_pets", "--data-root", str(json_dataset.root),
            "--clip", str(clip), "--shots", "2", "--output", str(tmp_path / "runs"), "--set", "method.rep_layers=[2,3]",
            "--set", "method.rep_dim=16", "--set", "train.epochs=1", "--set", "train.batch_size=2"]
    assert runner.invoke(app, args, catch_exceptions=False).exit_code == 0
    (run_dir,) = (tmp_path / "runs").glob("base2new/oxford_pets/shots2/alignednorm/*/seed1")
    out = tmp_path / "shared"
    assert runner.invoke(app, ["export", str(run_dir), str(out)], catch_exceptions=False).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "alignednorm_config.json", "learnable.safetensors"]
    config = json.loads((out / "alignednorm_config.json").read_text())
    assert config["method"] == "alignednorm" and config["backbone"]["file"] == "clip.pt"
    assert set(config["metrics"]["oxford_pets"]) == {"base", "new"} and len(config["backbone"]["sha256"]) == 64
    card = (out / "README.md").read_text()
    assert "library_name: alignednorm" in card and "| oxford_pets | base " in card and "@inproceedings" in card
    assert "alignednorm train --method alignednorm" in card
    # The exported folder predicts exactly like the run it came from, also with the backbone moved.
    images = torch.randn(2, 3, 32, 32)
    moved = shutil.move(clip, tmp_path / "elsewhere.pt")
    expected = alignednorm.load(run_dir, clip=moved).predict(images, classes=["cat", "dog"])
    assert alignednorm.load(out, clip=moved).predict(images, classes=["cat", "dog"]) == expected
    image = json_dataset.image_dir / json_dataset.split["test"][0][0]
    result = runner.invoke(app, ["predict", str(out), str(image), "--clip", str(moved), "--classes", "cat,dog"],
                           catch_exceptions=False)
    assert result.exit_code == 0 and "cat" in result.output
    try:
        alignednorm.load(out)  # the recorded backbone path is gone
        raise AssertionError("expected a CheckpointError")
    except CheckpointError as exc:
        assert "does not exist" in str(exc)
    refused = runner.invoke(app, ["export", str(run_dir), str(out)])
    assert isinstance(refused.exception, AlignedNormError) and "not empty" in str(refused.exception)


def test_load_and_predict_name_the_shipped_clip_as_at_training(json_dataset, tmp_path):
    """``--clip mini`` trains; ``load(..., clip="mini")`` and ``predict --clip mini`` find the same file."""
    args = ["eval", "--method", "zeroshot", "--dataset", "oxford_pets", "--data-root", str(json_dataset.root),
            "--clip", "mini", "--output", str(tmp_path / "runs")]
    assert runner.invoke(app, args, catch_exceptions=False).exit_code == 0
    (run_dir,) = (tmp_path / "runs").glob("*/oxford_pets/*/zeroshot/*/seed1")
    images = torch.randn(2, 3, 32, 32)
    assert alignednorm.load(run_dir, clip="mini").predict(images, classes=["cat", "dog"]) == \
        alignednorm.load(run_dir).predict(images, classes=["cat", "dog"])
    image = json_dataset.image_dir / json_dataset.split["test"][0][0]
    result = runner.invoke(app, ["predict", str(run_dir), str(image), "--clip", "mini", "--classes", "cat,dog"],
                           catch_exceptions=False)
    assert result.exit_code == 0 and ("cat" in result.output or "dog" in result.output)
