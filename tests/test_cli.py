"""The CLI end to end on a tiny CLIP checkpoint file and a tiny dataset in the real layout."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from alignednorm.backbone.tiny import make_tiny_clip, save_openai_state_dict
from alignednorm.cli import app
from alignednorm.errors import AlignedNormError

runner = CliRunner()


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "tiny-clip.pt"
    return save_openai_state_dict(make_tiny_clip(seed=4, layers=3), path)


def _invoke(*args):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _fails(*args) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code != 0 and isinstance(result.exception, AlignedNormError), result.output
    return str(result.exception)


def _single(pattern_root: Path, pattern: str) -> Path:
    found = sorted(pattern_root.glob(pattern))
    assert len(found) == 1, found
    return found[0]


def _eval_metrics(root: Path, subset: str = "all") -> dict:
    return json.loads(_single(root, f"eval/oxford_pets/shots0/zeroshot/*/seed1/eval/oxford_pets-{subset}/metrics.json")
                      .read_text())


def test_zero_shot_eval(json_dataset, clip_file, tmp_path):
    args = ["eval", "--dataset", "oxford_pets", "--data-root", json_dataset.root, "--clip", clip_file,
            "--output", tmp_path / "runs"]
    out = _invoke(*args)
    assert "zeroshot oxford_pets/all" in out and "on 10 images" in out
    metrics = _eval_metrics(tmp_path / "runs")
    assert 0.0 <= metrics["eval"]["all"]["accuracy"] <= 100.0
    assert metrics["eval"]["all"]["num_samples"] == 10
    # Another --subset is another evaluation (not the old numbers); another --clip is refused by name.
    assert "oxford_pets/new" in _invoke(*args, "--subset", "new")
    assert _eval_metrics(tmp_path / "runs", "new")["eval"]["new"]["num_classes"] == 2
    other = save_openai_state_dict(make_tiny_clip(seed=5, layers=3), tmp_path / "other.pt")
    message = _fails(*args[:-4], "--clip", other, "--output", tmp_path / "runs")
    assert "other settings (clip_sha256:" in message and "--force" in message


def test_eval_refuses_methods_that_learn_and_bad_names(json_dataset, clip_file, tmp_path):
    common = ["--data-root", json_dataset.root, "--clip", clip_file, "--output", tmp_path / "runs"]
    assert "learns a prompt" in _fails("eval", "--method", "alignednorm", "--dataset", "oxford_pets", *common)
    assert "did you mean oxford_pets" in _fails("eval", "--dataset", "oxford_pet", *common)
    assert not (tmp_path / "runs").exists()  # nothing loaded, no empty run folder
    assert "did you mean 'base2new'" in _fails("train", "--method", "mmrlpp", "--dataset", "oxford_pets",
                                                "--protocol", "base2nwe", *common)


@pytest.mark.parametrize("method", ["mmrlpp", "alignednorm"])
def test_train_then_base_and_new(method, json_dataset, clip_file, tmp_path):
    args = ["train", "--method", method, "--dataset", "oxford_pets", "--data-root", json_dataset.root,
            "--clip", clip_file, "--shots", 2, "--output", tmp_path / "runs",
            "--set", "method.rep_layers=[2,3]", "--set", "train.epochs=2", "--set", "train.batch_size=2"]
    out = _invoke(*args)
    run_dir = _single(tmp_path / "runs", f"base2new/oxford_pets/shots2/{method}/custom-*/seed1")
    assert {p.name for p in run_dir.iterdir()} >= {"config.yaml", "run.json", "metrics.json", "learnable.safetensors",
                                                   "log.jsonl", "eval"}
    assert not (run_dir / "checkpoint.pt").exists()
    metrics = json.loads((run_dir / "eval" / "oxford_pets" / "metrics.json").read_text())
    assert metrics["eval"]["base"]["num_classes"] == 3 and metrics["eval"]["new"]["num_classes"] == 2
    assert metrics["eval"]["base"]["rule"] == "seen" and metrics["eval"]["new"]["rule"] == "unseen"
    assert "base" in out and "new" in out
    # A finished run with the same settings is skipped: no training, metrics untouched.
    stamp = (run_dir / "metrics.json").stat().st_mtime_ns
    again = _invoke(*args)
    assert "epoch" not in again and "(base, rule seen)" in again
    assert (run_dir / "metrics.json").stat().st_mtime_ns == stamp


def test_list_and_check(json_dataset):
    assert "alignednorm" in _invoke("list", "methods")
    assert "oxford_pets" in _invoke("list", "datasets")
    # The tiny fixture has 5 of the 37 classes: reported broken, and the exit status says so.
    result = runner.invoke(app, ["datasets", "check", str(json_dataset.root), "--dataset", "oxford_pets"])
    assert result.exit_code == 1 and "oxford_pets  broken" in result.output


def test_corrupt_image_fails_with_path_or_is_skipped_and_counted(json_dataset, clip_file, tmp_path):
    bad = json_dataset.image_dir / json_dataset.split["test"][3][0]
    bad.write_bytes(b"not an image")
    args = ["eval", "--dataset", "oxford_pets", "--data-root", json_dataset.root, "--clip", clip_file,
            "--output", tmp_path / "runs"]
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code != 0 and str(bad) in str(result.exception)
    out = _invoke(*args, "--skip-corrupt")
    assert "on 9 images" in out
    metrics = json.loads(_single(tmp_path / "runs", "eval/oxford_pets/shots0/zeroshot/custom-*/seed1/eval/"
                                 "oxford_pets-all/metrics.json").read_text())
    assert metrics["eval"]["all"]["skipped_images"] == 1


def test_changed_settings_never_return_old_numbers(json_dataset, clip_file, tmp_path):
    """The repros of the run-identity rule: --shots, --set and --clip after a finished run."""
    base = ["train", "--method", "mmrlpp", "--dataset", "oxford_pets", "--data-root", json_dataset.root,
            "--output", tmp_path / "runs", "--set", "method.rep_layers=[2,3]", "--set", "method.rep_dim=16",
            "--set", "train.batch_size=2", "--set", "train.epochs=2"]
    _invoke(*base, "--clip", clip_file, "--shots", 4)
    first = _single(tmp_path / "runs", "base2new/oxford_pets/shots4/mmrlpp/*/seed1")
    _invoke(*base, "--clip", clip_file, "--shots", 2)  # other shots: its own folder, trained anew
    assert _single(tmp_path / "runs", "base2new/oxford_pets/shots2/mmrlpp/*/seed1") != first
    _invoke(*base, "--clip", clip_file, "--shots", 4, "--set", "train.epochs=1")  # other config: its own variant
    assert len(list((tmp_path / "runs" / "base2new" / "oxford_pets" / "shots4" / "mmrlpp").iterdir())) == 2
    other = save_openai_state_dict(make_tiny_clip(seed=5, layers=3), tmp_path / "other.pt")
    message = _fails(*base, "--clip", other, "--shots", 4)
    assert str(first) in message and "clip_sha256" in message
    # A hand-edited identity (e.g. written by another version with other presets) is named key by key.
    info = json.loads((first / "run.json").read_text())
    info["identity"]["config"]["train"]["lr"] = 0.5
    (first / "run.json").write_text(json.dumps(info))
    assert "config.train.lr: 0.5 -> 0.001" in _fails(*base, "--clip", clip_file, "--shots", 4)
    _invoke(*base, "--clip", clip_file, "--shots", 4, "--force")  # --force replaces it


def test_best_val_selection_through_the_run_path(json_dataset, clip_file, tmp_path):
    _invoke("train", "--method", "mmrlpp", "--dataset", "oxford_pets", "--data-root", json_dataset.root, "--clip",
            clip_file, "--shots", 2, "--output", tmp_path / "runs", "--set", "method.rep_layers=[2,3]",
            "--set", "method.rep_dim=16", "--set", "train.epochs=2", "--set", "train.batch_size=2",
            "--set", "train.select=best-val")
    run_dir = _single(tmp_path / "runs", "base2new/oxford_pets/shots2/mmrlpp/*/seed1")
    train = json.loads((run_dir / "metrics.json").read_text())["train"]
    assert train["selected_epoch"] in (1, 2) and 0.0 <= train["val_accuracy"] <= 100.0
    logged = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in logged if "val_accuracy" in e] == [1, 2]


def test_class_descriptions_file_is_checked_and_recorded(json_dataset, clip_file, tmp_path):
    from alignednorm.protocols.data import dataset_label_space

    good = {n: [f"a photo of a {n}.", f"a {n}, a pet."] for n in json_dataset.names}
    path = tmp_path / "oxford_pets.json"
    path.write_text(json.dumps(good))
    space = dataset_label_space("oxford_pets", json_dataset.names[:2], str(tmp_path))  # a folder of <dataset>.json
    assert space.descriptions["abyssinian"] == ("a photo of a abyssinian.", "a abyssinian, a pet.")
    path.write_text(json.dumps({**good, "beagle": []}))
    with pytest.raises(AlignedNormError, match="oxford_pets.json: the description list of class 'beagle' is empty"):
        dataset_label_space("oxford_pets", json_dataset.names, str(path))
    path.write_text(json.dumps({k: v for k, v in good.items() if k != "boxer"}))
    with pytest.raises(AlignedNormError, match="oxford_pets.json: no descriptions for class 'boxer'"):
        dataset_label_space("oxford_pets", json_dataset.names, str(path))
    path.write_text("{not json")
    with pytest.raises(AlignedNormError, match="oxford_pets.json: not a readable JSON file"):
        dataset_label_space("oxford_pets", json_dataset.names, str(path))
    # A method that does not read descriptions records no fallback.
    out = _invoke("eval", "--dataset", "oxford_pets", "--data-root", json_dataset.root, "--clip", clip_file,
                  "--output", tmp_path / "runs")
    assert "zeroshot" in out
    (info,) = (tmp_path / "runs").rglob("run.json")
    assert json.loads(info.read_text())["description_fallback"] is False


def test_help_version_and_usage_errors_import_no_heavy_module():
    """`--help`, `--version` and usage errors stay instant: nothing imports torch, open_clip or the runner."""
    import subprocess
    import sys

    code = """
import sys
from typer.testing import CliRunner
from alignednorm.cli import app
codes = [CliRunner().invoke(app, args).exit_code
         for args in (["--help"], ["--version"], ["run", "base2new", "--help"], ["train", "--help"], ["train"])]
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "open_clip", "torchvision", "timm")
               or m == "alignednorm.protocols.runner")
print(codes, heavy)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[0, 0, 0, 0, 2] []"
    assert "alignednorm " in _invoke("--version")


def test_list_methods_reads_the_registry_without_torch():
    """`list methods` reads names and notes from the methods' source: the same as the registry, no torch."""
    import subprocess
    import sys

    from alignednorm.cli.method_names import method_notes
    from alignednorm.methods import get_method_class, list_methods

    assert method_notes() == {name: get_method_class(name).traits.note for name in list_methods()}
    code = """
import sys
from typer.testing import CliRunner
from alignednorm.cli import app
out = CliRunner().invoke(app, ["list", "methods"]).output
print(len(out.splitlines()), sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "open_clip")))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"{len(list_methods())} []"
