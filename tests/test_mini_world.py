"""The mini world: determinism, class sets, catalog entries and the files generate_world writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from alignednorm.data.catalog import get_dataset, list_datasets
from alignednorm.mini import MINI_DATASETS, generate_world, get_mini
from alignednorm.mini.capture import Capture
from alignednorm.mini.draw import SIZE
from alignednorm.mini.world import image_rng, is_complete, render_image

MAIN = [d for d in MINI_DATASETS if not d.test_only]
VARIANTS = [d for d in MINI_DATASETS if d.test_only]


@pytest.mark.parametrize("dataset", MINI_DATASETS, ids=lambda d: d.name)
def test_render_is_deterministic(dataset):
    label = len(dataset.classes) - 1
    first = np.asarray(render_image(dataset, label, image_rng(0, dataset, label, "test", 3)))
    again = np.asarray(render_image(dataset, label, image_rng(0, dataset, label, "test", 3)))
    other = np.asarray(render_image(dataset, label, image_rng(1, dataset, label, "test", 3)))
    assert first.shape == (SIZE, SIZE, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_class_sets():
    assert len(MAIN) >= 7 and len(VARIANTS) == 4
    assert all(len(d.classes) >= 20 for d in MINI_DATASETS)
    assert len(get_mini("mini_objects").classes) >= 100
    names = [c for d in MAIN for c in d.classnames]
    assert len(names) == len(set(names)), "class sets of the mini datasets must be disjoint"
    assert len({d.template for d in MAIN}) == len(MAIN) and all("{}" in d.template for d in MAIN)
    for d in MINI_DATASETS:
        assert d.classnames == sorted(d.classnames), f"{d.name}: labels follow sorted class names"
    for d in VARIANTS:
        assert d.classnames == get_mini("mini_objects").classnames


def test_catalog_registration():
    mini = list_datasets(suite="mini")
    assert mini == [d.name for d in MINI_DATASETS]
    assert list_datasets(suite="mini_dg") == [d.name for d in VARIANTS]
    for d in MINI_DATASETS:
        spec = get_dataset(d.name)
        assert spec.reader == "split_json" and spec.image_root == "images"
        assert spec.folder == f"mini/{d.folder}" and spec.split_file == f"split_mini_{d.folder}.json"
        assert spec.template == d.template and spec.num_classes == len(d.classes)
        assert spec.test_only == d.test_only
        assert get_dataset(spec.dassl_name).name == d.name


def _check_split_file(root, dataset):
    spec = get_dataset(dataset.name)
    path = root / spec.folder / spec.split_file
    text = path.read_text(encoding="utf-8")
    assert text.startswith('{\n    "train": [')  # 4-space indent, as CoOp's files
    split = json.loads(text)
    assert set(split) == {"train", "val", "test"}
    train, val, test = dataset.counts
    n = len(dataset.classes)
    if dataset.test_only:
        assert split["train"] == split["test"] and split["val"] == []
    else:
        assert (len(split["train"]), len(split["val"])) == (train * n, val * n)
    assert len(split["test"]) == test * n
    for rel, label, classname in split["train"] + split["val"] + split["test"]:
        assert dataset.classnames[label] == classname
        assert (root / spec.folder / spec.image_root / rel).is_file()
    with Image.open(root / spec.folder / spec.image_root / split["test"][0][0]) as im:
        assert im.size == (SIZE, SIZE) and im.mode == "RGB"
    return split


def test_generate_layout_and_idempotence(tmp_path):
    # No timing here: a test must not depend on the machine's speed or load.
    names = ["mini_counts", "mini_objects_sketch"]
    base = generate_world(tmp_path, names=names)
    assert base == tmp_path / "mini"
    splits = {name: _check_split_file(tmp_path, get_mini(name)) for name in names}
    assert all(is_complete(tmp_path, get_mini(name)) for name in names)
    sketch = get_mini("mini_objects_sketch")
    first = tmp_path / "mini/objects_sketch/images" / splits[sketch.name]["test"][0][0]  # label 0, image 0
    expected = render_image(sketch, 0, image_rng(0, sketch, 0, "test", 0))
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(expected))  # PNG is lossless
    mtime = first.stat().st_mtime_ns
    generate_world(tmp_path, names=names)  # complete: nothing rewritten
    assert first.stat().st_mtime_ns == mtime
    (tmp_path / "mini/counts/.complete.json").unlink()  # as if interrupted before the stamp
    assert not is_complete(tmp_path, get_mini("mini_counts"))
    generate_world(tmp_path, names=["mini_counts"])
    assert is_complete(tmp_path, get_mini("mini_counts"))


def test_split_reads_with_the_coop_reader(tmp_path):
    from alignednorm.data.coop_layout import read_split_json

    dataset = get_mini("mini_counts")
    generate_world(tmp_path, names=[dataset.name])
    spec = get_dataset(dataset.name)
    splits = read_split_json(tmp_path / spec.folder / spec.split_file, tmp_path / spec.folder / spec.image_root)
    assert len(splits.test) == len(dataset.classes) * dataset.counts[2]


def test_a_missing_mini_dataset_says_how_to_render_it(tmp_path):
    from alignednorm.data.coop_layout import load_splits
    from alignednorm.errors import DataError

    generate_world(tmp_path, names=["mini_counts"])  # the demo renders only the datasets it runs
    with pytest.raises(DataError, match=rf"mini_shapes.*alignednorm mini generate --data-root {tmp_path}"):
        load_splits("mini_shapes", tmp_path)


def test_capture_conditions():
    image = Image.fromarray(np.full((SIZE, SIZE, 3), (200, 40, 40), dtype=np.uint8))  # a red patch
    rng = np.random.default_rng(0)
    assert Capture().apply(image, rng) is image
    rotated = np.asarray(Capture(hue_rotation=1.0).apply(image, rng))
    assert tuple(rotated[0, 0]) == (40, 200, 40)  # R -> G: red reads as green
    faded = np.asarray(Capture(contrast=0.5, cast=(10, 0, 0)).apply(image, rng)).astype(int)
    assert tuple(faded[0, 0]) == (174, 84, 84)  # (x - 127.5) / 2 + 127.5, plus the cast, rounded
    noisy = [np.asarray(Capture(noise=10).apply(image, np.random.default_rng(s))) for s in (1, 1, 2)]
    assert np.array_equal(noisy[0], noisy[1]) and not np.array_equal(noisy[0], noisy[2])
    assert 5 < np.abs(noisy[0].astype(int) - 200)[..., 0].mean() < 12


def test_downstream_images_are_captured_pretraining_images_are_clean():
    """Each dataset's camera differs from the pretraining renders; the variants share the broad set's."""
    from alignednorm.mini.pretrain import pretraining_image

    for dataset in MAIN:
        assert not dataset.capture.is_identity, dataset.name
        label = len(dataset.classes) // 2
        captured = render_image(dataset, label, image_rng(0, dataset, label, "test", 0))
        clean = dataset.render(image_rng(0, dataset, label, "test", 0), *dataset.classes[label][1])
        assert captured.size == clean.size and not np.array_equal(np.asarray(captured), np.asarray(clean))
        if dataset.name != "mini_objects":  # objects' pretraining images draw a random style first
            assert np.array_equal(np.asarray(pretraining_image(dataset, label,
                                                               image_rng(0, dataset, label, "test", 0))),
                                  np.asarray(clean))
    assert {d.capture for d in VARIANTS} == {get_mini("mini_objects").capture}
