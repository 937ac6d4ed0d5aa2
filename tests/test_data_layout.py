"""Reading the four dataset layouts from real files, and the error message of each failure."""

import json
import os
import shutil

import pytest

from alignednorm.data import DatasetSplits, expected_layout, get_dataset, load_splits, read_split_json
from alignednorm.errors import DataError

# (train, val, test, classes) of the published CoOp splits, from the CoOp paper's Table 9.
PUBLISHED_SIZES = {
    "caltech101": (4128, 1649, 2465, 100),
    "oxford_pets": (2944, 736, 3669, 37),
    "stanford_cars": (6509, 1635, 8041, 196),
    "oxford_flowers": (4093, 1633, 2463, 102),
    "dtd": (2820, 1128, 1692, 47),
    "eurosat": (13500, 5400, 8100, 10),
    "ucf101": (7639, 1898, 3783, 101),
}


def sizes(splits: DatasetSplits) -> tuple[int, int, int, int]:
    return len(splits.train), len(splits.val), len(splits.test), splits.num_classes


# --- the layouts ---

def test_split_json_paths_labels_and_classnames(json_dataset):
    splits = load_splits(json_dataset.spec, json_dataset.root)
    assert sizes(splits) == (20, 10, 10, 5)
    assert splits.classnames == json_dataset.names  # ordered by label, not by file order
    first = splits.train[0]
    assert first.impath == str(json_dataset.image_dir / "beagle_0.jpg") and os.path.isabs(first.impath)
    assert (first.label, first.classname) == (2, "beagle")
    assert splits.test[0].impath == str(json_dataset.image_dir / "sub" / "abyssinian_test0.jpg")
    assert splits.name == "oxford_pets" and splits.data_root == str(json_dataset.root)


def test_split_json_through_the_catalog_name_and_env_root(json_dataset, monkeypatch):
    # The real catalog spec expects 37 classes, but reading does not enforce the count.
    monkeypatch.setenv("DATA_ROOT", str(json_dataset.root))
    assert sizes(load_splits("OxfordPets", None)) == (20, 10, 10, 5)


def test_imagenet_labels_follow_sorted_train_folders(imagenet_dataset):
    splits = load_splits(imagenet_dataset.spec, imagenet_dataset.root)
    assert splits.classnames == ["tench", "goldfish", "great white shark"]
    assert sizes(splits) == (9, 3, 3, 3)
    assert splits.val == splits.test and splits.val_is_test
    # Files come sorted by name within each class; the hidden file is skipped.
    wnid0 = [os.path.basename(it.impath) for it in splits.train if it.label == 0]
    assert wnid0 == ["n01440764_0000.JPEG", "n01440764_0001.JPEG", "n01440764_0002.JPEG"]
    assert [it.label for it in splits.test] == [0, 1, 2]


def test_fgvc_aircraft_lists(aircraft_dataset):
    splits = load_splits(aircraft_dataset.spec, aircraft_dataset.root)
    assert sizes(splits) == (9, 3, 6, 3)
    assert splits.classnames == aircraft_dataset.variants
    assert splits.train[-1].classname == "F/A-18" and splits.train[-1].label == 2
    assert splits.train[0].impath == str(aircraft_dataset.folder / "images" / "1000001.jpg")


def test_imagenet_a_style_variant(variant_datasets):
    splits = load_splits(variant_datasets.a, variant_datasets.root)
    # Only the folders present count, sorted; README.txt is ignored.
    assert splits.classnames == ["goldfish", "great white shark"]
    assert splits.train == splits.test and splits.val == []
    assert sizes(splits) == (5, 0, 5, 2)


def test_imagenetv2_style_variant(variant_datasets):
    splits = load_splits(variant_datasets.v2, variant_datasets.root)
    assert splits.classnames == ["tench", "goldfish", "great white shark"]
    assert [it.label for it in splits.test] == [0, 1, 2]


@pytest.mark.parametrize("name", sorted(PUBLISHED_SIZES))
def test_published_split_files_parse(name, shared_dir, data_root):
    spec = get_dataset(name)
    (data_root / spec.folder).mkdir()
    shutil.copy(shared_dir / "reference/coop_splits/splits" / spec.split_file, data_root / spec.folder)
    splits = load_splits(name, data_root, check_files=False)
    assert sizes(splits) == PUBLISHED_SIZES[name]
    assert all(it.impath.startswith(str(data_root / spec.folder)) for it in splits.test)


# --- errors ---

def test_missing_data_root(tmp_path, monkeypatch):
    monkeypatch.delenv("DATA_ROOT", raising=False)
    with pytest.raises(DataError, match="DATA_ROOT is not set"):
        load_splits("dtd", None)
    with pytest.raises(DataError, match=f"DATA_ROOT {tmp_path / 'nowhere'} does not exist"):
        load_splits("dtd", tmp_path / "nowhere")


def test_missing_dataset_folder_shows_layout(data_root):
    with pytest.raises(DataError) as info:
        load_splits("dtd", data_root)
    message = str(info.value)
    assert f"folder {data_root / 'dtd'} not found" in message
    assert "Expected layout:" in message and "split_zhou_DescribableTextures.json" in message
    assert expected_layout(get_dataset("dtd")) in message


def test_unknown_dataset_name(data_root):
    with pytest.raises(DataError, match="did you mean oxford_pets"):
        load_splits("oxford_pet", data_root)


