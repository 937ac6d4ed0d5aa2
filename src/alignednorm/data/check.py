"""``datasets check``: which catalog datasets under ``DATA_ROOT`` are usable, and what is wrong with the rest.

Each dataset is read with the same readers training uses, checking that every listed image
exists (one ``stat`` per file, no decoding), so a dataset reported "ok" loads.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from alignednorm.errors import DataError

from .catalog import DatasetSpec, list_datasets
from .coop_layout import expected_layout, load_splits, resolve_data_root, resolve_spec

STATUSES = ("ok", "missing", "broken")


@dataclass
class DatasetCheck:
    """The state of one dataset under ``DATA_ROOT``.

    Attributes:
        name: catalog name.
        status: ``"ok"``, ``"missing"`` (no dataset folder) or ``"broken"`` (folder present, but
            a file is missing or malformed, or the class count is wrong).
        folder: the dataset folder looked at.
        layout: the expected layout under ``DATA_ROOT``.
        num_classes: classes found (None unless the splits could be read).
        num_train: training items found.
        num_val: validation items found.
        num_test: test items found.
        problem: the first problem found, naming the file; None when ok.
    """

    name: str
    status: str
    folder: str
    layout: str
    num_classes: int | None = None
    num_train: int | None = None
    num_val: int | None = None
    num_test: int | None = None
    problem: str | None = None


def check_dataset(spec: DatasetSpec, data_root: str) -> DatasetCheck:
    """Check one dataset under an already resolved ``data_root``."""
    folder = os.path.join(data_root, spec.folder)
    result = DatasetCheck(spec.name, "missing", folder, expected_layout(spec))
    if not os.path.isdir(folder):
        result.problem = f"folder {folder} not found"
        return result
    try:
        splits = load_splits(spec, data_root, check_files=True)
    except DataError as exc:
        result.status, result.problem = "broken", str(exc)
        return result
    result.num_classes = splits.num_classes
    result.num_train, result.num_val, result.num_test = len(splits.train), len(splits.val), len(splits.test)
    if spec.num_classes is not None and splits.num_classes != spec.num_classes:
        result.status = "broken"
        result.problem = f"found {splits.num_classes} classes in {folder}, expected {spec.num_classes}"
    else:
        result.status = "ok"
    return result


def check_data_root(data_root: str | os.PathLike | None,
                    names: Sequence[str | DatasetSpec] | None = None) -> list[DatasetCheck]:
    """Check the given datasets (default: the whole catalog) under ``data_root``.

    Args:
        data_root: the folder holding the datasets; None reads ``$DATA_ROOT``.
        names: catalog names or specs to check.

    Raises:
        DataError: when the data root itself is missing or a name is unknown.
    """
    root = resolve_data_root(data_root)
    specs = [resolve_spec(name) for name in (names if names is not None else list_datasets())]
    return [check_dataset(spec, root) for spec in specs]


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def format_check(results: Sequence[DatasetCheck]) -> str:
    """A table of ``results``, then the full problem of each dataset not ok (with the layout when missing)."""
    header = ("dataset", "status", "classes", "train", "val", "test", "problem")
    rows = [(r.name, r.status, _count(r.num_classes), _count(r.num_train), _count(r.num_val), _count(r.num_test),
             r.problem.splitlines()[0][:80] if r.problem else "") for r in results]
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths)) + "  " + row[-1]
             for row in (header, *rows)]
    lines = [line.rstrip() for line in lines]
    for r in results:
        if r.status == "missing":
            lines += ["", f"{r.name} (missing): {r.problem}. Expected layout:", r.layout]
        elif r.status == "broken":
            # Messages about missing files already carry the layout (see load_splits).
            lines += ["", f"{r.name} (broken): {r.problem}"]
    return "\n".join(lines)
