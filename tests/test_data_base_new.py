"""CoOp's base/new class split: first ceil(n/2) sorted labels are base, relabelled in order."""

from pathlib import Path

import pytest

from alignednorm.data import DatasetSplits, Item, get_dataset, read_split_json, subsample_classes, subset_labels
from alignednorm.errors import ConfigError

SPLITS_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference" / "coop_splits" / "splits"

# Base + new test images of the published splits (re-counted in the MMRL++ spec, section 6).
BASE_NEW_TEST = {
    "caltech101": (1549, 916), "oxford_pets": (1881, 1788), "stanford_cars": (4002, 4039),
    "oxford_flowers": (1053, 1410), "dtd": (864, 828), "eurosat": (4200, 3900), "ucf101": (1934, 1849),
}


def five_classes() -> DatasetSplits:
    names = ["a", "b", "c", "d", "e"]
    # Train lists labels out of order; val lacks class 1 to show filtering is per item.
    train = [Item(f"/t/{k}_{i}", k, names[k]) for k in (4, 2, 0, 3, 1) for i in range(2)]
    val = [Item(f"/v/{k}", k, names[k]) for k in (0, 2, 3, 4)]
    test = [Item(f"/s/{k}", k, names[k]) for k in (3, 0, 1, 4, 2)]
    return DatasetSplits(train, val, test, names, name="toy")


def test_odd_class_count_gives_base_the_extra_class():
    splits = five_classes()
    base, new = subsample_classes(splits, "base"), subsample_classes(splits, "new")
    assert base.classnames == ["a", "b", "c"] and new.classnames == ["d", "e"]
    assert [(it.impath, it.label) for it in base.train] == [
        ("/t/2_0", 2), ("/t/2_1", 2), ("/t/0_0", 0), ("/t/0_1", 0), ("/t/1_0", 1), ("/t/1_1", 1)]
    assert [(it.impath, it.label) for it in new.test] == [("/s/3", 0), ("/s/4", 1)]
    assert [it.label for it in base.val] == [0, 2] and [it.classname for it in new.val] == ["d", "e"]
    assert base.name == "toy"


def test_all_is_unchanged_and_bad_subset_is_named():
    splits = five_classes()
    assert subsample_classes(splits, "all") is splits
    with pytest.raises(ConfigError, match="subset 'novel' is not one of all, base, new"):
        subsample_classes(splits, "novel")


def test_labels_come_from_train_sorted():
    assert subset_labels([7, 3, 9, 3, 1], "base") == [1, 3]
    assert subset_labels([7, 3, 9, 3, 1], "new") == [7, 9]


@pytest.mark.parametrize("name", sorted(BASE_NEW_TEST))
def test_published_base_new_test_counts(name):
    if not SPLITS_DIR.is_dir():
        pytest.skip(f"{SPLITS_DIR} (shared/ beside the repo) is absent")
    splits = read_split_json(SPLITS_DIR / get_dataset(name).split_file, "/data", check_files=False)
    base, new = subsample_classes(splits, "base"), subsample_classes(splits, "new")
    assert (len(base.test), len(new.test)) == BASE_NEW_TEST[name]
    assert len(base.classnames) + len(new.classnames) == splits.num_classes
    assert base.classnames + new.classnames == splits.classnames
