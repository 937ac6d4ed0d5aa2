"""Resume after SIGKILL, determinism, run locks, divergence, atomic writes, predict."""

import dataclasses
import errno
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

import alignednorm
from alignednorm import data as D
from alignednorm.backbone.clip import ClipBackbone
from alignednorm.backbone.tiny import make_tiny_clip, save_openai_state_dict
from alignednorm.cli import app
from alignednorm.config import DataConfig
from alignednorm.engine.io import atomic_write, write_json
from alignednorm.engine.run import RunLock
from alignednorm.engine.trainer import TrainConfig, Trainer, TrainingDiverged, gradients_finite, lr_at_epoch
from alignednorm.errors import AlignedNormError, CheckpointError
from alignednorm.methods import create_method
from alignednorm.protocols.data import evaluate_split

SMALL = ["--set", "method.rep_layers=[2,3]", "--set", "method.rep_dim=16", "--set", "train.batch_size=2"]


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    return save_openai_state_dict(make_tiny_clip(seed=6, layers=3), tmp_path_factory.mktemp("clip") / "tiny.pt")


def _train_args(json_dataset, clip_file, out, epochs, *extra):
    return ["train", "--method", "alignednorm", "--dataset", "oxford_pets", "--data-root", str(json_dataset.root),
            "--clip", str(clip_file), "--shots", "4", "--output", str(out), *SMALL, "--set", f"train.epochs={epochs}",
            *extra]


def _run_dir(out):
    (run_dir,) = (out / "base2new" / "oxford_pets" / "shots4" / "alignednorm").glob("*/seed1")
    return run_dir


def _metrics(out):
    """The training run's metrics with its evaluation's accuracies under ``eval``."""
    run_dir = _run_dir(out)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["eval"] = json.loads((run_dir / "eval" / "oxford_pets" / "metrics.json").read_text())["eval"]
    return metrics


def test_schedule_is_dassls_constant_warmup_then_cosine():
    cfg = TrainConfig(epochs=4, lr=1e-3, warmup_epochs=1, warmup_lr=1e-5)
    got = [lr_at_epoch(cfg, e) for e in range(4)]
    expected = [1e-5, 1e-3, 0.5e-3 * (1 + math.cos(math.pi / 4)), 0.5e-3 * (1 + math.cos(math.pi / 2))]
    assert got == pytest.approx(expected)
    assert lr_at_epoch(TrainConfig(epochs=1, warmup_epochs=0), 0) == pytest.approx(1e-3)


def test_same_seed_same_metrics(json_dataset, clip_file, tmp_path):
    runner = CliRunner()
    for name in ("a", "b"):
        result = runner.invoke(app, _train_args(json_dataset, clip_file, tmp_path / name, 2), catch_exceptions=False)
        assert result.exit_code == 0, result.output
    a, b = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert a["eval"] == b["eval"] and a["train"] == b["train"]


def test_sigkill_then_resume_gives_uninterrupted_result(json_dataset, clip_file, tmp_path, tensorboard_scalars):
    epochs = 6
    reference = CliRunner().invoke(app, _train_args(json_dataset, clip_file, tmp_path / "ref", epochs),
                                   catch_exceptions=False)
    assert reference.exit_code == 0, reference.output
    out = tmp_path / "killed"
    run_dir = _run_dir(tmp_path / "ref").relative_to(tmp_path / "ref")
    run_dir = out / run_dir
    cmd = [sys.executable, "-m", "alignednorm.cli", *_train_args(json_dataset, clip_file, out, epochs)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run_dir / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (run_dir / "checkpoint.pt").exists() and not (run_dir / "metrics.json").exists()
    # With --no-resume the interrupted run is not silently restarted; by default it resumes.
    refused = CliRunner().invoke(app, _train_args(json_dataset, clip_file, out, epochs, "--no-resume"))
    assert isinstance(refused.exception, AlignedNormError) and "pass --resume" in str(refused.exception)
    resumed = CliRunner().invoke(app, _train_args(json_dataset, clip_file, out, epochs), catch_exceptions=False)
    assert resumed.exit_code == 0, resumed.output
    assert _metrics(out)["eval"] == _metrics(tmp_path / "ref")["eval"]
    # The TensorBoard curve of the resumed run is the uninterrupted one: steps the killed attempt logged
    # past its checkpoint are purged, none appear twice.
    ref_dir = _run_dir(tmp_path / "ref")
    # (events of the two attempts sit in two files, read in no guaranteed order)
    resumed_loss = sorted(tensorboard_scalars(run_dir / "tensorboard")["train/loss"])
    reference_loss = sorted(tensorboard_scalars(ref_dir / "tensorboard")["train/loss"])
    assert [s for s, _ in resumed_loss] == [s for s, _ in reference_loss]
    assert [v for _, v in resumed_loss] == pytest.approx([v for _, v in reference_loss], abs=1e-6)


def test_run_lock_refuses_a_second_writer(tmp_path):
    with RunLock(tmp_path / "run"), pytest.raises(AlignedNormError, match=r"in use by process \d+"):
        RunLock(tmp_path / "run").__enter__()
    # A lock left by a dead process is taken over.
    (tmp_path / "run" / ".lock").write_text("999999999")
    with RunLock(tmp_path / "run"):
        pass


def test_nan_loss_stops_with_step_and_terms(tmp_path):
    backbone = ClipBackbone(make_tiny_clip(seed=1, layers=3))
    method = create_method("mmrlpp", backbone, {"rep_layers": [2, 3], "rep_dim": 16})
    method.set_classnames(["a", "b"])
    images = torch.randn(4, 3, 32, 32)
    images[2] = float("nan")
    dataset = torch.utils.data.TensorDataset(images, torch.tensor([0, 1, 0, 1]))
    trainer = Trainer(method, TrainConfig(epochs=2, batch_size=4), run_dir=tmp_path, progress=False)
    with pytest.raises(TrainingDiverged, match=r"epoch 1, step 0.*'ce_cls': nan"):
        trainer.fit(dataset)


def test_gradients_finite_sees_nan_and_inf_anywhere_and_no_overflow():
    params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(3)]
    assert gradients_finite(params)  # no gradient yet
    params[0].grad, params[2].grad = torch.ones(3), torch.full((3,), 3e38)  # large, finite: no overflow
    assert gradients_finite(params)
    for bad in (float("nan"), float("inf"), -float("inf")):
        params[2].grad = torch.tensor([1.0, bad, 2.0])
        assert not gradients_finite(params)


