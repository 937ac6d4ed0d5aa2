"""The paper's tables (1: base-to-new, 2: cross-dataset, 3: domain generalisation, 4/11: few-shot,
a summary of base-to-new averages per method variant for the ablations, and Nemesis's Table 3 PAN
ablation over few-shot runs) built from run records.

Rows and columns follow the suite the runs name (the paper's 11 datasets, 10 cross-dataset targets
and 4 ImageNet variants), so runs that do not exist show up as missing cells. Conventions
(mean ± population std over seeds, HM of means, averages) are those of :mod:`alignednorm.results`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from alignednorm.data.catalog import Suite, get_suite, list_datasets, list_suites
from alignednorm.results import (
    MISSING,
    TRANSFER,
    Cell,
    Record,
    Table,
    collect,
    difference,
    file_stem,
    harmonic_mean,
    load_paper_results,
    mean_of,
    seed_stat,
)

FEW_SHOT_K = (1, 2, 4, 8, 16)


def _paper(paper: dict | None, *keys) -> Cell:
    node = paper
    for key in keys:
        if not isinstance(node, dict) or str(key) not in node:
            return MISSING
        node = node[str(key)]
    return Cell(float(node)) if isinstance(node, int | float) else MISSING


# -------------------------------------------------------------------------------------- grouping
def _by(records, *fields) -> dict[tuple, list[Record]]:
    groups: dict[tuple, list[Record]] = defaultdict(list)
    for rec in records:
        groups[tuple(getattr(rec, f) for f in fields)].append(rec)
    return groups


def _stat(records: list[Record], **match) -> Cell:
    return seed_stat([r.accuracy for r in records if all(getattr(r, k) == v for k, v in match.items())])


def _order(names: set[str], preferred: tuple[str, ...] = ()) -> list[str]:
    """``preferred`` first, then the other names in catalog order (unknown names last, sorted)."""
    catalog = [n for n in list_datasets() if n in names and n not in preferred]
    rest = sorted(names - set(preferred) - set(catalog))
    return list(preferred) + catalog + rest


def pick_suite(records: list[Record], suite: str | None, fits) -> Suite | None:
    """The suite named, else the first that ``fits`` the runs: the one they recorded, then the registered ones.

    Runs on datasets outside every suite (your own) get no suite: their tables list only those datasets.
    """
    if suite:
        try:
            return get_suite(suite)
        except KeyError:
            pass
    recorded = [r.suite for r in records if r.suite]
    for name in [*recorded, "paper", *list_suites()]:
        if name in list_suites() and fits(get_suite(name)):
            return get_suite(name)
    return None


@dataclass
class Published:
    """The published numbers a table may show beside ours, or why it shows none.

    Attributes:
        numbers: the paper data (``configs/paper/results.json``); empty when ``reason`` is set.
        reason: why no published number applies to the whole table (e.g. your own datasets).
    """

    numbers: dict
    reason: str = ""


def _published_for(paper: dict | None, suite: Suite | None) -> Published | None:
    """The published numbers when the tables are the paper's datasets; the reason for none otherwise."""
    if paper is None:
        return None
    if suite is not None and suite.name == "paper":
        return Published(paper)
    rows = "datasets outside every suite (your own)" if suite is None else f"the {suite.name!r} suite's datasets"
    return Published({}, f"the rows are {rows}, not the paper's benchmark")


def _average_label(present: int, total: int) -> str:
    return "Average" if present == total else f"Average ({present} of {total} datasets)"


# -------------------------------------------------------------------------------------- tables
PAPER_SHOTS = 16  # base-to-new, cross-dataset and domain generalisation in the paper: 16 shots


