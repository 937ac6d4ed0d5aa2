"""Your own dataset, no code: ``alignednorm datasets create NAME --from DIR`` (or ``--from-csv FILE``).

The images are copied (hard-linked where the file system allows) into the CoOp layout under the
data root, ``<root>/<name>/images/<class>/<file>``, with a seeded, stratified split file
``<root>/<name>/split_<name>.json``, and the dataset is recorded in the data root's catalog file
``alignednorm_datasets.json``. Every command that resolves that data root then finds it by name,
base-to-new and few-shot included.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from alignednorm.data.catalog import DatasetSpec, get_dataset, register_dataset
from alignednorm.errors import DataError

log = logging.getLogger(__name__)

CATALOG_FILE = "alignednorm_datasets.json"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLITS = ("train", "val", "test")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass
class CreateReport:
    """What ``create_dataset`` did: the spec, images per split, and the files it skipped (with why)."""

    spec: DatasetSpec
    counts: dict[str, int]
    skipped: dict[str, str] = field(default_factory=dict)


def register_catalog(data_root: str | os.PathLike) -> list[DatasetSpec]:
    """Register the datasets recorded in ``data_root``'s catalog file (none when it has no file)."""
    path = Path(data_root) / CATALOG_FILE
    if not path.is_file():
        return []
    try:
        entries = json.loads(path.read_text())["datasets"]
        specs = [DatasetSpec(**{**e, "suites": tuple(e.get("suites", ("custom",)))}) for e in entries]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a readable dataset catalog ({type(exc).__name__}: {exc}); "
                        "expected {\"datasets\": [...]} as `alignednorm datasets create` writes it") from None
    for spec in specs:
        try:
            register_dataset(spec)
        except ValueError:
            raise DataError(f"{path}: dataset {spec.name!r} clashes with a dataset already known under that name; "
                            "rename it in the catalog file") from None
    return specs


def _check_name(name: str, data_root: Path, overwrite: bool) -> None:
    if not _NAME.match(name):
        raise DataError(f"dataset name {name!r}: use lower-case letters, digits and _ (starting with a letter)")
    try:
        known = get_dataset(name)
    except KeyError:
        return
    custom = {s.name for s in register_catalog(data_root)}
    if known.name not in custom:
        raise DataError(f"dataset name {name!r} clashes with the built-in dataset {known.name!r}; choose another name")
    if not overwrite:
        raise DataError(f"dataset {name!r} already exists in {data_root / CATALOG_FILE}; pass --force to replace it")


def _normalise(classname: str) -> str:
    return " ".join(classname.replace("_", " ").lower().split())


def scan_folder(source: Path) -> tuple[dict[str, list[Path]], dict[str, str]]:
    """``{class name: [image files]}`` of a class-per-folder tree, and the skipped files with reasons."""
    if not source.is_dir():
        raise DataError(f"--from {source}: not a folder; expected one sub-folder of images per class")
    classes, skipped = {}, {}
    for folder in sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        skipped.update({str(p): "not an image file (by its suffix)" for p in files if p not in images})
        classes[folder.name] = images
    for path in sorted(p for p in source.iterdir() if p.is_file() and not p.name.startswith(".")):
        skipped[str(path)] = "outside the class folders"
    if not classes:
        raise DataError(f"--from {source}: no class folders found; expected {source}/<class name>/<image files>")
    return classes, skipped


def read_csv(path: Path) -> tuple[dict[str, list[Path]], dict[Path, str]]:
    """``{class: [images]}`` and, when the CSV has a ``split`` column, each image's given split."""
    try:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise DataError(f"--from-csv {path}: unreadable ({exc})") from None
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise DataError(f"--from-csv {path}: expected a header with columns path,label (and optionally split)")
    classes: dict[str, list[Path]] = {}
    given: dict[Path, str] = {}
    for line, row in enumerate(rows, start=2):
        image = Path(row["path"]) if os.path.isabs(row["path"]) else path.parent / row["path"]
        if not image.is_file():
            raise DataError(f"--from-csv {path} line {line}: image {image} does not exist")
        if not (row.get("label") or "").strip():
            raise DataError(f"--from-csv {path} line {line}: empty label")
        classes.setdefault(row["label"].strip(), []).append(image)
        split = (row.get("split") or "").strip().lower()
        if split:
            if split not in SPLITS:
                raise DataError(f"--from-csv {path} line {line}: split {split!r}; expected one of {SPLITS}")
            given[image] = split
    if given and len(given) != len(rows):
        raise DataError(f"--from-csv {path}: the split column is filled on some rows only; fill it on all or none")
    return dict(sorted(classes.items())), given


