"""Run results: records read from ``metrics.json`` files, statistics over seeds, and table rendering.

Every number comes from a run's ``metrics.json`` (never from logs); the paper-shaped tables are
assembled in :mod:`alignednorm.protocols.tables` and rendered here as Markdown, CSV or LaTeX.
Conventions follow the reference ``parse_test_res.py`` and the papers:

- a cell is the mean over seeds with the population standard deviation (``np.std``) and the
  number of seeds; per-seed accuracies are not rounded first (the official logs round to 0.1);
- base-to-new HM = 2·B·N/(B+N) of the seed-averaged base and new accuracies; the "Average" row is
  the mean base and mean new over datasets and the HM of those two means;
- cross-dataset and domain-generalisation averages are over the targets (the source excluded);
  few-shot averages are over datasets per K;
- a run that does not exist is shown as missing ("—" in Markdown, "--" in LaTeX, an empty CSV
  cell), never as zero, and an average over fewer datasets than the table has says so.

``--compare paper`` adds the published numbers (``configs/paper/results.json``) and the difference.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import math
import re
import shlex
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

log = logging.getLogger(__name__)

TRANSFER = ("crossdataset", "domaingen")


# -------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Record:
    """One accuracy of one seed, as found in a ``metrics.json``."""

    protocol: str
    method: str
    variant: str
    dataset: str
    target: str
    metric: str
    shots: int
    seed: int
    accuracy: float
    suite: str | None = None
    path: str = ""
    settings: str = ""

    @property
    def label(self) -> str:
        return run_label(self.method, self.variant, self.settings)

    @property
    def custom(self) -> bool:
        """A variant named by a hash of ``--set``/``--config`` (no ``--tag``)."""
        return self.variant.startswith("custom-")


def run_label(method: str, variant: str, settings: str = "") -> str:
    """``method`` for the default config, ``method-variant`` otherwise (the paper data's keys), with the
    method's note when it has one (e.g. EMPL's "unofficial reconstruction"), so every report row says it.

    A ``custom-<hash>`` variant (``--set``/``--config`` without ``--tag``) is named by its ``settings``
    instead of the hash: ``alignednorm [train.epochs=5, method.beta=0.2]``.
    """
    if variant.startswith("custom-") and settings:
        suffix = variant.partition("+")[2]
        label = f"{method} [{settings}]" + (f"+{suffix}" if suffix else "")
    else:
        label = method if variant == "default" else f"{method}-{variant}"
    note = _method_note(method)
    return f"{label} ({note})" if note else label


def variant_settings(run_dir: Path) -> str:
    """The user's settings of a run, from the command its ``run.json`` records: ``--set`` values and
    ``--config`` file names, in the order given (empty when the run records no command)."""
    try:
        command = json.loads((run_dir / "run.json").read_text()).get("command") or ""
        words = shlex.split(command)
    except (OSError, ValueError, AttributeError):
        return ""
    out = []
    for option, value in itertools.pairwise(words):
        if option == "--set":
            out.append(value)
        elif option == "--config":
            out.append(f"config {Path(value).name}")
    return ", ".join(out)


def _method_note(method: str) -> str:
    from alignednorm.errors import ConfigError
    from alignednorm.methods import get_method_class

    try:
        return get_method_class(method).traits.note.split(" (")[0]
    except ConfigError:  # a run of a method this installation does not know: its name alone
        return ""


def records_from(data: dict, path: Path, root: Path) -> list[Record]:
    """The records of one ``metrics.json``; training runs whose evaluations live elsewhere give none.

    Files written by the protocols name everything they measured; older single-run files
    (``alignednorm train``: ``<protocol>/<dataset>/<method>/seed<S>``) get their protocol from the path.
    """
    evals = data.get("eval") or {}
    if "protocol" in data:
        protocol, variant, suite = data["protocol"], data.get("variant", "default"), data.get("suite")
        if data.get("description_fallback"):  # a description method that ran on templates is its own row
            variant = f"{variant}+templates-no-descriptions"
    else:
        parts = path.relative_to(root).parts
        protocol, variant, suite = (parts[0] if len(parts) > 1 else "unknown"), "default", None
    settings = ""
    if variant.startswith("custom-"):  # the eval file sits in <run>/eval/<target>/ or names its training run
        places = ([Path(data["train_run"])] if data.get("train_run") else []) + list(path.parents)[:3]
        run_dir = next((d for d in places if (d / "run.json").is_file()), None)
        settings = variant_settings(run_dir) if run_dir else ""
    out = []
    for name, result in evals.items():
        accuracy = result.get("accuracy") if isinstance(result, dict) else None
        if not isinstance(accuracy, int | float) or not math.isfinite(accuracy):
            continue
        out.append(Record(protocol=protocol, method=data["method"], variant=variant, dataset=data["dataset"],
                          target=data.get("target") or result.get("dataset") or data["dataset"], metric=name,
                          shots=int(data.get("shots", 0)), seed=int(data["seed"]), accuracy=float(accuracy),
                          suite=suite, path=str(path), settings=settings))
    return out


def collect(root: str | Path) -> list[Record]:
    """Every record under ``root``; unreadable files are skipped with a warning.

    Two files recording the same run (protocol, method, variant, dataset, target, metric, shots,
    seed) give one record: the newer file's (by modification time), named in a warning.
    """
    root = Path(root)
    found: dict[tuple, Record] = {}
    for path in sorted(root.rglob("metrics.json")):
        try:
            data = json.loads(path.read_text())
            records = records_from(data, path, root)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("skipping %s: %s", path, exc)
            continue
        for rec in records:
            protocol = "transfer" if rec.protocol in TRANSFER else rec.protocol
            key = (protocol, rec.method, rec.variant, rec.dataset, rec.target, rec.metric, rec.shots, rec.seed)
            if key in found and found[key].path != rec.path:
                newer, older = sorted((found[key], rec), key=lambda r: (Path(r.path).stat().st_mtime_ns, r.path))[::-1]
                log.warning("%s and %s record the same run; using the newer %s", older.path, newer.path, newer.path)
                rec = newer
            found[key] = rec
    return list(found.values())


# -------------------------------------------------------------------------------------- cells
@dataclass(frozen=True)
class Cell:
    """A table entry: a mean (None = missing), its std and number of seeds, or a derived value.

    Attributes:
        mean: the value; None when the run is missing.
        std: population std over seeds (None for derived values).
        n: number of seeds behind ``mean`` (None for derived values: HM, averages, paper numbers).
        signed: a difference, printed with its sign.
    """

    mean: float | None = None
    std: float | None = None
    n: int | None = None
    signed: bool = False

    @property
    def missing(self) -> bool:
        return self.mean is None


MISSING = Cell()


def seed_stat(values: list[float]) -> Cell:
    """Mean, population std and count of per-seed accuracies; missing when there are none."""
    if not values:
        return MISSING
    mean = sum(values) / len(values)
    return Cell(mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)), len(values))


def harmonic_mean(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def mean_of(cells: list[Cell]) -> Cell:
    """Plain mean of present cells (a derived value); missing when none is present."""
    values = [c.mean for c in cells if not c.missing]
    return Cell(sum(values) / len(values)) if values else MISSING


def difference(ours: Cell, paper: Cell) -> Cell:
    if ours.missing or paper.missing:
        return Cell(signed=True)
    return Cell(ours.mean - paper.mean, signed=True)


@dataclass
class Table:
    """A table independent of its format.

    Attributes:
        key: file stem when written (``table1_base2new_alignednorm_shots16``).
        title: caption.
        header: the value columns' names; ``row_header`` names the label column.
        rows: ``(label, cells)``, a cell being a :class:`Cell` or plain text.
        notes: lines printed under the table.
        meta: what the rows were built from (``protocol``, ``label``, ``shots``), for views that
            regroup finished tables (the results page) without computing anything again.
    """

    key: str
    title: str
    header: list[str]
    rows: list[tuple[str, list[Cell | str]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    row_header: str = ""
    meta: dict = field(default_factory=dict)


# -------------------------------------------------------------------------------------- paper data
def load_paper_results(name: str = "results") -> dict:
    """The published numbers shipped with the package: ``configs/paper/<name>.json`` (``results``: the
    AlignedNorm paper's tables; ``nemesis``: the Nemesis paper's Table 3)."""
    path = resources.files("alignednorm") / "configs" / "paper" / f"{name}.json"
    return json.loads(path.read_text())


# -------------------------------------------------------------------------------------- rendering
FORMATS = ("md", "csv", "latex")
_SUFFIX = {"md": "md", "csv": "csv", "latex": "tex"}


def format_cell(cell: Cell | str, latex: bool = False) -> str:
    if isinstance(cell, str):
        return cell
    if cell.missing:
        return "--" if latex else "—"
    text = f"{cell.mean:+.2f}" if cell.signed else f"{cell.mean:.2f}"
    if cell.std is not None and (cell.n or 0) >= 2:  # one seed has no spread to show
        text += f"$\\pm${cell.std:.2f}" if latex else f" ± {cell.std:.2f}"
    return text


def seeds_text(cells: list[Cell | str]) -> str:
    """The seeds behind a row's measured cells: ``3``, or ``2–3`` when they differ; empty for derived rows."""
    ns = sorted({c.n for c in cells if isinstance(c, Cell) and c.n})
    if not ns:
        return ""
    return str(ns[0]) if len(ns) == 1 else f"{ns[0]}–{ns[-1]}"