class _Paper:
    """Published numbers of one protocol and row label; ``enabled`` False means no comparison.

    ``reason`` says why a compared row has no published numbers: your own datasets, a ``--set`` variant
    (not the paper's setting), other shots, or a row the paper does not restate.
    """

    def __init__(self, published: Published | None, protocol: str, label: str, custom: bool = False,
                 shots: int | None = None):
        self.enabled = published is not None
        numbers = published.numbers if published else {}
        self.node = numbers.get(protocol, {}).get(label)
        self.reason = published.reason if published else ""
        if self.enabled and not self.reason:
            self.reason = self._why_not(numbers, protocol, label, custom, shots)
        if self.reason:
            self.node = None
        self.missing = [m.partition(": ")[2] for m in numbers.get("missing", []) if m.startswith(f"{protocol}:")]

    def _why_not(self, numbers: dict, protocol: str, label: str, custom: bool, shots: int | None) -> str:
        if custom:
            return "a --set/--config variant is not the paper's setting (the paper's ablations are --tag variants)"
        if shots is not None and protocol != "fewshot" and shots != PAPER_SHOTS:
            return f"the paper's numbers are for {PAPER_SHOTS} shots, these runs used {shots}"
        if self.node is None:
            known = ", ".join(sorted(numbers.get(protocol, {})))
            return f"the paper publishes no {protocol} row for it (rows published: {known})"
        return ""

    def cells(self, ours: Cell, *keys) -> list[Cell]:
        if not self.enabled:
            return [ours]
        published = _paper(self.node, *keys)
        return [ours, published, difference(ours, published)]

    def header(self, names: list[str]) -> list[str]:
        return [h for n in names for h in ((n, f"{n} (paper)", f"Δ {n}") if self.enabled else (n,))]

    def note(self, label: str, rows: list[tuple[str, list]]) -> str | None:
        """Why published numbers are missing beside ours in ``rows``; None when nothing is missing."""
        if not self.enabled:
            return None
        if self.reason:
            return f"paper: no published numbers for {label}: {self.reason}."
        gaps = [name for name, cells in rows
                if any(not o.missing and p.missing for o, p in zip(cells[::3], cells[1::3]) if isinstance(o, Cell))]
        if not gaps:
            return None
        said = f" (not restated: {'; '.join(self.missing)})" if self.missing else ""
        return f"paper: {label} has no published number for {', '.join(gaps)}{said}."


def _hm_cell(base: Cell, new: Cell) -> Cell:
    value = harmonic_mean(base.mean, new.mean)
    return MISSING if value is None else Cell(value)


def base_to_new_table(recs: list[Record], label: str, shots: int, datasets: list[str],
                      paper: Published | None) -> tuple[Table, list[Cell], int]:
    """Table 1 for one method variant; also returns its average base/new/HM cells and dataset count."""
    ref = _Paper(paper, "base2new", label, custom=recs[0].custom, shots=shots)
    table = Table(f"table1_base2new_{label}_shots{shots}", f"Base-to-new: {label} ({shots} shots)",
                  ref.header(["Base", "New", "HM"]), row_header="dataset",
                  meta={"protocol": "base2new", "label": label, "shots": shots})
    complete = []
    for ds in datasets:
        base, new = _stat(recs, target=ds, metric="base"), _stat(recs, target=ds, metric="new")
        if not base.missing and not new.missing:
            complete.append((base, new))
        hm = _hm_cell(base, new)
        table.rows.append((ds, [*ref.cells(base, ds, "base"), *ref.cells(new, ds, "new"), *ref.cells(hm, ds, "hm")]))
    avg_base, avg_new = mean_of([b for b, _ in complete]), mean_of([n for _, n in complete])
    averages = [avg_base, avg_new, _hm_cell(avg_base, avg_new)]
    table.rows.append((_average_label(len(complete), len(datasets)),
                       [c for cell, key in zip(averages, ("base", "new", "hm"))
                        for c in ref.cells(cell, "average", key)]))
    table.notes.append("HM from the seed-averaged base and new accuracies; the average row's HM is the HM of the "
                       "average base and new (datasets with both measured).")
    table.notes += [n for n in [ref.note(label, table.rows)] if n]
    return table, averages, len(complete)


def _per_dataset_rows(records: list[Record], suite: str | None,
                      paper: dict | None) -> tuple[list[str], Published | None]:
    """The dataset rows of a per-dataset table (in the suite's order) and the suite's published numbers."""
    seen = {r.target for r in records}
    chosen = pick_suite(records, suite, lambda s: seen <= set(s.base2new))
    return _order(seen, tuple(chosen.base2new) if chosen else ()), _published_for(paper, chosen)