def _check_classes(classes: dict[str, list[Path]], need: int) -> None:
    seen: dict[str, str] = {}
    for name, images in classes.items():
        if not images:
            raise DataError(f"class {name!r} has no images; remove its folder or add images")
        if len(images) < need:
            raise DataError(f"class {name!r} has {len(images)} images; the split needs at least {need} "
                            "(one per train/val/test)")
        key = _normalise(name)
        if key in seen:
            raise DataError(f"class names {seen[key]!r} and {name!r} are the same after normalisation "
                            "(case, spaces, underscores); merge or rename them")
        seen[key] = name


def stratified_split(classes: dict[str, list[Path]], val: float, test: float, seed: int) -> dict[str, list]:
    """Per class, a seeded shuffle cut into val / test (at least one each) and train (the rest)."""
    rng = np.random.default_rng(seed)
    out = {s: [] for s in SPLITS}
    for label, (name, images) in enumerate(classes.items()):
        order = [images[i] for i in rng.permutation(len(images))]
        n_val = max(1, round(val * len(order)))
        n_test = max(1, round(test * len(order)))
        parts = {"val": order[:n_val], "test": order[n_val:n_val + n_test], "train": order[n_val + n_test:]}
        for split, files in parts.items():
            out[split] += [(f, label, name) for f in files]
    return out


def _given_split(classes: dict[str, list[Path]], given: dict[Path, str]) -> dict[str, list]:
    out = {s: [] for s in SPLITS}
    for label, (name, images) in enumerate(classes.items()):
        for image in images:
            out[given[image]].append((image, label, name))
    empty = [s for s in SPLITS if not out[s]]
    if empty:
        raise DataError(f"the CSV's split column leaves {empty} empty; every split needs images")
    return out


def _place(image: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(image, target)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(image, target)


def create_dataset(name: str, data_root: str | os.PathLike, source: str | os.PathLike | None = None,
                   csv_file: str | os.PathLike | None = None, template: str = "a photo of a {}.", val: float = 0.1,
                   test: float = 0.2, seed: int = 1, overwrite: bool = False) -> CreateReport:
    """Create dataset ``name`` under ``data_root`` from a class-per-folder tree or a CSV (see module docs)."""
    root = Path(data_root)
    if (source is None) == (csv_file is None):
        raise DataError("give exactly one of --from DIR and --from-csv FILE")
    if template.count("{}") != 1:
        raise DataError(f"--template {template!r}: expected exactly one '{{}}' for the class name")
    if not (0 < val < 1 and 0 < test < 1 and val + test < 1):
        raise DataError(f"--val-fraction {val} and --test-fraction {test}: expected two fractions in (0, 1) "
                        "summing to less than 1")
    _check_name(name, root, overwrite)
    skipped: dict[str, str] = {}
    if source is not None:
        classes, skipped = scan_folder(Path(source))
        given = {}
    else:
        classes, given = read_csv(Path(csv_file))
    _check_classes(classes, 1 if given else 3)
    lists = _given_split(classes, given) if given else stratified_split(classes, val, test, seed)
    folder = root / name
    if folder.exists():
        shutil.rmtree(folder)
    split_json = {s: [] for s in SPLITS}
    for split, entries in lists.items():
        for k, (image, label, classname) in enumerate(entries):
            relative = f"{_folder_name(classname)}/{k:06d}_{image.name}"
            _place(image, folder / "images" / relative)
            split_json[split].append([relative, label, classname])
    spec = DatasetSpec(name=name, dassl_name=name, folder=name, image_root="images", split_file=f"split_{name}.json",
                       template=template, num_classes=len(classes), suites=("custom",))
    (folder / spec.split_file).write_text(json.dumps(split_json, indent=1))
    _record(root, spec)
    for path, reason in skipped.items():
        log.warning("skipped %s: %s", path, reason)
    return CreateReport(spec, {s: len(v) for s, v in split_json.items()}, skipped)


def _folder_name(classname: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", classname).strip("_") or "class"


def _record(root: Path, spec: DatasetSpec) -> None:
    """Add or replace ``spec`` in the catalog file and in this process's registry."""
    path = root / CATALOG_FILE
    entries = json.loads(path.read_text())["datasets"] if path.is_file() else []
    entries = [e for e in entries if e["name"] != spec.name] + [{**asdict(spec), "suites": list(spec.suites)}]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"datasets": entries}, indent=1) + "\n")
    os.replace(tmp, path)  # a kill never leaves a half-written catalog
    register_dataset(spec, replace=True)
