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
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from html import escape, unescape
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
    """One leaf of the numbers as HTML: the value, a list, a small matrix, or a summary.

    Non-finite entries (NaN: not applicable, e.g. layers without prompts) are never listed one by one:
    runs of them in a list read "— ×5", matrix rows holding none are left out and counted.
    """
    if arr.ndim == 0:
        return escape(_fmt(arr.item()))
    if arr.dtype.kind in "USO":
        kinds, counts = np.unique(arr.astype(str), return_counts=True)
        return escape(f"{arr.size} labels: " + ", ".join(f"{k} x{c}" for k, c in zip(kinds, counts, strict=True)))
    finite = np.isfinite(arr) if arr.dtype.kind in "fc" else np.ones(arr.shape, dtype=bool)
    if not finite.any():
        return escape(f"not applicable (no finite values, shape {arr.shape})")
    if arr.ndim == 1 and arr.size <= INLINE_VALUES:
        return escape(_compressed(arr.tolist()))
    if arr.ndim == 2 and max(arr.shape) <= MATRIX_SIDE:
        kept = [i for i in range(arr.shape[0]) if finite[i].any()]
        head = "<tr><th></th>" + "".join(f"<th>{j}</th>" for j in range(arr.shape[1])) + "</tr>"
        rows = "".join(f"<tr><th>{i}</th>" + "".join(f"<td>{escape(_fmt(v))}</td>" for v in arr[i].tolist()) + "</tr>"
                       for i in kept)
        dropped = arr.shape[0] - len(kept)
        note = f'<p class="note">{dropped} of {arr.shape[0]} rows have no values (not shown)</p>' if dropped else ""
        return f'<table class="matrix">{head}{rows}</table>{note}'
    values = arr[finite]
    return escape(f"array of shape {arr.shape}; mean {_fmt(values.mean())}, min {_fmt(values.min())}, "
                  f"max {_fmt(values.max())} (all values in the CSV)")


def _compressed(values: list) -> str:
    """``1, 2, — ×3, 4``: runs of non-finite values shown once with their count."""
    parts, gap = [], 0
    for v in [*values, 0.0]:
        if isinstance(v, float) and not math.isfinite(v):
            gap += 1
            continue
        if gap:
            parts.append("—" if gap == 1 else f"— ×{gap}")
            gap = 0
        parts.append(_fmt(v))
    return ", ".join(parts[:-1])


def _fmt(value) -> str:
    if isinstance(value, float | np.floating):
        return f"{value:.4g}" if math.isfinite(value) else "—"
    return str(value)


def _numbers_table(numbers: Mapping) -> str:
    """Scalars as a pivot table (rows: their parents' dotted paths, columns: their own names), arrays one per row."""
    leaves = list(flatten_numbers(numbers))
    scalars = [(key.rpartition("."), arr) for key, arr in leaves if arr.ndim == 0]
    parts = []
    if scalars:
        columns = list(dict.fromkeys(name for (_, _, name), _ in scalars))
        grid: dict[str, dict[str, np.ndarray]] = {}
        for (parent, _, name), arr in scalars:
            grid.setdefault(parent, {})[name] = arr
        head = "<tr><th></th>" + "".join(f"<th>{escape(c)}</th>" for c in columns) + "</tr>"
        body = "".join(f"<tr><th>{escape(parent or '(value)')}</th>" + "".join(
            f"<td>{_value_html(row[c]) if c in row else ''}</td>" for c in columns) + "</tr>"
                       for parent, row in grid.items())
        parts.append(f'<table class="numbers">{head}{body}</table>')
    arrays = "".join(f"<tr><th>{escape(key)}</th><td>{_value_html(arr)}</td></tr>" for key, arr in leaves if arr.ndim)
    if arrays:
        parts.append(f'<table class="numbers">{arrays}</table>')
    return "".join(parts) or "<p>(no numbers)</p>"


STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
img { max-width: 100%; border: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 2px 6px; text-align: left; vertical-align: top; }
table.matrix td, table.matrix th { border: none; padding: 0 4px; text-align: right; }
table.results caption { text-align: left; font-weight: bold; padding: 4px 0; }
table.results td { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.results td.text { text-align: left; }
table.results td.missing { color: #999; }
table.results td.pos { color: #1a7f37; }
table.results td.neg { color: #b42318; }
table.results tr.avg { background: #f3f6fa; font-weight: bold; }
p.note { font-size: 0.8em; color: #555; margin: 0.2em 0; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; font-size: 0.8em; }
section { margin-bottom: 2.5em; }
"""
RUNS_META = "alignednorm-runs"  # <meta> naming the run folders an analysis page shows (found by `report`)


@dataclass
class PageSection:
    """One section of a page: an anchor, a heading and HTML made by this package's renderers (already escaped)."""

    anchor: str
    title: str
    html: str


def figure_html(entry: FigureEntry, files: tuple[Path, Path] | None = None, page_dir: Path | None = None) -> str:
    """A figure's caption, embedded PNG, links to its number files and its numbers table."""
    links = ""
    if files and page_dir is not None:
        rel = [escape(os.path.relpath(p, page_dir).replace(os.sep, "/"), quote=True) for p in files]
        links = f'<p>Numbers: <a href="{rel[0]}">JSON</a> · <a href="{rel[1]}">CSV</a></p>'
    caption = f"<p>{escape(entry.caption)}</p>" if entry.caption else ""
    numbers = _numbers_table(entry.numbers) if entry.numbers else ""
    return (f'{caption}<img src="{png_data_uri(entry.png)}" alt="{escape(entry.title, quote=True)}">'
            f"{links}{numbers}")


def write_page(path: str | Path, title: str, sections: Sequence[PageSection], intro: str = "",
               runs: Sequence[str | Path] = ()) -> Path:
    """One self-contained page: a title, a table of contents and the sections (no script, no external resource).

    Args:
        runs: run folders the page is about, recorded in a ``<meta name="alignednorm-runs">`` so that
            ``alignednorm report`` can link the page from its results page (:func:`page_runs`).
    """
    path = Path(path)
    anchors = [s.anchor for s in sections]
    if len(set(anchors)) != len(anchors):
        raise DataError(f"section anchors {anchors} repeat; expected one unique anchor per section")
    meta = ""
    if runs:
        listed = json.dumps([str(Path(r).resolve()) for r in runs])
        meta = f'<meta name="{RUNS_META}" content="{escape(listed, quote=True)}">'
    body = [f"<h1>{escape(title)}</h1>", intro]
    if sections:
        body.append("<nav><ul>" + "".join(f'<li><a href="#{escape(s.anchor, quote=True)}">{escape(s.title)}</a></li>'
                                          for s in sections) + "</ul></nav>")
    body += [f'<section id="{escape(s.anchor, quote=True)}"><h2>{escape(s.title)}</h2>{s.html}</section>'
             for s in sections]
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">{meta}<title>{escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(b for b in body if b) + "\n</body></html>\n")
    return _atomic_write(path, page)


def page_runs(page: str | Path) -> list[Path]:
    """The run folders a page written with ``runs`` names (empty for any other file)."""
    try:
        head = Path(page).read_text(errors="replace")[:20000]
    except OSError:
        return []
    found = re.search(rf'<meta name="{RUNS_META}" content="([^"]*)">', head)
    if not found:
        return []
    try:
        return [Path(r) for r in json.loads(unescape(found.group(1)))]
    except ValueError:
        return []


def write_report(path: str | Path, figures: Sequence[FigureEntry], configs: Mapping[str, str] | None = None,
                 title: str = "AlignedNorm analysis", skipped: Mapping[str, str] | None = None,
                 numbers_files: bool = True, tables: Sequence = (), runs: Sequence[str | Path] = ()) -> Path:
    """Write one self-contained HTML page with every figure, its numbers and each run's config.

    Args:
        path: the HTML file to write.
        figures: the figures, in page order; each PNG must exist.
        configs: ``{run name: config text}`` (e.g. the run's ``config.yaml``), shown verbatim.
        title: page title.
        skipped: ``{figure or run: one-line reason}`` for analyses that could not run.
        numbers_files: also write each figure's numbers beside its PNG (:func:`write_numbers`)
            and link them from the page.
        tables: :class:`alignednorm.results.Table` objects shown first (e.g. the runs' accuracies).
        runs: the analysed run folders, recorded in the page for ``alignednorm report``'s links.

    Returns:
        The path of the page.
    """
    from alignednorm.results import file_stem, to_html

    path = Path(path)
    names = [f.name for f in figures]
    if len(set(names)) != len(names):
        raise DataError(f"figure names {names} repeat; expected one unique name per figure")
    sections = [PageSection(f"table-{file_stem(t.key)}", t.title, to_html(t)) for t in tables]
    for entry in figures:
        files = write_numbers(entry.numbers, entry.png) if numbers_files else None
        sections.append(PageSection(entry.name, entry.title, figure_html(entry, files, path.parent)))
    if skipped:
        sections.append(PageSection("skipped", "Skipped", "<ul>" + "".join(
            f"<li><b>{escape(k)}</b>: {escape(v)}</li>" for k, v in skipped.items()) + "</ul>"))
    sections += [PageSection(f"config-{i}", f"Config: {run}", f"<pre>{escape(text)}</pre>")
                 for i, (run, text) in enumerate((configs or {}).items())]
    return write_page(path, title, sections, runs=runs)
