"""Read the datasets of the catalog from a CoOp/Dassl-style ``DATA_ROOT``.

The layouts and split files are CoOp's (``DATASETS.md``), so a data folder prepared for CoOp,
MaPLe, PromptSRC or MMRL works unchanged. Unlike Dassl, nothing is ever written into it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from alignednorm.errors import DataError

from .catalog import DatasetSpec, get_dataset
from .imagenet_layout import read_imagenet, read_imagenet_variant
from .items import DatasetSplits, Item, MissingFileError, make_splits

__all__ = [
    "DatasetSplits", "Item", "expected_layout", "load_splits", "read_split_json", "resolve_data_root", "resolve_spec",
]

_SPLIT_KEYS = ("train", "val", "test")
_ENTRY_FORMAT = "[relative_image_path, integer_label, classname]"


def resolve_data_root(data_root: str | os.PathLike | None) -> str:
    """Return ``data_root`` (or ``$DATA_ROOT`` when None) as an absolute path to an existing folder.

    Raises:
        DataError: when no data root is given or it is not a folder.
    """
    if data_root is None or str(data_root) == "":
        data_root = os.environ.get("DATA_ROOT", "")
        if not data_root:
            raise DataError(
                "DATA_ROOT is not set: pass the folder holding the datasets (e.g. --data-root /path/to/data) "
                "or set the DATA_ROOT environment variable"
            )
    root = os.path.abspath(os.path.expanduser(os.fspath(data_root)))
    if not os.path.isdir(root):
        raise DataError(f"DATA_ROOT {root} does not exist or is not a folder; expected the folder holding the datasets")
    from alignednorm.data.custom import register_catalog  # the user's own datasets in this root

    register_catalog(root)
    return root


def resolve_spec(name_or_spec: str | DatasetSpec) -> DatasetSpec:
    """The catalog entry for a name, or ``name_or_spec`` itself when it already is a spec.

    Raises:
        DataError: for an unknown name (the message suggests close names).
    """
    if isinstance(name_or_spec, DatasetSpec):
        return name_or_spec
    try:
        return get_dataset(name_or_spec)
    except KeyError as exc:
        raise DataError(exc.args[0]) from None


def expected_layout(spec: DatasetSpec) -> str:
    """A short tree of the files ``spec`` expects under ``DATA_ROOT`` (for error messages)."""
    top = f"$DATA_ROOT/{spec.folder}/"
    image_dir = f"{spec.image_root}/" if spec.image_root != "." else "(the dataset folder itself)"
    if spec.reader == "split_json":
        lines = [f"{spec.split_file}  (CoOp split: train/val/test lists of {_ENTRY_FORMAT})",
                 f"{image_dir}  (the split's image paths are relative to this folder)"]
    elif spec.reader == "imagenet":
        lines = ["classnames.txt  ('<wnid> <class name>' per line)",
                 f"{spec.image_root}/train/<wnid>/<images>",
                 f"{spec.image_root}/val/<wnid>/<images>  (validation images sorted into wnid folders)"]
    elif spec.reader == "fgvc_aircraft":
        lines = ["variants.txt  (one class name per line, in label order)",
                 "images_variant_train.txt, images_variant_val.txt, images_variant_test.txt  ('<id> <variant>')",
                 f"{spec.image_root}/<id>.jpg"]
    elif spec.reader == "imagenet_variant":
        lines = ["classnames.txt  ('<wnid> <class name>' per line, all 1000 ImageNet classes)",
                 f"{spec.image_root}/<wnid>/<images>  (or 0/ .. 999/ folders = line index, as in ImageNetV2)"]
    else:
        lines = [f"(unknown reader {spec.reader!r})"]
    return "\n".join([top] + [f"  {line}" for line in lines])


def read_split_json(path: str | os.PathLike, image_dir: str | os.PathLike, check_files: bool = True,
                    **fields) -> DatasetSplits:
    """Read a CoOp ``split_zhou_*.json`` file.

    Args:
        path: the split JSON: an object with keys train/val/test, each a list of
            ``[relative_image_path, integer_label, classname]``.
        image_dir: the folder the relative paths start from.
        check_files: whether to check that every listed image exists (without opening it).
        **fields: further :class:`DatasetSplits` fields (``name``, ``data_root``, ...).

    Raises:
        DataError: when the file is missing or not valid JSON, a key is missing or not a list, an
            entry is malformed, a list is empty or a listed image is missing.
    """
    path = os.fspath(path)
    image_dir = os.path.normpath(os.path.abspath(os.fspath(image_dir)))
    raw = _load_json_object(path)
    lists = {key: [_parse_entry(entry, key, i, path, image_dir) for i, entry in enumerate(raw[key])]
             for key in _SPLIT_KEYS}
    return make_splits(lists["train"], lists["val"], lists["test"], source=path, check_files=check_files, **fields)


def _load_json_object(path: str) -> dict:
    """Load a split JSON and check it has the three list-valued keys."""
    if not os.path.isfile(path):
        raise MissingFileError(f"split file {path} not found; expected a CoOp split JSON (keys train, val, test)")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"split file {path} is not valid JSON ({exc}); expected a CoOp split JSON") from None
    if not isinstance(raw, dict):
        raise DataError(f"split file {path} holds a {type(raw).__name__}; "
                        "expected an object with keys train, val, test")
    for key in _SPLIT_KEYS:
        if key not in raw:
            raise DataError(f"split file {path} has no key {key!r} (keys found: {sorted(raw)}); "
                            "expected keys train, val, test")
        if not isinstance(raw[key], list):
            raise DataError(f"split file {path}: {key!r} is a {type(raw[key]).__name__}; expected a list of "
                            f"{_ENTRY_FORMAT}")
    return raw


def _parse_entry(entry: object, key: str, index: int, path: str, image_dir: str) -> Item:
    """Turn one ``[relpath, label, classname]`` entry into an :class:`Item`."""
    ok = (
        isinstance(entry, list) and len(entry) == 3
        and isinstance(entry[0], str) and entry[0]
        and isinstance(entry[1], int) and not isinstance(entry[1], bool) and entry[1] >= 0
        and isinstance(entry[2], str)
    )
    if not ok:
        raise DataError(f"split file {path}: entry {index} of {key!r} is {entry!r}; expected {_ENTRY_FORMAT} "
                        "with a non-negative integer label")
    relpath, label, classname = entry
    return Item(os.path.normpath(os.path.join(image_dir, relpath)), label, classname)


def read_fgvc_aircraft(folder: str, image_root: str, check_files: bool = True, **fields) -> DatasetSplits:
    """Read FGVC-Aircraft: ``variants.txt`` gives the label order, ``images_variant_<split>.txt`` the items.

    Each list line is ``<image id> <variant name, may contain spaces>``; the image is
    ``<image_root>/<id>.jpg``.
    """
    variants_file = os.path.join(folder, "variants.txt")
    variants = [line.strip() for line in _read_lines(variants_file)]
    label_of = {name: label for label, name in enumerate(variants)}
    image_dir = os.path.normpath(os.path.join(folder, image_root))
    lists = {}
    for split in _SPLIT_KEYS:
        list_file = os.path.join(folder, f"images_variant_{split}.txt")
        lists[split] = [_parse_variant_line(line, list_file, image_dir, label_of) for line in _read_lines(list_file)]
    return make_splits(lists["train"], lists["val"], lists["test"], source=folder, check_files=check_files,
                       **fields)


def _read_lines(path: str) -> list[str]:
    """Non-blank lines of a text file, or a DataError naming it when it is missing."""
    if not os.path.isfile(path):
        raise MissingFileError(f"file {path} not found")
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def _parse_variant_line(line: str, path: str, image_dir: str, label_of: dict[str, int]) -> Item:
    image_id, _, variant = line.strip().partition(" ")
    if variant not in label_of:
        raise DataError(f"{path}: line {line!r} names variant {variant!r}, which is not in variants.txt; "
                        "expected '<image id> <variant>'")
    return Item(os.path.join(image_dir, f"{image_id}.jpg"), label_of[variant], variant)


def load_splits(name_or_spec: str | DatasetSpec, data_root: str | os.PathLike | None,
                check_files: bool = True) -> DatasetSplits:
    """Load the train/val/test lists of a catalog dataset from ``data_root``.

    Args:
        name_or_spec: a catalog name (``"oxford_pets"``, ``"OxfordPets"``) or a :class:`DatasetSpec`.
        data_root: the folder holding the datasets; None reads ``$DATA_ROOT``.
        check_files: whether to check that every image named by a split file exists (a ``stat``
            per file; images are never opened here).

    Returns:
        The splits, with absolute image paths and class names ordered by label.

    Raises:
        DataError: on a missing data root or dataset folder (the message shows the expected
            layout), a missing or malformed split file, missing images or an empty list.
    """
    root = resolve_data_root(data_root)  # first: it registers the root's own datasets
    spec = resolve_spec(name_or_spec)
    dataset_dir = os.path.join(root, spec.folder)
    if not os.path.isdir(dataset_dir):
        obtain = f" {spec.obtain.format(root=root)}." if spec.obtain else ""
        raise DataError(f"dataset {spec.name!r}: folder {dataset_dir} not found.{obtain} Expected layout:\n"
                        f"{expected_layout(spec)}")
    fields = {"name": spec.name, "data_root": root, "dataset_dir": dataset_dir}
    try:
        return _read(spec, dataset_dir, check_files, fields)
    except MissingFileError as exc:
        raise DataError(f"dataset {spec.name!r}: {exc}. Expected layout:\n{expected_layout(spec)}") from None
    except DataError as exc:
        raise DataError(f"dataset {spec.name!r}: {exc}") from None


def _read(spec: DatasetSpec, dataset_dir: str, check_files: bool, fields: dict) -> DatasetSplits:
    """Dispatch on ``spec.reader``."""
    if spec.reader == "split_json":
        if not spec.split_file:
            raise DataError(f"catalog entry {spec.name!r} has reader 'split_json' but no split_file")
        return read_split_json(Path(dataset_dir) / spec.split_file, Path(dataset_dir) / spec.image_root,
                               check_files, **fields)
    if spec.reader == "fgvc_aircraft":
        return read_fgvc_aircraft(dataset_dir, spec.image_root, check_files, **fields)
    if spec.reader == "imagenet":
        return read_imagenet(dataset_dir, spec.image_root, **fields)
    if spec.reader == "imagenet_variant":
        return read_imagenet_variant(dataset_dir, spec.image_root, **fields)
    raise DataError(f"catalog entry {spec.name!r} has unknown reader {spec.reader!r}; expected one of "
                    "split_json, imagenet, fgvc_aircraft, imagenet_variant")