def test_missing_split_json(json_dataset):
    json_dataset.split_path.unlink()
    with pytest.raises(DataError, match=f"split file {json_dataset.split_path} not found") as info:
        load_splits(json_dataset.spec, json_dataset.root)
    assert "Expected layout:" in str(info.value)


@pytest.mark.parametrize(
    "content, expected",
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "holds a list; expected an object with keys train, val, test"),
        ('{"train": [], "val": []}', "has no key 'test'"),
        ('{"train": {}, "val": [], "test": []}', "'train' is a dict; expected a list"),
        ('{"train": [["a.jpg", 0]], "val": [], "test": []}', r"entry 0 of 'train' is \['a.jpg', 0\]"),
        ('{"train": [["a.jpg", "0", "x"]], "val": [], "test": []}', "entry 0 of 'train'"),
        ('{"train": [["a.jpg", -1, "x"]], "val": [], "test": []}', "non-negative integer label"),
    ],
)
def test_garbled_split_json(json_dataset, content, expected):
    json_dataset.split_path.write_text(content)
    with pytest.raises(DataError, match=expected) as info:
        load_splits(json_dataset.spec, json_dataset.root)
    assert str(json_dataset.split_path) in str(info.value)


def test_missing_images_are_named_and_counted(json_dataset):
    for relpath in ("beagle_0.jpg", "beagle_1.jpg", "sub/boxer_test1.jpg"):
        (json_dataset.image_dir / relpath).unlink()
    with pytest.raises(DataError, match="3 of 40 images listed in .* are missing") as info:
        load_splits(json_dataset.spec, json_dataset.root)
    assert str(json_dataset.image_dir / "sub" / "boxer_test1.jpg") in str(info.value)
    # Without the check the split still loads (e.g. to inspect it).
    assert len(load_splits(json_dataset.spec, json_dataset.root, check_files=False).train) == 20


def test_many_missing_images_are_summarised(tmp_path):
    split = {"train": [[f"{i}.jpg", 0, "a"] for i in range(8)], "val": [], "test": [["t.jpg", 0, "a"]]}
    (tmp_path / "split.json").write_text(json.dumps(split))
    with pytest.raises(DataError, match=r"(?s)9 of 9 images .*\.\.\. and 4 more"):
        read_split_json(tmp_path / "split.json", tmp_path)


def test_empty_dataset(json_dataset):
    json_dataset.split_path.write_text('{"train": [], "val": [], "test": []}')
    with pytest.raises(DataError, match="the train list is empty"):
        load_splits(json_dataset.spec, json_dataset.root)


def test_label_without_training_items(json_dataset):
    split = json_dataset.split
    split["train"] = [e for e in split["train"] if e[1] != 1]
    json_dataset.split_path.write_text(json.dumps(split))
    with pytest.raises(DataError, match=r"no training items for label\(s\) \[1\]"):
        load_splits(json_dataset.spec, json_dataset.root)


def test_test_label_outside_training_classes(json_dataset):
    json_dataset.split["test"].append(["sub/abyssinian_test0.jpg", 9, "ghost"])
    json_dataset.split_path.write_text(json.dumps(json_dataset.split))
    with pytest.raises(DataError, match="has label 9; expected 0..4"):
        load_splits(json_dataset.spec, json_dataset.root)


def test_imagenet_errors(imagenet_dataset):
    shutil.rmtree(imagenet_dataset.folder / "images" / "train" / "n01443537")
    with pytest.raises(DataError, match="n01443537 has no matching folder in"):
        load_splits(imagenet_dataset.spec, imagenet_dataset.root)
    (imagenet_dataset.folder / "classnames.txt").unlink()
    with pytest.raises(DataError, match="classnames.txt not found") as info:
        load_splits(imagenet_dataset.spec, imagenet_dataset.root)
    assert "images/val/<wnid>" in str(info.value)


def test_fgvc_unknown_variant(aircraft_dataset):
    with open(aircraft_dataset.folder / "images_variant_test.txt", "a") as f:
        f.write("1234567 Concorde\n")
    with pytest.raises(DataError, match="images_variant_test.txt: line '1234567 Concorde' names variant 'Concorde'"):
        load_splits(aircraft_dataset.spec, aircraft_dataset.root)


def test_fgvc_missing_list_and_image(aircraft_dataset):
    (aircraft_dataset.folder / "images" / "1000001.jpg").unlink()
    with pytest.raises(DataError, match="1 of 18 images listed in .* are missing"):
        load_splits(aircraft_dataset.spec, aircraft_dataset.root)
    (aircraft_dataset.folder / "images_variant_val.txt").unlink()
    with pytest.raises(DataError, match="images_variant_val.txt not found"):
        load_splits(aircraft_dataset.spec, aircraft_dataset.root)


def test_variant_errors(variant_datasets):
    (variant_datasets.root / variant_datasets.a.folder / "classnames.txt").write_text("n01443537 goldfish\n")
    with pytest.raises(DataError, match="class folder 'n01484850' has no line in"):
        load_splits(variant_datasets.a, variant_datasets.root)
    (variant_datasets.root / variant_datasets.a.folder / "classnames.txt").write_text("n01443537\n")
    with pytest.raises(DataError, match=r"line 1: 'n01443537'; expected '<wnid> <class name>'"):
        load_splits(variant_datasets.a, variant_datasets.root)