def base_to_new_tables(records: list[Record], suite: str | None = None, paper: dict | None = None) -> list[Table]:
    """One Table 1 per method variant and shots, plus a summary of their averages (ablations)."""
    b2n = [r for r in records if r.protocol == "base2new"]
    if not b2n:
        return []
    datasets, published = _per_dataset_rows(b2n, suite, paper)
    tables, summary = [], []
    for (label, shots), recs in sorted(_by(b2n, "label", "shots").items()):
        table, averages, present = base_to_new_table(recs, label, shots, datasets, published)
        tables.append(table)
        summary.append((label, shots, recs[0].custom, averages, present))
    if len(summary) > 1:
        tables.append(_summary_table(summary, len(datasets), published))
    return tables


def _summary_table(summary, total: int, paper: Published | None) -> Table:
    table = Table("table_ablation_base2new", "Base-to-new averages by method and config variant (ablations)",
                  ["Base", "New", "HM", "datasets"], row_header="method", meta={"protocol": "base2new"})
    for label, shots, custom, averages, present in summary:
        name = label if shots == PAPER_SHOTS else f"{label} ({shots} shots)"
        table.rows.append((name, [*averages, f"{present}/{total}"]))
        ref = _Paper(paper, "base2new", label, custom=custom, shots=shots)
        if ref.node is not None:
            published = [_paper(ref.node, "average", k) for k in ("base", "new", "hm")]
            table.rows.append((f"{name} (paper)", [*published, ""]))
            table.rows.append((f"Δ {name}", [*(difference(o, p) for o, p in zip(averages, published)), ""]))
        elif ref.enabled:
            table.notes.append(f"paper: no published numbers for {name}: {ref.reason}.")
    return table


def few_shot_tables(records: list[Record], suite: str | None = None, paper: dict | None = None) -> list[Table]:
    """Tables 4/11: per method variant, accuracy per dataset and K, with the average per K."""
    fs = [r for r in records if r.protocol == "fewshot"]
    if not fs:
        return []
    datasets, published = _per_dataset_rows(fs, suite, paper)
    ks = sorted(set(FEW_SHOT_K) | {r.shots for r in fs})
    tables = []
    for (label,), recs in sorted(_by(fs, "label").items()):
        ref = _Paper(published, "fewshot", label, custom=recs[0].custom)
        table = Table(f"table4_fewshot_{label}", f"Few-shot: {label}", ref.header([f"K={k}" for k in ks]),
                      row_header="dataset", meta={"protocol": "fewshot", "label": label})
        columns = {k: [_stat(recs, target=ds, shots=k) for ds in datasets] for k in ks}
        for i, ds in enumerate(datasets):
            table.rows.append((ds, [c for k in ks for c in ref.cells(columns[k][i], ds, k)]))
        counts = {k: sum(not c.missing for c in columns[k]) for k in ks}
        complete = all(n == len(datasets) for n in counts.values())
        table.rows.append(("Average" if complete else "Average (datasets present)",
                           [c for k in ks for c in ref.cells(mean_of(columns[k]), "average", k)]))
        if not complete:
            table.notes.append("averages over "
                               + ", ".join(f"K={k}: {n} of {len(datasets)}" for k, n in counts.items()))
        table.notes += [n for n in [ref.note(label, table.rows)] if n]
        tables.append(table)
    return tables


def transfer_tables(records: list[Record], suite: str | None = None, paper: dict | None = None) -> list[Table]:
    """Table 2 (cross-dataset) and Table 3 (domain generalisation) per source dataset and shots."""
    transfer = [r for r in records if r.protocol in TRANSFER]
    tables = []
    for (source, shots), recs in sorted(_by(transfer, "dataset", "shots").items()):
        chosen = pick_suite(recs, suite, lambda s, src=source: s.source == src)
        cross, dg = (tuple(chosen.cross_targets), tuple(chosen.dg_targets)) if chosen else ((), ())
        extra = {r.target for r in recs} - set(cross) - set(dg) - {source}
        extra_dg = {r.target for r in recs if r.target in extra and r.protocol == "domaingen"}
        for kind, targets in (("crossdataset", _order(extra - extra_dg, cross)), ("domaingen", _order(extra_dg, dg))):
            if any(r.target in targets for r in recs):
                tables.append(_transfer_table(kind, source, shots, targets, recs, _published_for(paper, chosen)))
    return tables


