"""The numbers behind each figure as JSON and CSV, and one self-contained HTML report page.

The page embeds every PNG as a ``data:image/png;base64`` URI and uses inline CSS only, so it
loads no external resource and can be mailed or archived as one file. All text (titles, run
names, config files, numbers) is HTML-escaped.

CSV files use a long format that fits any nested numbers: columns ``key`` (dotted path, e.g.
``mmrlpp.base.mean``), ``index`` (the element's array index, e.g. ``3`` or ``2,1``; empty for a
scalar) and ``value``. NaN and infinities are written as empty CSV cells and JSON ``null``.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

import numpy as np

from alignednorm.errors import DataError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
INLINE_VALUES = 32  # longest 1-D array shown in full on the page
MATRIX_SIDE = 24  # largest 2-D array shown as a table on the page


@dataclass
class FigureEntry:
    """One figure of the report.

    Attributes:
        name: file stem and HTML anchor, e.g. ``"norm_ratio"``.
        title: heading shown on the page.
        png: the PNG a ``plots.plot_*`` function wrote.
        numbers: the numbers behind the figure (nested dicts of scalars and arrays).
        caption: one or two sentences saying what the figure shows.
    """

    name: str
    title: str
    png: Path
    numbers: Mapping = field(default_factory=dict)
    caption: str = ""


def to_jsonable(obj):
    """``obj`` with numpy/torch arrays and scalars as lists and numbers; NaN and inf as ``None``."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if hasattr(obj, "detach"):  # a torch tensor, without importing torch here
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, str | bool | int | float):
        return obj
    return str(obj)


def flatten_numbers(numbers: Mapping, prefix: str = "") -> Iterator[tuple[str, np.ndarray]]:
    """``(dotted key, array)`` for every leaf of nested numbers (scalars become 0-d arrays)."""
    for key, value in numbers.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            yield from flatten_numbers(value, path)
        else:
            yield path, np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)


def _csv_text(numbers: Mapping) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["key", "index", "value"])
    for key, arr in flatten_numbers(numbers):
        for index, value in np.ndenumerate(arr):
            writer.writerow([key, ",".join(map(str, index)), _cell(value)])
    return out.getvalue()


def _cell(value) -> str:
    value = value.item() if isinstance(value, np.generic) else value
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ""
    return str(value)


def _atomic_write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    os.replace(tmp, path)
    return path


def write_numbers(numbers: Mapping, png: str | Path) -> tuple[Path, Path]:
    """Write ``numbers`` beside ``png`` as ``<stem>.json`` and ``<stem>.csv``.

    Returns:
        ``(json_path, csv_path)``.
    """
    if not isinstance(numbers, Mapping):
        raise DataError(f"numbers is a {type(numbers).__name__}; expected a mapping of names to numbers")
    png = Path(png)
    text = json.dumps(to_jsonable(numbers), indent=2, allow_nan=False)
    return (_atomic_write(png.with_suffix(".json"), text + "\n"),
            _atomic_write(png.with_suffix(".csv"), _csv_text(numbers)))


