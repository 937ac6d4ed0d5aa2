"""Your own dataset, no code: ``alignednorm datasets create NAME --from DIR`` (or ``--from-csv FILE``).

The images are copied (hard-linked where the file system allows) into the CoOp layout under the
data root, ``<root>/<name>/images/<class>/<file>``, with a seeded, stratified split file
``<root>/<name>/split_<name>.json``, and the dataset is recorded in the data root's catalog file
``alignednorm_datasets.json``. Every command that resolves that data root then finds it by name,
base-to-new and few-shot included.

Accepted input:

* ``--from SRC``: ``SRC/<class name>/<image files>``. Images in sub-folders of a class folder belong
  to that class (and are reported, since nested class folders look the same). Files beside the
  class folders, non-image files, hidden entries and links that would loop are skipped and listed.
* ``--from-csv FILE``: a UTF-8 CSV (a byte-order mark is fine) with a header naming the columns
  ``path,label`` and optionally ``split`` (train/val/test, on every row or none); relative paths
  are read from the CSV's folder. A row repeating an earlier one is skipped and listed.

Refused with one line naming the file or class: fewer than 2 classes, a class too small to split,
class names that differ only by case, spaces or underscores, and one image file (also through a
link) given two classes or two splits. The new dataset is built beside the old one and swapped in
only when complete, so a failed or interrupted run never loses the dataset it replaces, and a
dataset can be re-created from its own images (``--from <root>/<name>/images --force``).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
import unicodedata
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from alignednorm.data.catalog import DatasetSpec, get_dataset, register_dataset
from alignednorm.errors import DataError

log = logging.getLogger(__name__)

CATALOG_FILE = "alignednorm_datasets.json"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLITS = ("train", "val", "test")
MIN_CLASSES = 2  # a classifier needs two; base-to-new puts the first half in base and the rest in new
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass
class CreateReport:
    """What ``create_dataset`` did: the spec, images per split, skipped files (with why) and notes."""

    spec: DatasetSpec
    counts: dict[str, int]
    skipped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class Listing:
    """The images of a source, by class; ``given`` holds a CSV's split column, ``nested`` sub-folders per class."""

    classes: dict[str, list[Path]] = field(default_factory=dict)
    given: dict[Path, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    nested: dict[str, list[str]] = field(default_factory=dict)


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
    custom = {s.name for s in register_catalog(data_root)}
    try:
        known = get_dataset(name)
    except KeyError:
        known = None
    if known is not None and known.name not in custom and "custom" not in known.suites:
        raise DataError(f"dataset name {name!r} clashes with the built-in dataset {known.name!r}; choose another name")
    folder = data_root / name
    if name in custom and not overwrite:
        raise DataError(f"dataset {name!r} already exists in {data_root / CATALOG_FILE}; pass --force to replace it")
    if name not in custom and (folder.exists() or folder.is_symlink()):
        raise DataError(f"{folder} already exists and is not a dataset recorded in {data_root / CATALOG_FILE}; "
                        "choose another name or move that folder")


def _normalise(classname: str) -> str:
    return " ".join(classname.replace("_", " ").lower().split())


def _entries(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError as exc:
        raise DataError(f"{folder}: cannot list this folder ({exc.strerror}); expected a readable folder") from None


def _identity(path: Path) -> tuple:
    """The file behind ``path`` (links and hard links included), so one image is never listed twice."""
    stat = path.stat()
    return (stat.st_dev, stat.st_ino) if stat.st_ino else (os.path.realpath(path),)


def _loop(entry: Path) -> str:
    """Why a link to a folder must not be followed ("" when it may): it points at a folder holding it."""
    if not entry.is_symlink():
        return ""
    target, here = entry.resolve(), entry.parent.resolve()
    if target == here or target in here.parents:
        return f"a link to {target}, a folder that holds it (following it would read images twice or loop)"
    return ""


def scan_folder(source: Path) -> Listing:
    """The images of a class-per-folder tree ``source/<class>/<images>``, skipped files with reasons."""
    if not source.is_dir():
        raise DataError(f"--from {source}: not a folder; expected one sub-folder of images per class")
    out, owners = Listing(), {}
    for entry in _entries(source):
        if entry.is_dir() and not (loop := _loop(entry)):
            out.classes[entry.name] = _class_images(entry, owners, out)
        elif entry.is_dir():
            out.skipped[str(entry)] = loop
        elif entry.is_file():
            out.skipped[str(entry)] = f"outside the class folders; expected {source}/<class name>/<image files>"
        else:
            out.skipped[str(entry)] = "a broken link or not a regular file"
    if not out.classes:
        raise DataError(f"--from {source}: no class folders found; expected {source}/<class name>/<image files>")
    return out


def _class_images(folder: Path, owners: dict, out: Listing) -> list[Path]:
    """Every image under one class folder, each file once; a file another class holds is an error."""
    images, nested, seen, stack = [], set(), set(), [folder]
    while stack:
        current = stack.pop()
        if (real := current.resolve()) in seen:
            out.skipped[str(current)] = f"a second way into {real}, already read"
            continue
        seen.add(real)
        folders = []
        for entry in _entries(current):
            if entry.is_dir():
                loop = _loop(entry)
                out.skipped.update({str(entry): loop} if loop else {})
                folders += [] if loop else [entry]
            elif entry.is_file() and entry.suffix.lower() in IMAGE_SUFFIXES:
                if _claim(entry, folder.name, owners, out):
                    images.append(entry)
                    nested.update(entry.relative_to(folder).parts[:-1][:1])
            else:
                out.skipped[str(entry)] = ("not an image file (by its suffix)" if entry.is_file()
                                           else "a broken link or not a regular file")
        stack += reversed(folders)  # depth first, in name order
    if nested:
        out.nested[folder.name] = sorted(nested)
    return sorted(images)


def _recorded_names(source: Path, listing: Listing) -> list[str]:
    """Give the classes of a dataset's own ``images`` folder their recorded names back (its split file's)."""
    split_files = sorted(source.parent.glob("split_*.json")) if source.name == "images" else []
    try:
        split = json.loads(split_files[0].read_text()) if len(split_files) == 1 else {}
        pairs = {(rel.split("/")[0], cls) for s in SPLITS for rel, _, cls in split.get(s, [])}
    except (OSError, ValueError, TypeError, AttributeError):
        return []
    names = dict(pairs)
    if len(names) != len(pairs) or len(set(names.values())) != len(names) or not set(listing.classes) <= set(names):
        return []  # not one name per folder: keep the folder names
    listing.classes = dict(sorted((names[k], v) for k, v in listing.classes.items()))
    listing.nested = {names[k]: v for k, v in listing.nested.items()}
    return [f"class names as recorded in {split_files[0]}"]


def _claim(path: Path, classname: str, owners: dict, out: Listing) -> bool:
    """Record that ``path`` is in ``classname``; False for a second path to a file this class already has."""
    key = _identity(path)
    if key not in owners:
        owners[key] = (classname, path)
        return True
    other_class, other = owners[key]
    if other_class != classname:
        raise DataError(f"{path} is the same file as {other}: it would be in class {classname!r} and in class "
                        f"{other_class!r}; an image belongs to one class, so remove the link or the copy")
    out.skipped[str(path)] = f"the same file as {other} (listed once)"
    return False


def read_csv(path: Path) -> Listing:
    """The images of a CSV ``path,label[,split]`` by class and, with a ``split`` column, each image's split."""
    out, first = Listing(), {}
    rows, columns = _csv_rows(path)
    for line, row in rows:
        image, label, split = _csv_row(path, line, row, columns)
        key = _identity(image)
        if key in first:
            before, *earlier = first[key]
            if earlier != [label, split]:
                raise DataError(f"--from-csv {path} line {line}: {image} is the same image as on line {before} "
                                f"but with label/split {label!r}/{split or '-'} instead of {earlier[0]!r}/"
                                f"{earlier[1] or '-'}; an image belongs to one class and one split")
            out.skipped[f"{path} line {line}"] = f"repeats line {before} ({image}); listed once"
            continue
        first[key] = (line, label, split)
        out.classes.setdefault(label, []).append(image)
        if split:
            out.given[image] = split
    if out.given and len(out.given) != len(first):
        raise DataError(f"--from-csv {path}: the split column is filled on some rows only; fill it on all or none")
    out.classes = dict(sorted(out.classes.items()))
    return out


def _csv_rows(path: Path) -> tuple[list[tuple[int, list[str]]], dict[str, int]]:
    """The non-blank rows with their line numbers, and the column index of path, label and split."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:  # -sig: a byte-order mark is not a column
            reader = csv.reader(handle)
            rows = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise DataError(f"--from-csv {path}: unreadable ({exc}); expected a UTF-8 CSV with columns "
                        "path,label[,split]") from None
    header = [cell.strip().lower() for cell in rows[0][1]] if rows else []
    if not {"path", "label"} <= set(header) or len(set(header)) != len(header):
        raise DataError(f"--from-csv {path}: header {header}; expected a header naming the columns path,label "
                        "(and optionally split), each once")
    if len(rows) == 1:
        raise DataError(f"--from-csv {path}: no rows after the header; expected one row path,label per image")
    columns = {name: header.index(name) for name in ("path", "label", "split") if name in header}
    return rows[1:], {**columns, "width": len(header)}


def _csv_row(path: Path, line: int, row: list[str], columns: dict[str, int]) -> tuple[Path, str, str]:
    if not max(columns["path"], columns["label"]) < len(row) <= columns["width"]:
        raise DataError(f"--from-csv {path} line {line}: {len(row)} fields where the header has {columns['width']} "
                        "columns; quote a value that holds a comma")
    value, label = row[columns["path"]].strip(), row[columns["label"]].strip()
    split = row[columns["split"]].strip().lower() if columns.get("split", len(row)) < len(row) else ""
    image = Path(value) if os.path.isabs(value) else path.parent / value
    if not value or not image.is_file():
        raise DataError(f"--from-csv {path} line {line}: image {value!r} ({image}) is not a file")
    if image.suffix.lower() not in IMAGE_SUFFIXES:
        raise DataError(f"--from-csv {path} line {line}: {image} is not an image file by its suffix; "
                        f"expected one of {' '.join(sorted(IMAGE_SUFFIXES))}")
    if not label:
        raise DataError(f"--from-csv {path} line {line}: empty label")
    if split and split not in SPLITS:
        raise DataError(f"--from-csv {path} line {line}: split {split!r}; expected one of {SPLITS}")
    return image, label, split


def _check_classes(listing: Listing, option: str, source: Path, need: int) -> None:
    classes = listing.classes
    if len(classes) < MIN_CLASSES:
        found = ", ".join(repr(name) for name in classes)
        hint = "".join(f"; if the sub-folders of {name!r} ({', '.join(subs)}) are the classes, pass --from "
                       f"{source / name}" for name, subs in listing.nested.items())
        raise DataError(f"{option} {source}: found {len(classes)} class ({found}); a classifier needs at least "
                        f"{MIN_CLASSES} classes, and base-to-new at least {MIN_CLASSES} (half base, half new){hint}")
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
    """Per class, a seeded shuffle cut into val / test (at least one each) and train (the rest, at least one)."""
    rng = np.random.default_rng(seed)
    out = {s: [] for s in SPLITS}
    for label, (name, images) in enumerate(classes.items()):
        order = [images[i] for i in rng.permutation(len(images))]
        n_val = min(max(1, round(val * len(order))), len(order) - 2)
        n_test = min(max(1, round(test * len(order))), len(order) - n_val - 1)
        parts = {"val": order[:n_val], "test": order[n_val:n_val + n_test], "train": order[n_val + n_test:]}
        for split, files in parts.items():
            out[split] += [(f, label, name) for f in files]
    return out


def _given_split(classes: dict[str, list[Path]], given: dict[Path, str]) -> dict[str, list]:
    out = {s: [] for s in SPLITS}
    for label, (name, images) in enumerate(classes.items()):
        for image in images:
            out[given[image]].append((image, label, name))
        if not any(given[image] == "train" for image in images):
            raise DataError(f"the CSV's split column gives class {name!r} no train image; every class needs one")
    empty = [s for s in SPLITS if not out[s]]
    if empty:
        raise DataError(f"the CSV's split column leaves {empty} empty; every split needs images")
    return out


def _folder_name(classname: str) -> str:
    """A file-system-safe folder name: letters (any script), digits, . _ -; never '.', '..' or empty."""
    text = re.sub(r"[^\w.-]+", "_", unicodedata.normalize("NFC", classname)).strip("._-")
    return text[:80] or "class"


def _class_folders(names) -> dict[str, str]:
    """One folder per class, distinct even ignoring case, so two classes never share one."""
    folders, used = {}, set()
    for name in names:
        base = folder = _folder_name(name)
        k = 2
        while folder.casefold() in used:
            folder, k = f"{base}_{k}", k + 1
        used.add(folder.casefold())
        folders[name] = folder
    return folders


def _file_name(image: Path) -> str:
    return image.name if len(image.name) <= 120 else image.stem[:100] + image.suffix[:10]


def _place(image: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(image, target)
    except FileExistsError:
        raise
    except OSError:  # another file system, or links not allowed
        shutil.copy2(image, target)


def _build(folder: Path, lists: dict[str, list], classes) -> dict[str, list]:
    """Fill ``folder`` with the images (one unique file name each, across splits) and return the split lists."""
    folders = _class_folders(classes)
    split_json, k = {s: [] for s in SPLITS}, 0
    for split, entries in lists.items():
        for image, label, classname in entries:
            relative = f"{folders[classname]}/{k:06d}_{_file_name(image)}"
            _place(image, folder / "images" / relative)
            split_json[split].append([relative, label, classname])
            k += 1
    return split_json


def _swap(new: Path, folder: Path) -> None:
    """Put the complete ``new`` at ``folder``: the old one is renamed aside, and removed only after."""
    if not (folder.exists() or folder.is_symlink()):
        os.replace(new, folder)
        return
    old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(folder, old)
    try:
        os.replace(new, folder)
    except OSError:
        os.replace(old, folder)
        raise
    old.unlink() if old.is_symlink() else shutil.rmtree(old, ignore_errors=True)


def _write(root: Path, spec: DatasetSpec, lists: dict[str, list], classes) -> dict[str, list]:
    """Build the dataset in a hidden folder beside its place and swap it in when complete."""
    build = root / f".{spec.folder}.new-{uuid.uuid4().hex[:8]}"
    try:
        build.mkdir(parents=True)
        split_json = _build(build, lists, classes)
        (build / spec.split_file).write_text(json.dumps(split_json, indent=1))
        _swap(build, root / spec.folder)
    except OSError as exc:
        raise DataError(f"{root / spec.folder}: could not write the dataset ({exc}); nothing was replaced") from None
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return split_json


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
    listing = scan_folder(Path(source)) if source is not None else read_csv(Path(csv_file))
    notes = _recorded_names(Path(source), listing) if source is not None else []
    option, path = ("--from", Path(source)) if source is not None else ("--from-csv", Path(csv_file))
    _check_classes(listing, option, path, 1 if listing.given else 3)
    given = listing.given
    lists = _given_split(listing.classes, given) if given else stratified_split(listing.classes, val, test, seed)
    spec = DatasetSpec(name=name, dassl_name=name, folder=name, image_root="images", split_file=f"split_{name}.json",
                       template=template, num_classes=len(listing.classes), suites=("custom",))
    split_json = _write(root, spec, lists, listing.classes)
    _record(root, spec)
    for path, reason in listing.skipped.items():
        log.debug("skipped %s: %s", path, reason)
    notes += [f"class {name!r} includes the images of its sub-folders {', '.join(subs)} as one class; if those are "
              f"classes, pass --from {Path(source) / name} or list the images in a CSV"
              for name, subs in listing.nested.items()]
    return CreateReport(spec, {s: len(v) for s, v in split_json.items()}, listing.skipped, notes)


def _record(root: Path, spec: DatasetSpec) -> None:
    """Add or replace ``spec`` in the catalog file and in this process's registry."""
    path = root / CATALOG_FILE
    entries = json.loads(path.read_text())["datasets"] if path.is_file() else []
    entries = [e for e in entries if e["name"] != spec.name] + [{**asdict(spec), "suites": list(spec.suites)}]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"datasets": entries}, indent=1) + "\n")
    os.replace(tmp, path)  # a kill never leaves a half-written catalog
    register_dataset(spec, replace=True)
