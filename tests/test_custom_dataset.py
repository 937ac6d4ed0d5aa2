"""Your own dataset: ``datasets create`` → ``run base2new`` → ``export`` → ``load`` → ``predict``, and bad input."""

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

import alignednorm
from alignednorm.backbone.tiny import make_tiny_clip, save_openai_state_dict
from alignednorm.cli import app
from alignednorm.data.custom import create_dataset
from alignednorm.errors import AlignedNormError, DataError

runner = CliRunner()


@pytest.fixture(autouse=True)
def _restore_catalog():
    """Datasets created here register in the process-wide catalog: put it back as it was."""
    from alignednorm.data import catalog

    saved = dict(catalog._REGISTRY)
    yield
    catalog._REGISTRY.clear()
    catalog._REGISTRY.update(saved)


def _tree(root, classes=("cat", "dog", "bird", "fish"), per_class=6):
    for k, name in enumerate(classes):
        for i in range(per_class):
            folder = root / name
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (40 * k, 10 * i, 200)).save(folder / f"{i}.png")
    return root


def _ok(*args) -> str:
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_create_run_export_load_predict(tmp_path):
    source = _tree(tmp_path / "photos")
    (source / "cat" / "notes.txt").write_text("not an image")
    data = tmp_path / "data"
    data.mkdir()
    result = runner.invoke(app, ["datasets", "create", "pets4", "--from", str(source), "--data-root", str(data),
                                 "--template", "a photo of my {}."], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "4 classes (train 16, val 4, test 4 images)" in result.output and "notes.txt" in result.output
    split = json.loads((data / "pets4" / "split_pets4.json").read_text())
    assert {label for _, label, _ in split["test"]} == {0, 1, 2, 3}  # stratified: every class in every split
    assert sorted({name for _, _, name in split["train"]}) == ["bird", "cat", "dog", "fish"]
    clip = save_openai_state_dict(make_tiny_clip(seed=1, layers=3), tmp_path / "clip.pt")
    printed = _ok("run", "base2new", "--method", "mmrlpp", "--datasets", "pets4", "--data-root", data, "--clip", clip,
                  "--seeds", 1, "--shots", 2, "--output", tmp_path / "runs", "--set", "method.rep_layers=[2,3]",
                  "--set", "method.rep_dim=16", "--set", "train.epochs=1", "--set", "train.batch_size=2")
    assert "| pets4 |" in printed and "imagenet" not in printed  # its table lists its own dataset only
    (run_dir,) = (tmp_path / "runs").glob("base2new/pets4/shots2/mmrlpp/*/seed1")
    metrics = json.loads((run_dir / "eval" / "pets4" / "metrics.json").read_text())
    assert metrics["eval"]["base"]["num_classes"] == 2 and metrics["eval"]["new"]["num_classes"] == 2
    _ok("export", run_dir, tmp_path / "shared")
    predictor = alignednorm.load(tmp_path / "shared")
    assert predictor.info["template"] == "a photo of my {}."
    image = next((data / "pets4" / "images").rglob("*.png"))
    assert "cat" in _ok("predict", tmp_path / "shared", image, "--classes", "cat,dog")
    # Another command in a fresh process finds the dataset by name through the data root's catalog.
    assert "pets4" in _ok("datasets", "check", data, "--dataset", "pets4")


def test_csv_with_given_split(tmp_path):
    source = _tree(tmp_path / "photos", classes=("a", "b"), per_class=3)
    rows = ["path,label,split"] + [f"photos/{c}/{i}.png,{c},{('train', 'val', 'test')[i]}"
                                   for c in "ab" for i in range(3)]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    data = tmp_path / "data"
    data.mkdir()
    report = create_dataset("two", data, csv_file=tmp_path / "list.csv")
    assert report.counts == {"train": 2, "val": 2, "test": 2} and source.is_dir()


@pytest.mark.parametrize("case, message", [
    ("empty_class", "class 'empty' has no images"),
    ("small_class", "class 'few' has 2 images; the split needs at least 3"),
    ("duplicates", "class names 'Cat' and 'cat' are the same after normalisation"),
    ("builtin_name", "clashes with the built-in dataset 'dtd'"),
    ("bad_name", "use lower-case letters"),
])
def test_bad_input_is_one_clear_error(tmp_path, case, message):
    source = _tree(tmp_path / "photos", classes=("cat", "dog"))
    name = {"builtin_name": "dtd", "bad_name": "My-Data"}.get(case, "mine")
    if case == "empty_class":
        (source / "empty").mkdir()
    if case == "small_class":
        _tree(source, classes=("few",), per_class=2)
    if case == "duplicates":
        _tree(source, classes=("Cat",), per_class=3)
    data = tmp_path / "data"
    data.mkdir()
    with pytest.raises(DataError, match=message):
        create_dataset(name, data, source=source)
    assert not (data / "alignednorm_datasets.json").exists()


def test_existing_name_needs_force(tmp_path):
    source = _tree(tmp_path / "photos", classes=("cat", "dog"))
    data = tmp_path / "data"
    data.mkdir()
    create_dataset("mine", data, source=source)
    result = runner.invoke(app, ["datasets", "create", "mine", "--from", str(source), "--data-root", str(data)])
    assert isinstance(result.exception, AlignedNormError) and "--force" in str(result.exception)
    assert create_dataset("mine", data, source=source, overwrite=True, seed=2).spec.num_classes == 2
