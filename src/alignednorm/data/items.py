"""The in-memory form of a dataset split: labelled image paths plus the class names.

Every reader (split JSON, ImageNet folders, FGVC-Aircraft lists, ImageNet variants) produces a
:class:`DatasetSplits`; few-shot sampling and the base/new split transform one into another.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from alignednorm.errors import DataError

# How many missing paths an error message lists before it only gives the count.
_MAX_LISTED = 5


class MissingFileError(DataError):
    """A file or folder a reader needs does not exist (callers add the expected layout)."""


@dataclass(frozen=True)
class Item:
    """One labelled image.

    Attributes:
        impath: absolute path of the image file.
        label: 0-based class index.
        classname: the class name as stored in the data (underscores kept).
    """

    impath: str
    label: int
    classname: str


@dataclass
class DatasetSplits:
    """The train/val/test lists of one dataset and its class names.

    Attributes:
        train: training items (for test-only datasets the test items, as Dassl does).
        val: validation items.
        test: test items.
        classnames: class names ordered by label.
        name: the dataset's catalog name (used to key few-shot caches).
        data_root: the data root the paths live under; few-shot caches store paths relative to it.
        dataset_dir: the dataset's own folder; caches are refused inside it.
        val_is_test: True when ``val`` is the test set (ImageNet), so few-shot sampling leaves it alone.
    """

    train: list[Item]
    val: list[Item]
    test: list[Item]
    classnames: list[str]
    name: str = "custom"
    data_root: str | None = None
    dataset_dir: str | None = None
    val_is_test: bool = False

    @property
    def num_classes(self) -> int:
        """Number of classes (the length of ``classnames``)."""
        return len(self.classnames)


def classnames_from_items(items: list[Item], source: str) -> list[str]:
    """Dassl's label-to-name map of ``items``, as a list ordered by label.

    Args:
        items: the training list.
        source: the file or folder the items came from, for error messages.

    Raises:
        DataError: when a label in 0..max has no item, since the classifier would then have
            fewer names than outputs.
    """
    names: dict[int, str] = {}
    for item in items:
        # Dassl keeps the last name seen for a label; the published splits never disagree.
        names[item.label] = item.classname
    gaps = sorted(set(range(max(names) + 1)) - set(names))
    if gaps:
        raise DataError(
            f"{source}: no training items for label(s) {gaps[:_MAX_LISTED]}; "
            f"expected every label 0..{max(names)} to appear in the training list"
        )
    return [names[label] for label in range(len(names))]


def check_labels_within(items: Iterable[Item], num_classes: int, split: str, source: str) -> None:
    """Raise when an item of ``split`` has a label outside the training classes."""
    for item in items:
        if not 0 <= item.label < num_classes:
            raise DataError(
                f"{source}: {split} item {item.impath} has label {item.label}; "
                f"expected 0..{num_classes - 1} (the labels of the training list)"
            )


def check_files_exist(items: Iterable[Item], source: str) -> None:
    """Raise one error naming the missing image files of ``items`` and how many there are.

    Only existence is checked (one ``stat`` per file); images are not opened.
    """
    items = list(items)
    missing = [item.impath for item in items if not os.path.isfile(item.impath)]
    if missing:
        listed = "\n  ".join(missing[:_MAX_LISTED])
        more = f"\n  ... and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
        raise DataError(
            f"{len(missing)} of {len(items)} images listed in {source} are missing:\n  {listed}{more}"
        )


def make_splits(
    train: list[Item],
    val: list[Item],
    test: list[Item],
    *,
    source: str,
    check_files: bool,
    **fields,
) -> DatasetSplits:
    """Validate three item lists and bundle them with their class names.

    Args:
        train: training items; must not be empty.
        val: validation items.
        test: test items; must not be empty.
        source: the file or folder the items came from, for error messages.
        check_files: whether to check that every image file exists.
        **fields: further :class:`DatasetSplits` fields (``name``, ``data_root``, ...).

    Raises:
        DataError: on an empty list, a label outside the training classes or a missing image.
    """
    for split, items in (("train", train), ("test", test)):
        if not items:
            raise DataError(f"{source}: the {split} list is empty; expected at least one image")
    classnames = classnames_from_items(train, source)
    for split, items in (("val", val), ("test", test)):
        check_labels_within(items, len(classnames), split, source)
    if check_files:
        # Lists may share items (test-only datasets, ImageNet val = test): check each path once.
        unique = {item.impath: item for item in (*train, *val, *test)}
        check_files_exist(unique.values(), source)
    return DatasetSplits(train=train, val=val, test=test, classnames=classnames, **fields)
