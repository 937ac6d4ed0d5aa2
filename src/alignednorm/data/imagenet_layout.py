"""Readers for ImageNet and its test-only variants, which have class folders instead of split files.

ImageNet: ``classnames.txt`` holds ``<wnid> <name>`` lines; the label of a class is the index of
its wnid among the sorted ``images/train`` folders; ``images/val/<wnid>/`` is the test set and
also serves as the validation set. The variants are test-only: ImageNetV2 names its folders
``0..999`` (the label, an index into ``classnames.txt``), Sketch/A/R use wnid folders whose
sorted order gives the labels (A/R have 200 of the 1000 classes).
"""

from __future__ import annotations

import os

from alignednorm.errors import DataError

from .items import DatasetSplits, Item, MissingFileError, make_splits


def read_classnames_txt(path: str) -> dict[str, str]:
    """Read ``classnames.txt``: one ``<wnid> <class name with spaces>`` line per class.

    Returns:
        wnid -> class name, in file order.

    Raises:
        DataError: when the file is missing, empty or has a line without a name.
    """
    if not os.path.isfile(path):
        raise MissingFileError(f"class-name file {path} not found; expected '<wnid> <class name>' lines")
    names: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            wnid, _, name = line.strip().partition(" ")
            if not name.strip():
                raise DataError(f"{path}, line {lineno}: {line.strip()!r}; expected '<wnid> <class name>'")
            names[wnid] = name.strip()
    if not names:
        raise DataError(f"{path} is empty; expected '<wnid> <class name>' lines")
    return names


def list_subfolders(path: str) -> list[str]:
    """Sorted names of the visible sub-folders of ``path`` (files such as README.txt are skipped)."""
    if not os.path.isdir(path):
        raise MissingFileError(f"folder {path} not found")
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def list_images(folder: str) -> list[str]:
    """Absolute paths of the visible files in ``folder``, sorted by name.

    Dassl takes ``os.listdir`` order here, which depends on the file system; sorting makes the
    lists (and hence few-shot samples) the same on every machine.
    """
    names = sorted(e.name for e in os.scandir(folder) if e.is_file() and not e.name.startswith("."))
    return [os.path.join(folder, name) for name in names]


def _lookup_name(classnames: dict[str, str], wnid: str, source: str) -> str:
    if wnid not in classnames:
        raise DataError(f"class folder {wnid!r} has no line in {source}; expected '<wnid> <class name>'")
    return classnames[wnid]


def _wnid_items(split_dir: str, label_of: dict[str, int], classnames: dict[str, str], names_file: str) -> list[Item]:
    """Items of the wnid folders in ``label_of`` under ``split_dir``, in label order."""
    items = []
    for wnid, label in sorted(label_of.items(), key=lambda kv: kv[1]):
        name = _lookup_name(classnames, wnid, names_file)
        items += [Item(path, label, name) for path in list_images(os.path.join(split_dir, wnid))]
    return items


def read_imagenet(folder: str, image_root: str, **fields) -> DatasetSplits:
    """Read ImageNet from ``<folder>/<image_root>/{train,val}/<wnid>/`` and ``classnames.txt``.

    Files are found by listing folders, so they exist by construction and are not checked again.

    Args:
        folder: the ImageNet folder.
        image_root: folder (relative to ``folder``) holding ``train/`` and ``val/``.
        **fields: further :class:`DatasetSplits` fields.
    """
    names_file = os.path.join(folder, "classnames.txt")
    classnames = read_classnames_txt(names_file)
    image_dir = os.path.normpath(os.path.join(folder, image_root))
    train_dir, val_dir = os.path.join(image_dir, "train"), os.path.join(image_dir, "val")
    label_of = {wnid: label for label, wnid in enumerate(list_subfolders(train_dir))}
    val_wnids = list_subfolders(val_dir)
    for wnid in val_wnids:
        if wnid not in label_of:
            raise DataError(
                f"{os.path.join(val_dir, wnid)} has no matching folder in {train_dir}; "
                "expected the validation images sorted into the same wnid folders as train"
            )
    train = _wnid_items(train_dir, label_of, classnames, names_file)
    test = _wnid_items(val_dir, {wnid: label_of[wnid] for wnid in val_wnids}, classnames, names_file)
    # CoOp evaluates on ImageNet val and uses the same list for validation.
    return make_splits(train, test, test, source=image_dir, check_files=False, val_is_test=True, **fields)


def read_imagenet_variant(folder: str, image_root: str, **fields) -> DatasetSplits:
    """Read a test-only ImageNet variant; ``train`` is the test list (Dassl needs it), ``val`` is empty.

    Folders named by digits are label indices into ``classnames.txt`` (ImageNetV2); otherwise the
    wnid folders present, sorted, give labels 0..n-1 (Sketch, A, R).
    """
    names_file = os.path.join(folder, "classnames.txt")
    classnames = read_classnames_txt(names_file)
    image_dir = os.path.normpath(os.path.join(folder, image_root))
    folders = list_subfolders(image_dir)
    if not folders:
        raise DataError(f"{image_dir} has no class folders; expected <wnid>/ or 0..999/ folders of images")
    if all(f.isdigit() for f in folders):
        test = _indexed_items(image_dir, folders, list(classnames.values()), names_file)
    else:
        label_of = {wnid: label for label, wnid in enumerate(folders)}
        test = _wnid_items(image_dir, label_of, classnames, names_file)
    return make_splits(test, [], test, source=image_dir, check_files=False, **fields)


def _indexed_items(image_dir: str, folders: list[str], names: list[str], names_file: str) -> list[Item]:
    """Items of ImageNetV2-style folders ``0..n-1``, where the folder name is the label."""
    items = []
    for folder in sorted(folders, key=int):
        label = int(folder)
        if label >= len(names):
            raise DataError(
                f"{os.path.join(image_dir, folder)}: label {label} has no line in {names_file} "
                f"(it lists {len(names)} classes)"
            )
        items += [Item(path, label, names[label]) for path in list_images(os.path.join(image_dir, folder))]
    return items