def _transfer_table(kind: str, source: str, shots: int, targets: list[str], recs: list[Record],
                    paper: Published | None) -> Table:
    number, name = ("2", "Cross-dataset") if kind == "crossdataset" else ("3", "Domain generalisation")
    table = Table(f"table{number}_{kind}_{source}_shots{shots}", f"{name}: trained on {source} ({shots} shots)",
                  [f"{source} (source)", *targets, "Average"], row_header="method",
                  meta={"protocol": kind, "shots": shots})
    for (label,), rows in sorted(_by(recs, "label").items()):
        cells = [_stat(rows, target=t) for t in (source, *targets)]
        average = mean_of(cells[1:])
        present = sum(not c.missing for c in cells[1:])
        table.rows.append((label, [*cells, average]))
        if present < len(targets):
            table.notes.append(f"{label}: average over {present} of {len(targets)} targets")
        ref = _Paper(paper, kind, label, custom=rows[0].custom, shots=shots)
        if ref.node is not None:
            published = [_paper(ref.node, t) for t in (source, *targets, "average")]
            table.rows.append((f"{label} (paper)", published))
            table.rows.append((f"Δ {label}", [difference(o, p) for o, p in zip([*cells, average], published)]))
        elif ref.enabled:
            table.notes.append(f"paper: no published numbers for {label}: {ref.reason}.")
    table.notes.append("Average over the targets (the source excluded).")
    return table


# -------------------------------------------------------------------------------------- PAN ablation
PAN_TERMS = ("pan", "both")  # the Nemesis ``terms`` that run PAN, whose N and selection Table 3 varies


def _method_settings(metrics: Path) -> dict:
    """The ``method`` section an evaluation ran with: its folder's ``config.yaml``, else its training run's."""
    folders = [metrics.parent] + ([metrics.parents[2]] if len(metrics.parents) > 2 else [])
    for folder in folders:
        try:
            config = yaml.safe_load((folder / "config.yaml").read_text())
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(config, dict) and isinstance(config.get("method"), dict):
            return config["method"]
    return {}


def _pan_default(method: str) -> tuple[int, bool]:
    """The method's default ``(pan_positions, pan_search)``: the row the paper marks "(default)"."""
    from alignednorm.errors import ConfigError
    from alignednorm.methods import get_method_class

    try:
        defaults = {f.name: f.default for f in fields(get_method_class(method).Config)}
    except ConfigError:
        return 1, True
    return int(defaults.get("pan_positions", 1)), bool(defaults.get("pan_search", True))


def _pan_row_name(positions: int, search: bool, default: tuple[int, bool], label: str | None) -> str:
    name = f"N = {positions}" + ("" if search else " w/o selection")
    name += " (default)" if (positions, search) == default else ""
    return f"{name} [{label}]" if label else name


def pan_ablation_tables(records: list[Record], suite: str | None = None, compare: bool = False) -> list[Table]:
    """Nemesis's Table 3: few-shot accuracy of PAN per number of corrupted positions N, with and without selection.

    The rows are the few-shot runs of a method with a ``pan_positions`` setting whose ``terms`` run PAN
    (read from each evaluation's ``config.yaml``), one row per ``(N, pan_search)``, ordered as the paper
    (N ascending, "w/o selection" first); the columns are K. A table is built per method and dataset
    once its PAN runs hold at least two such settings (e.g. ``--tag pan-n2 --set method.pan_positions=2``),
    plus the average over datasets when there are several. Two variants with the same N and selection
    (e.g. other ω) are both kept, named by their labels. With ``compare``, the paper's numbers (Nemesis on
    FGVCAircraft, ``configs/paper/nemesis.json``) and the differences follow each row they exist for, when
    the runs are the paper suite's.
    """
    runs: dict[str, list[tuple[tuple[int, bool], Record]]] = defaultdict(list)
    settings: dict[str, dict] = {}
    for rec in records:
        if rec.protocol != "fewshot":
            continue
        if rec.path not in settings:
            settings[rec.path] = _method_settings(Path(rec.path))
        method_cfg = settings[rec.path]
        if method_cfg.get("terms") not in PAN_TERMS or "pan_positions" not in method_cfg:
            continue
        runs[rec.method].append(((int(method_cfg["pan_positions"]), bool(method_cfg.get("pan_search", True))), rec))
    tables = []
    for method, found in sorted(runs.items()):
        if len({key for key, _ in found}) < 2:
            continue  # one setting of N and selection: nothing to ablate
        tables += _pan_method_tables(method, found, suite, load_paper_results("nemesis") if compare else None)
    return tables


