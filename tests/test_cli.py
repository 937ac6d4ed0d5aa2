"""The CLI end to end on a tiny CLIP checkpoint file and a tiny dataset in the real layout."""

import json

import pytest
from typer.testing import CliRunner

from alignednorm.backbone.tiny import make_tiny_clip, save_openai_state_dict
from alignednorm.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "tiny-clip.pt"
    return save_openai_state_dict(make_tiny_clip(seed=4, layers=3), path)


def _invoke(*args):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_zero_shot_eval(json_dataset, clip_file, tmp_path):
    out = _invoke("eval", "--dataset", "oxford_pets", "--data-root", json_dataset.root, "--clip", clip_file,
                  "--output", tmp_path / "runs")
    assert "zeroshot oxford_pets/all" in out and "on 10 images" in out
    metrics = json.loads((tmp_path / "runs" / "oxford_pets" / "zeroshot" / "metrics.json").read_text())
    assert 0.0 <= metrics["eval"]["all"]["accuracy"] <= 100.0
    assert metrics["eval"]["all"]["num_samples"] == 10


@pytest.mark.parametrize("method", ["mmrlpp", "alignednorm"])
def test_train_then_base_and_new(method, json_dataset, clip_file, tmp_path):
    args = ["train", "--method", method, "--dataset", "oxford_pets", "--data-root", json_dataset.root,
            "--clip", clip_file, "--shots", 2, "--output", tmp_path / "runs",
            "--set", "method.rep_layers=[2,3]", "--set", "train.epochs=2", "--set", "train.batch_size=2"]
    out = _invoke(*args)
    run_dir = tmp_path / "runs" / "base2new" / "oxford_pets" / method / "seed1"
    assert {p.name for p in run_dir.iterdir()} >= {"config.yaml", "run.json", "metrics.json", "learnable.safetensors",
                                                   "log.jsonl"}
    assert not (run_dir / "checkpoint.pt").exists()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["eval"]["base"]["num_classes"] == 3 and metrics["eval"]["new"]["num_classes"] == 2
    assert "base" in out and "new" in out
    # A finished run is skipped: no training, metrics untouched.
    stamp = (run_dir / "metrics.json").stat().st_mtime_ns
    again = _invoke(*args)
    assert "epoch" not in again and "base (base)" in again
    assert (run_dir / "metrics.json").stat().st_mtime_ns == stamp


def test_list_and_check(json_dataset):
    assert "alignednorm" in _invoke("list", "methods")
    assert "oxford_pets" in _invoke("list", "datasets")
    out = _invoke("datasets", "check", json_dataset.root, "--dataset", "oxford_pets")
    assert "oxford_pets" in out


def test_corrupt_image_fails_with_path_or_is_skipped_and_counted(json_dataset, clip_file, tmp_path):
    bad = json_dataset.image_dir / json_dataset.split["test"][3][0]
    bad.write_bytes(b"not an image")
    args = ["eval", "--dataset", "oxford_pets", "--data-root", json_dataset.root, "--clip", clip_file,
            "--output", tmp_path / "runs"]
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code != 0 and str(bad) in str(result.exception)
    out = _invoke(*args, "--skip-corrupt", "--force")
    assert "on 9 images" in out
    metrics = json.loads((tmp_path / "runs" / "oxford_pets" / "zeroshot" / "metrics.json").read_text())
    assert metrics["eval"]["all"]["skipped_images"] == 1