def _has_seeds(table: Table) -> bool:
    return any(isinstance(c, Cell) and c.n for _, cells in table.rows for c in cells)


def to_markdown(table: Table) -> str:
    seeds = _has_seeds(table)
    header = [table.row_header, *table.header, *(["seeds"] if seeds else [])]
    lines = [f"### {table.title}", "", "| " + " | ".join(header) + " |",
             "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    for label, cells in table.rows:
        row = [label, *(format_cell(c) for c in cells), *([seeds_text(cells)] if seeds else [])]
        lines.append("| " + " | ".join(row) + " |")
    lines += [""] + [f"_{note}_" for note in table.notes]
    return "\n".join(lines).rstrip() + "\n"


def to_csv(table: Table) -> str:
    """Machine-readable: a mean column per header entry, plus ``_std`` and ``_n`` where seeds exist."""
    with_n = [any(isinstance(cells[i], Cell) and cells[i].n for _, cells in table.rows)
              for i in range(len(table.header))]
    header = [table.row_header]
    for name, has_n in zip(table.header, with_n):
        header += [name, f"{name}_std", f"{name}_n"] if has_n else [name]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for label, cells in table.rows:
        row = [label]
        for cell, has_n in zip(cells, with_n):
            if isinstance(cell, str):
                row += [cell] + (["", ""] if has_n else [])
                continue
            row.append("" if cell.missing else f"{cell.mean:.4f}")
            if has_n:
                row += ["" if cell.std is None else f"{cell.std:.4f}", "" if not cell.n else str(cell.n)]
        writer.writerow(row)
    return out.getvalue()


def _latex_escape(text: str) -> str:
    for char, repl in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                       ("Δ", r"$\Delta$"), ("—", "--"), ("–", "--")):
        text = text.replace(char, repl)
    return text