def _pan_method_tables(method: str, found: list[tuple[tuple[int, bool], Record]], suite: str | None,
                       paper: dict | None) -> list[Table]:
    labels_of: dict[tuple[int, bool], set[str]] = defaultdict(set)
    for key, rec in found:
        labels_of[key].add(rec.label)
    default = _pan_default(method)
    rows = sorted({(key, rec.label) for key, rec in found}, key=lambda r: (r[0][0], r[0][1], r[1]))
    names = {(key, label): _pan_row_name(*key, default, label if len(labels_of[key]) > 1 else None)
             for key, label in rows}
    recs = [rec for _, rec in found]
    datasets, published = _per_dataset_rows(recs, suite, paper)
    datasets = [ds for ds in datasets if any(r.target == ds for r in recs)]
    ks = sorted(set(FEW_SHOT_K) | {r.shots for r in recs})
    header = [f"K={k}" for k in ks]
    note = ("PAN with N positions drawn and rescaled per batch (method.pan_positions); 'w/o selection' weighs the "
            "N drawn positions without the pre-inference test (method.pan_search=false). Nemesis Table 3 layout.")
    cells: dict[str, dict[tuple, list[Cell]]] = {}
    tables = []
    for ds in datasets:
        table = Table(f"table_ablation_pan_{method}_{ds}", f"PAN ablation (Nemesis Table 3): {method} on {ds}", header,
                      row_header="variant", meta={"protocol": "fewshot", "method": method, "dataset": ds})
        for key, label in rows:
            members = [rec for k, rec in found if k == key and rec.label == label]
            row = [_stat(members, target=ds, shots=k) for k in ks]
            cells.setdefault(ds, {})[(key, label)] = row
            table.rows.append((names[(key, label)], row))
            if published is not None and not published.reason:
                node = published.numbers.get("table3", {}).get(method, {}).get(ds, {}).get(str(key[0]), {})
                numbers = node.get("selection" if key[1] else "without_selection")
                if numbers:
                    reference = [_paper(numbers, k) for k in ks]
                    table.rows.append((f"{names[(key, label)]} (paper)", reference))
                    table.rows.append((f"Δ {names[(key, label)]}", [difference(o, p) for o, p in zip(row, reference)]))
        table.notes.append(note)
        if published is not None:
            shown = any(name.endswith("(paper)") for name, _ in table.rows)
            table.notes.append(f"paper: {published.reason}." if published.reason else
                               "paper: Nemesis Table 3 (CoOp + PAN, RN50, mean of 5 seeds)." if shown else
                               f"paper: no published Table 3 numbers for {method} on {ds} "
                               "(only nemesis on fgvc_aircraft).")
        tables.append(table)
    if len(datasets) > 1:
        table = Table(f"table_ablation_pan_{method}_average", f"PAN ablation (Nemesis Table 3): {method}, "
                      f"average over {len(datasets)} datasets", header, row_header="variant",
                      meta={"protocol": "fewshot", "method": method})
        partial = False
        for row_key in rows:
            columns = [[cells[ds][row_key][i] for ds in datasets] for i in range(len(ks))]
            partial |= any(0 < sum(not c.missing for c in col) < len(datasets) for col in columns)
            table.rows.append((names[row_key], [mean_of(col) for col in columns]))
        table.notes.append(f"Mean over {', '.join(datasets)}.")
        if partial:
            table.notes.append("Some cells average over the datasets present only.")
        tables.append(table)
    return tables


def build_tables(records: list[Record], suite: str | None = None, compare: str | None = None) -> list[Table]:
    """Every table the records allow, in the paper's order (1, 2, 3, 4, ablations)."""
    if compare not in (None, "paper"):
        raise ValueError(f"--compare {compare!r}: only 'paper' is known")
    paper = load_paper_results() if compare == "paper" else None
    b2n = base_to_new_tables(records, suite, paper)
    tables = [t for t in b2n if not t.key.startswith("table_ablation")]
    tables += transfer_tables(records, suite, paper) + few_shot_tables(records, suite, paper)
    return tables + [t for t in b2n if t.key.startswith("table_ablation")] + pan_ablation_tables(records, suite,
                                                                                              compare == "paper")


