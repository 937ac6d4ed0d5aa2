"""Bad inputs on the command line: one clear line (exit 2) or a said-out-loud skip, never a traceback."""

import json
import os
import time

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from alignednorm.backbone.tiny import make_tiny_clip, save_openai_state_dict
from alignednorm.cli import app
from alignednorm.errors import AlignedNormError
from alignednorm.results import collect

runner = CliRunner()
SMALL = ["--set", "method.rep_layers=[2,3]", "--set", "method.rep_dim=16", "--set", "train.batch_size=2"]


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    return save_openai_state_dict(make_tiny_clip(seed=7, layers=3), tmp_path_factory.mktemp("clip") / "tiny.pt")


def _ok(*args) -> str:
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _error(*args) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert isinstance(result.exception, AlignedNormError), (result.output, result.exception)
    message = str(result.exception)
    assert "\n" not in message
    return message


def _train(json_dataset, clip_file, out, *extra):
    return ["train", "--method", "mmrlpp", "--dataset", "oxford_pets", "--data-root", json_dataset.root,
            "--clip", clip_file, "--shots", 2, "--output", out, *SMALL, *extra]


@pytest.fixture
def trained(json_dataset, clip_file, tmp_path):
    _ok(*_train(json_dataset, clip_file, tmp_path / "runs", "--set", "train.epochs=1"))
    (run_dir,) = (tmp_path / "runs").glob("base2new/oxford_pets/shots2/mmrlpp/*/seed1")
    return run_dir


def test_non_finite_settings_are_one_line(json_dataset, clip_file, tmp_path):
    for value in ("nan", "inf", "-inf"):
        message = _error(*_train(json_dataset, clip_file, tmp_path / "runs", "--set", f"train.lr={value}"))
        assert "train.lr" in message and "finite" in message
    message = _error(*_train(json_dataset, clip_file, tmp_path / "runs", "--set", "method.reg_weight=nan"))
    assert "reg_weight = nan; expected a finite number" in message


def test_predict_inputs(trained, json_dataset, tmp_path, caplog):
    good = json_dataset.image_dir / json_dataset.split["test"][0][0]
    not_image = tmp_path / "not_image.jpg"
    not_image.write_text("hello")
    assert "not_image.jpg: not a readable image" in _error("predict", trained, not_image)
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.open(good).save(folder / "a.png")
    (folder / "b.png").write_bytes(b"\x89PNG broken")
    result = runner.invoke(app, ["predict", str(trained), str(folder), "--topk", "1"])
    assert result.exit_code == 1 and "a.png: " in result.output and "skipped" in result.output
    assert "b.png: not a readable image" in result.output
    assert "no class names" in _error("predict", trained, good, "--classes", " , ")
    assert "topk = -3" in _error("predict", trained, good, "--topk", "-3")
    assert "topk = 0" in _error("predict", trained, good, "--topk", "0")
    assert "'Cat' and 'cat' are the same class" in _error("predict", trained, good, "--classes", "Cat,cat,dog")
    long_name = "dog " * 2000
    message = _error("predict", trained, good, "--classes", f"cat,{long_name}")
    assert "longer than the text context" in message and len(message) < 300
    clamped = _ok("predict", trained, good, "--classes", "cat,dog", "--topk", "5")
    assert clamped.count(" 0.") + clamped.count(" 1.0") == 2  # both classes shown, no more
    caplog.clear()
    default = runner.invoke(app, ["predict", str(trained), str(good), "--classes", "cat,dog"])
    assert default.exit_code == 0 and "topk" not in caplog.text  # the default asks for nothing more
    assert default.output.count(" 0.") + default.output.count(" 1.0") == 2


def test_damaged_run_files(trained):
    info = trained / "run.json"
    record = json.loads(info.read_text())
    info.write_text(info.read_text()[:40])
    assert "run.json: unreadable or truncated" in _error("predict", trained, trained / "config.yaml")
    del record["classnames"]
    info.write_text(json.dumps(record))
    message = _error("predict", trained, trained / "config.yaml")
    assert "run.json: the run record has no 'classnames'" in message and "\n" not in message.strip()
    import alignednorm
    from alignednorm.errors import CheckpointError

    with pytest.raises(CheckpointError, match="no 'classnames'"):
        alignednorm.load(trained)


def test_truncated_checkpoint_on_resume_touches_nothing(json_dataset, clip_file, tmp_path, monkeypatch):
    from alignednorm.engine.trainer import Trainer

    args = _train(json_dataset, clip_file, tmp_path / "runs", "--set", "train.epochs=3")

    def killed_after_first_checkpoint(self, epoch, _save=Trainer.save_checkpoint):
        _save(self, epoch)
        raise KeyboardInterrupt  # as a kill right after the first epoch's checkpoint

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "save_checkpoint", killed_after_first_checkpoint)
        runner.invoke(app, [str(a) for a in args])
    (run_dir,) = (tmp_path / "runs").glob("base2new/oxford_pets/shots2/mmrlpp/*/seed1")
    checkpoint = run_dir / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    (run_dir / ".checkpoint.pt.0badc0de.tmp").write_bytes(b"half a copy")  # a write a kill interrupted
    stamps = {name: (run_dir / name).stat().st_mtime_ns for name in ("config.yaml", "run.json")}
    time.sleep(0.01)
    message = _error(*args)
    assert "checkpoint.pt: unreadable or truncated checkpoint" in message and "--force" in message
    assert {name: (run_dir / name).stat().st_mtime_ns for name in stamps} == stamps
    assert not (run_dir / ".checkpoint.pt.0badc0de.tmp").exists()