def png_data_uri(png: str | Path) -> str:
    """``data:image/png;base64,...`` of a PNG file."""
    path = Path(png)
    if not path.is_file():
        raise DataError(f"figure {path} does not exist; expected a PNG written by alignednorm.analysis.plots")
    data = path.read_bytes()
    if not data.startswith(PNG_SIGNATURE):
        raise DataError(f"figure {path} is not a PNG file (bad signature); expected a PNG")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _value_html(arr: np.ndarray) -> str:
    """One leaf of the numbers as HTML: the value, a list, a small matrix, or a summary."""
    if arr.ndim == 0:
        return escape(_fmt(arr.item()))
    if arr.dtype.kind in "USO":
        kinds, counts = np.unique(arr.astype(str), return_counts=True)
        return escape(f"{arr.size} labels: " + ", ".join(f"{k} x{c}" for k, c in zip(kinds, counts, strict=True)))
    if arr.ndim == 1 and arr.size <= INLINE_VALUES:
        return escape(", ".join(_fmt(v) for v in arr.tolist()))
    if arr.ndim == 2 and max(arr.shape) <= MATRIX_SIDE:
        rows = "".join("<tr>" + "".join(f"<td>{escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in arr.tolist())
        return f'<table class="matrix">{rows}</table>'
    finite = arr[np.isfinite(arr)] if arr.dtype.kind in "fc" else arr.ravel()
    stats = (f"; mean {_fmt(finite.mean())}, min {_fmt(finite.min())}, max {_fmt(finite.max())}"
             if finite.size else "")
    return escape(f"array of shape {arr.shape}{stats} (all values in the CSV)")


def _fmt(value) -> str:
    if isinstance(value, float | np.floating):
        return f"{value:.4g}" if math.isfinite(value) else "—"
    return str(value)


def _numbers_table(numbers: Mapping) -> str:
    rows = "".join(f"<tr><th>{escape(key)}</th><td>{_value_html(arr)}</td></tr>"
                   for key, arr in flatten_numbers(numbers))
    return f'<table class="numbers">{rows}</table>' if rows else "<p>(no numbers)</p>"


STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
img { max-width: 100%; border: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 2px 6px; text-align: left; vertical-align: top; }
table.matrix td { border: none; padding: 0 4px; text-align: right; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; font-size: 0.8em; }
section { margin-bottom: 2.5em; }
"""


def _figure_html(entry: FigureEntry, files: tuple[Path, Path] | None, page_dir: Path) -> str:
    links = ""
    if files:
        rel = [escape(os.path.relpath(p, page_dir).replace(os.sep, "/"), quote=True) for p in files]
        links = f'<p>Numbers: <a href="{rel[0]}">JSON</a> · <a href="{rel[1]}">CSV</a></p>'
    caption = f"<p>{escape(entry.caption)}</p>" if entry.caption else ""
    return (f'<section id="{escape(entry.name, quote=True)}"><h2>{escape(entry.title)}</h2>{caption}'
            f'<img src="{png_data_uri(entry.png)}" alt="{escape(entry.title, quote=True)}">'
            f"{links}{_numbers_table(entry.numbers)}</section>")


def write_report(path: str | Path, figures: Sequence[FigureEntry], configs: Mapping[str, str] | None = None,
                 title: str = "AlignedNorm analysis", skipped: Mapping[str, str] | None = None,
                 numbers_files: bool = True) -> Path:
    """Write one self-contained HTML page with every figure, its numbers and each run's config.

    Args:
        path: the HTML file to write.
        figures: the figures, in page order; each PNG must exist.
        configs: ``{run name: config text}`` (e.g. the run's ``config.yaml``), shown verbatim.
        title: page title.
        skipped: ``{figure or run: one-line reason}`` for analyses that could not run.
        numbers_files: also write each figure's numbers beside its PNG (:func:`write_numbers`)
            and link them from the page.

    Returns:
        The path of the page.
    """
    path = Path(path)
    names = [f.name for f in figures]
    if len(set(names)) != len(names):
        raise DataError(f"figure names {names} repeat; expected one unique name per figure")
    body = [f"<h1>{escape(title)}</h1>"]
    if figures:
        body.append("<nav><ul>" + "".join(f'<li><a href="#{escape(f.name, quote=True)}">{escape(f.title)}</a></li>'
                                          for f in figures) + "</ul></nav>")
    for entry in figures:
        files = write_numbers(entry.numbers, entry.png) if numbers_files else None
        body.append(_figure_html(entry, files, path.parent))
    if skipped:
        body.append("<section><h2>Skipped</h2><ul>" + "".join(
            f"<li><b>{escape(k)}</b>: {escape(v)}</li>" for k, v in skipped.items()) + "</ul></section>")
    for run, text in (configs or {}).items():
        body.append(f"<section><h2>Config: {escape(run)}</h2><pre>{escape(text)}</pre></section>")
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    return _atomic_write(path, page)