def build_report(root: str | Path, suite: str | None = None, compare: str | None = None) -> list[Table]:
    """Collect ``root``'s ``metrics.json`` files and build every table they allow."""
    return build_tables(collect(root), suite=suite, compare=compare)


# -------------------------------------------------------------------------------------- views of built tables
def base_to_new_matrix(tables: list[Table]) -> list[Table]:
    """Method × dataset views of the Table 1s (one per shots), regrouped from their cells, not recomputed.

    Rows are grouped by dataset (named on the group's first row), one row per method; the average rows
    keep their "(k of n datasets)"; datasets no method ran are left out and named in a note.
    """
    by_shots: dict[int, list[Table]] = defaultdict(list)
    for table in tables:
        if table.key.startswith("table1_") and "shots" in table.meta:
            by_shots[table.meta["shots"]].append(table)
    out = []
    for shots, group in sorted(by_shots.items()):
        ours = [i for i, h in enumerate(group[0].header) if not h.endswith("(paper)") and not h.startswith("Δ")]
        matrix = Table(f"base2new_matrix_shots{shots}", f"Base-to-new, method × dataset ({shots} shots)",
                       ["method", *group[0].header], row_header="dataset",
                       meta={"protocol": "base2new", "shots": shots})
        not_run = []
        for i, (name, _) in enumerate(group[0].rows):
            rows = [(t.rows[i][0], t.meta["label"], t.rows[i][1]) for t in group]
            if name.startswith("Average"):
                matrix.rows += [(own, [label, *cells]) for own, label, cells in rows]
            elif all(cells[k].missing for _, _, cells in rows for k in ours):
                not_run.append(name)
            else:
                matrix.rows += [(name if j == 0 else "", [label, *cells]) for j, (_, label, cells) in enumerate(rows)]
        matrix.notes = list(dict.fromkeys(n for t in group for n in t.notes))
        if not_run:
            matrix.notes.append(f"not run by any method: {', '.join(not_run)}")
        out.append(matrix)
    return out


def per_dataset_values(matrix: Table) -> dict:
    """Bar-chart data from a method × dataset view.

    Returns:
        ``{"datasets": [..., "Average"], "ours": {label: {"Base"|"New"|"HM": [value or None per dataset]}},
        "paper": {label: {...}}}``; ``paper`` only when the view has published columns.
    """
    header = matrix.header[1:]
    datasets: list[str] = []
    ours: dict[str, dict[str, dict]] = {}
    paper: dict[str, dict[str, dict]] = {}
    current = ""
    for name, cells in matrix.rows:
        current = ("Average" if name.startswith("Average") else name) or current
        datasets += [] if current in datasets else [current]
        label, values = cells[0], dict(zip(header, cells[1:], strict=True))
        for key in ("Base", "New", "HM"):
            ours.setdefault(label, {}).setdefault(key, {})[current] = values[key].mean
            if f"{key} (paper)" in values:
                paper.setdefault(label, {}).setdefault(key, {})[current] = values[f"{key} (paper)"].mean
    as_lists = {side: {label: {k: [v.get(ds) for ds in datasets] for k, v in keys.items()}
                       for label, keys in data.items()} for side, data in (("ours", ours), ("paper", paper))}
    return {"datasets": datasets, **as_lists}


def run_accuracy_table(run_dirs: dict[str, Path]) -> Table | None:
    """The accuracies each run folder recorded (``eval/*/metrics.json``), one row per run, with base/new HM.

    Args:
        run_dirs: ``{row label: run folder}``.
    """
    rows, columns = {}, []
    for label, run_dir in run_dirs.items():
        values: dict[str, Cell | str] = {}
        for rec in sorted(collect(run_dir), key=lambda r: (r.target, r.metric)):
            values["variant"] = f"{rec.label}, {rec.protocol}, {rec.shots} shots"
            values[f"{rec.target} {rec.metric}"] = seed_stat([rec.accuracy])
        for target in sorted({k.rsplit(" ", 1)[0] for k in values if k != "variant"}):
            base, new = values.get(f"{target} base"), values.get(f"{target} new")
            if base and new:
                values[f"{target} HM"] = _hm_cell(base, new)
        columns += [k for k in values if k not in columns]
        rows[label] = values
    if not columns:
        return None
    table = Table("run_accuracy", "Accuracy of the analysed runs (their eval/*/metrics.json, top-1 %)", columns,
                  row_header="run")
    columns.sort(key=lambda c: c != "variant")
    table.rows = [(label, [values.get(c, "" if c == "variant" else MISSING) for c in columns])
                  for label, values in rows.items()]
    table.notes.append("One seed per run; HM = 2·B·N/(B+N) of the run's base and new accuracies.")
    return table