def test_interrupted_sweep_resumes_to_the_uninterrupted_metrics(json_dataset, clip_file, tmp_path, monkeypatch):
    from alignednorm.engine.trainer import Trainer

    args = ["run", "base2new", "--method", "mmrlpp", "--datasets", "oxford_pets", "--data-root", json_dataset.root,
            "--clip", clip_file, "--seeds", 1, "--shots", 2, *SMALL, "--set", "train.epochs=3"]
    _ok(*args, "--output", tmp_path / "ref")
    with monkeypatch.context() as patch:
        def killed(self, epoch, _save=Trainer.save_checkpoint):
            _save(self, epoch)
            if epoch == 1:
                raise KeyboardInterrupt
        patch.setattr(Trainer, "save_checkpoint", killed)
        runner.invoke(app, [str(a) for a in [*args, "--output", tmp_path / "cut"]])
    assert list((tmp_path / "cut").rglob("checkpoint.pt"))
    refused = runner.invoke(app, [str(a) for a in [*args, "--output", tmp_path / "cut", "--no-resume"]])
    assert refused.exit_code == 1 and "pass --resume" in refused.output  # a flag `run` has
    _ok(*args, "--output", tmp_path / "cut")  # resumes by default
    (ref,) = (tmp_path / "ref").rglob("eval/oxford_pets/metrics.json")
    (cut,) = (tmp_path / "cut").rglob("eval/oxford_pets/metrics.json")
    assert json.loads(ref.read_text())["eval"] == json.loads(cut.read_text())["eval"]


def test_report_names_the_file_it_uses_for_a_repeated_run(tmp_path, caplog):
    records = []
    for name, accuracy in (("old", 10.0), ("new", 20.0)):
        path = tmp_path / name / "metrics.json"
        path.parent.mkdir()
        path.write_text(json.dumps({"protocol": "base2new", "method": "m", "dataset": "dtd", "shots": 16, "seed": 1,
                                    "eval": {"base": {"accuracy": accuracy}}}))
        records.append(path)
    os.utime(records[0], (1_000_000_000, 1_000_000_000))  # fixed times: the "new" file is the newer one
    os.utime(records[1], (1_000_000_100, 1_000_000_100))
    (found,) = collect(tmp_path)
    assert found.accuracy == 20.0 and found.path == str(records[1])
    assert f"using the newer {records[1]}" in caplog.text


def test_mini_generate_and_clip_mini(tmp_path):
    out = _ok("mini", "generate", "--data-root", tmp_path / "data", "--datasets", "mini_shapes")
    assert "--clip mini" in out and (tmp_path / "data" / "mini").is_dir()
    assert "unknown mini dataset 'mini_shape'" in _error("mini", "generate", "--data-root", tmp_path / "data",
                                                          "--datasets", "mini_shape")
    out = _ok("eval", "--dataset", "mini_shapes", "--data-root", tmp_path / "data", "--clip", "mini", "--output",
              tmp_path / "runs")
    assert "zeroshot mini_shapes/all" in out
    assert "no such file" in _error("eval", "--dataset", "mini_shapes", "--data-root", tmp_path / "data",
                                    "--clip", tmp_path / "nope.pt")
    assert torch.get_num_threads() >= 1


def test_export_analyze_bench_and_import_inputs(trained, json_dataset, clip_file, tmp_path):
    """Each bad input is one line naming it, before any work; an exported folder can be analysed."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert f"{a_file} is a file; export writes a folder" in _error("export", trained, a_file)
    assert f"--output {a_file} is a file; analyze writes a folder" in _error("analyze", trained, "--output", a_file)
    for device in ("tpu", "cuda:7"):
        message = _error("analyze", trained, "--output", tmp_path / "an", "--device", device)
        assert f"--device {device!r}: not available here; available: auto, cpu" in message
        assert f"--device {device!r}: not available here" in _error("bench", "--method", "coop", "--device", device)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00\x01 not safetensors")
    message = _error("import-official", "mmrlpp", broken, tmp_path / "imported", "--clip", clip_file,
                     "--classes", "cat,dog", *SMALL)
    assert f"{broken}: not a readable safetensors file" in message
    exported = tmp_path / "exported"
    _ok("export", trained, exported)
    message = _error("analyze", exported, "--output", tmp_path / "an_export", "--data-root", json_dataset.root)
    assert "names its backbone 'tiny.pt'" in message and "pass clip=PATH (Python) or --clip PATH" in message
    page = _ok("analyze", exported, "--output", tmp_path / "an_export", "--data-root", json_dataset.root,
               "--max-images", 3, "--no-tsne", "--clip", clip_file)  # an export names its backbone only
    assert "wrote" in page and (tmp_path / "an_export" / "index.html").is_file()