def test_nan_gradient_with_finite_loss_stops_training(tmp_path):
    backbone = ClipBackbone(make_tiny_clip(seed=1, layers=3))
    method = create_method("mmrlpp", backbone, {"rep_layers": [2, 3], "rep_dim": 16})
    method.set_classnames(["a", "b"])
    first = method.learnable_parameters()[0]
    first.register_hook(lambda grad: torch.full_like(grad, float("nan")))
    dataset = torch.utils.data.TensorDataset(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1]))
    trainer = Trainer(method, TrainConfig(epochs=1, batch_size=4), run_dir=tmp_path, progress=False)
    with pytest.raises(TrainingDiverged, match=r"non-finite gradient at epoch 1, step 0"):
        trainer.fit(dataset)


def test_disk_full_leaves_nothing_half_written(tmp_path):
    target = write_json(tmp_path / "metrics.json", {"accuracy": 1.0})

    def fail(tmp):
        tmp.write_text("{partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(AlignedNormError, match="No space left on device; nothing was left half-written"):
        atomic_write(target, fail)
    assert json.loads(target.read_text()) == {"accuracy": 1.0}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(AlignedNormError, match="cannot write"):
        write_json(blocker / "sub" / "metrics.json", {})


def test_predict_api_and_cli(json_dataset, clip_file, tmp_path):
    runner = CliRunner()
    assert runner.invoke(app, _train_args(json_dataset, clip_file, tmp_path, 1), catch_exceptions=False).exit_code == 0
    run_dir = _run_dir(tmp_path)
    predictor = alignednorm.load(run_dir)
    image = json_dataset.image_dir / json_dataset.split["test"][0][0]
    top = predictor.predict([image], classes=["cat", "dog", "bird"], topk=2)
    assert len(top) == 1 and len(top[0]) == 2 and {n for n, _ in top[0]} <= {"cat", "dog", "bird"}
    assert top[0][0][1] >= top[0][1][1] and 0 < sum(p for _, p in top[0]) <= 1.0 + 1e-6
    result = runner.invoke(app, ["predict", str(run_dir), str(image.parent), "--classes", "cat,dog", "--topk", "1"],
                           catch_exceptions=False)
    assert result.exit_code == 0 and result.output.count(".jpg: ") == 10, result.output
    with pytest.raises(CheckpointError, match="not the one the prompt was trained with"):
        other = save_openai_state_dict(make_tiny_clip(seed=9, layers=3), tmp_path / "other.pt")
        alignednorm.load(run_dir, clip=other)


def test_class_names_that_do_not_match_the_checkpoint(json_dataset, clip_file, tmp_path, monkeypatch):
    runner = CliRunner()
    assert runner.invoke(app, _train_args(json_dataset, clip_file, tmp_path, 1), catch_exceptions=False).exit_code == 0
    run_dir = _run_dir(tmp_path)
    method = alignednorm.load(run_dir).method
    trained = json.loads((run_dir / "run.json").read_text())["classnames"]
    assert method.trained_classnames == trained
    # The 'seen' rule serves only the trained classes (any order); other classes go through 'unseen'/'any'.
    method.check_classnames(trained[::-1], "seen")
    method.check_classnames(["cat", "dog"], "unseen")
    with pytest.raises(CheckpointError, match=r"class names do not match the prompt trained in .*'seen' rule.*"
                                              r"2 given classes are not among them \['cat', 'dog'\]"):
        method.check_classnames(["cat", "dog"], "seen")
    splits = D.subsample_classes(D.load_splits("oxford_pets", json_dataset.root), "new")
    with pytest.raises(CheckpointError, match="class names do not match"):
        evaluate_split(method, splits, "oxford_pets", "seen", DataConfig())
    # A prompt learned per class only fits its own class list, whatever the rule.
    monkeypatch.setattr(type(method), "traits", dataclasses.replace(type(method).traits, class_specific=True))
    with pytest.raises(CheckpointError, match=r"learns one prompt per class and was trained on \d+ classes"):
        alignednorm.load(run_dir).predict(torch.zeros(1, 3, 32, 32), classes=["cat", "dog"])