# -------------------------------------------------------------------------------------- the results page
def write_results_page(root: str | Path, records: list[Record], tables: list[Table], folder: str | Path,
                       analysis_dirs: tuple[Path, ...] = ()) -> Path:
    """``report.html`` in ``folder``: one self-contained page of the tables ``report`` built.

    Sections: the method × dataset view per shots with its per-dataset bars (needs matplotlib, else
    said), every table as written to Markdown, and links to ``analyze`` pages of these runs found under
    ``root``, ``folder`` and ``analysis_dirs``. Nothing is computed again: the views regroup ``tables``.
    """
    from html import escape

    from alignednorm.analysis.html_report import PageSection, write_page
    from alignednorm.results import to_html

    root, folder = Path(root), Path(folder)
    sections = []
    for matrix in base_to_new_matrix(tables):
        html = to_html(matrix) + _bars_html(matrix, folder)
        sections.append(PageSection(file_stem(matrix.key), matrix.title, html))
    sections += [PageSection(f"table-{file_stem(t.key)}", t.title, to_html(t)) for t in tables]
    sections.append(PageSection("analysis", "Analysis pages", _analysis_links(root, records, folder,
                                                                                (root, folder, *analysis_dirs))))
    labels = sorted({r.label for r in records})
    intro = (f"<p>{len({r.path for r in records})} evaluations under <code>{escape(str(root))}</code>: "
             f"{escape(', '.join(labels))}; seeds {escape(', '.join(map(str, sorted({r.seed for r in records}))))}. "
             "Cells are the mean over seeds, ± the population standard deviation when two or more seeds ran.</p>")
    return write_page(folder / "report.html", f"alignednorm results: {root.name}", sections, intro=intro)


def _bars_html(matrix: Table, folder: Path) -> str:
    from alignednorm.analysis.html_report import FigureEntry, figure_html

    try:
        from alignednorm.analysis import plots
    except ImportError:
        return '<p class="note">Per-dataset bars need matplotlib: pip install "alignednorm[analysis]".</p>'
    values = per_dataset_values(matrix)
    png = plots.plot_dataset_bars(values, folder / "figures" / f"{file_stem(matrix.key)}.png")
    entry = FigureEntry(matrix.key, matrix.title, png, caption="Per dataset: bars are ours (mean over seeds), "
                        "black ticks the paper's where it published the setting.")
    return "<h3>Per-dataset bars</h3>" + figure_html(entry)


def _analysis_links(root: Path, records: list[Record], folder: Path, places: tuple[Path, ...]) -> str:
    """Links to the ``analyze`` pages whose runs lie under ``root``, or the command that makes one."""
    import os
    from html import escape

    from alignednorm.analysis.html_report import page_runs

    top, pages = root.resolve(), {}
    for place in places:
        for page in sorted(Path(place).rglob("index.html")) if Path(place).is_dir() else []:
            runs = [r for r in page_runs(page) if r == top or top in r.parents]
            if runs:
                pages[page.resolve()] = runs
    if pages:
        items = "".join(f'<li><a href="{escape(os.path.relpath(page, folder.resolve()), quote=True)}">'
                        f"{escape(str(page.parent.name))}</a>: "
                        f"{escape(', '.join(str(r.relative_to(top)) for r in runs))}</li>"
                        for page, runs in pages.items())
        return f"<ul>{items}</ul>"
    runs = sorted({str(Path(r.path).parents[2]) for r in records if r.seed == min(x.seed for x in records)})[:4]
    command = f"alignednorm analyze {' '.join(runs)} --output {root / 'analysis'}"
    return (f"<p>No <code>alignednorm analyze</code> page of these runs was found under {escape(str(root))}. "
            f"Make one (figures of the papers for the runs named):</p><pre>{escape(command)}</pre>")