def to_latex(table: Table) -> str:
    """A ``table`` environment with a booktabs ``tabular`` (needs ``\\usepackage{booktabs}``)."""
    seeds = _has_seeds(table)
    header = [table.row_header, *table.header, *(["seeds"] if seeds else [])]
    lines = [r"\begin{table}[t]", r"\centering", r"\small", f"\\caption{{{_latex_escape(table.title)}}}",
             f"\\label{{tab:{table.key.replace('_', '-')}}}",
             f"\\begin{{tabular}}{{l{'c' * (len(header) - 1)}}}", r"\toprule",
             " & ".join(_latex_escape(h) for h in header) + r" \\", r"\midrule"]
    for label, cells in table.rows:
        if label.startswith("Average"):
            lines.append(r"\midrule")
        row = [_latex_escape(label), *(format_cell(c, latex=True) for c in cells),
               *([_latex_escape(seeds_text(cells))] if seeds else [])]
        lines.append(" & ".join(row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [f"\\par\\footnotesize {_latex_escape(note)}" for note in table.notes]
    return "\n".join(lines + [r"\end{table}"]) + "\n"


def to_html(table: Table, anchor: str | None = None) -> str:
    """An HTML ``<table>`` with its caption and notes (escaped; for the report and analysis pages).

    Missing cells read "—" (class ``missing``), differences carry ``pos``/``neg``, and rows whose label
    starts with "Average" carry ``avg``; a "seeds" column is added when measured cells exist.
    """
    from html import escape

    seeds = _has_seeds(table)
    header = [table.row_header, *table.header, *(["seeds"] if seeds else [])]
    ident = f' id="{escape(anchor or "t-" + file_stem(table.key), quote=True)}"'
    lines = [f'<table class="results"{ident}><caption>{escape(table.title)}</caption>',
             "<thead><tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr></thead><tbody>"]
    for label, cells in table.rows:
        row_class = ' class="avg"' if label.startswith("Average") else ""
        tds = "".join(_html_cell(c) for c in cells) + (f"<td>{escape(seeds_text(cells))}</td>" if seeds else "")
        lines.append(f"<tr{row_class}><th>{escape(label)}</th>{tds}</tr>")
    lines.append("</tbody></table>")
    lines += [f'<p class="note">{escape(note)}</p>' for note in table.notes]
    return "\n".join(lines)


def _html_cell(cell: Cell | str) -> str:
    from html import escape

    if isinstance(cell, str):
        numeric = re.fullmatch(r"[-+]?[\d.,]+|[-—]?", cell.strip()) is not None
        return f"<td>{escape(cell)}</td>" if numeric else f'<td class="text">{escape(cell)}</td>'
    kind = "missing" if cell.missing else ("pos" if cell.signed and cell.mean >= 0 else "neg" if cell.signed else "")
    return (f'<td class="{kind}">' if kind else "<td>") + escape(format_cell(cell)) + "</td>"


def render(table: Table, fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")
    return {"md": to_markdown, "csv": to_csv, "latex": to_latex}[fmt](table)


def render_all(tables: list[Table], fmt: str) -> str:
    """All tables in one text; CSV tables are preceded by a ``# title`` line."""
    if fmt == "csv":
        return "\n".join(f"# {t.title}\n{to_csv(t)}" for t in tables)
    return "\n".join(render(t, fmt) for t in tables)


def file_stem(key: str) -> str:
    """A table key as a file name: labels may hold spaces and parentheses (a method's note)."""
    return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9._+-]+", "_", key)).strip("_")


def write_report(tables: list[Table], out_dir: str | Path) -> list[Path]:
    """Write every table as ``<key>.md``, ``.csv`` and ``.tex``, plus ``report.md`` with all of them."""
    from alignednorm.engine.io import write_text

    out_dir = Path(out_dir)
    written = [write_text(out_dir / f"{file_stem(t.key)}.{_SUFFIX[fmt]}", render(t, fmt))
               for t in tables for fmt in FORMATS]
    written.append(write_text(out_dir / "report.md", render_all(tables, "md") if tables else "No results found.\n"))
    return written
