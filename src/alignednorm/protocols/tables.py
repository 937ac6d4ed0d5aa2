"""The paper's tables (1: base-to-new, 2: cross-dataset, 3: domain generalisation, 4/11: few-shot,
and a summary of base-to-new averages per method variant for the ablations) built from run records.

Rows and columns follow the suite the runs name (the paper's 11 datasets, 10 cross-dataset targets
and 4 ImageNet variants), so runs that do not exist show up as missing cells. Conventions
(mean ± population std over seeds, HM of means, averages) are those of :mod:`alignednorm.results`.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from alignednorm.data.catalog import Suite, get_suite, list_datasets, list_suites
from alignednorm.results import (
    MISSING,
    TRANSFER,
    Cell,
    Record,
    Table,
    collect,
    difference,
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


def _published_for(paper: dict | None, suite: Suite | None) -> dict | None:
    """The published numbers when the tables are the paper's datasets; an empty set (missing cells) otherwise."""
    if paper is None:
        return None
    return paper if suite is not None and suite.name == "paper" else {}


def _average_label(present: int, total: int) -> str:
    return "Average" if present == total else f"Average ({present} of {total} datasets)"


# -------------------------------------------------------------------------------------- tables
class _Paper:
    """Published numbers of one protocol and row label; ``enabled`` False means no comparison."""

    def __init__(self, paper: dict | None, protocol: str, label: str):
        self.enabled = paper is not None
        self.node = (paper or {}).get(protocol, {}).get(label)

    def cells(self, ours: Cell, *keys) -> list[Cell]:
        if not self.enabled:
            return [ours]
        published = _paper(self.node, *keys)
        return [ours, published, difference(ours, published)]

    def header(self, names: list[str]) -> list[str]:
        return [h for n in names for h in ((n, f"{n} (paper)", f"Δ {n}") if self.enabled else (n,))]


def _hm_cell(base: Cell, new: Cell) -> Cell:
    value = harmonic_mean(base.mean, new.mean)
    return MISSING if value is None else Cell(value)


def base_to_new_table(recs: list[Record], label: str, shots: int, datasets: list[str],
                      paper: dict | None) -> tuple[Table, list[Cell], int]:
    """Table 1 for one method variant; also returns its average base/new/HM cells and dataset count."""
    ref = _Paper(paper, "base2new", label)
    table = Table(f"table1_base2new_{label}_shots{shots}", f"Base-to-new: {label} ({shots} shots)",
                  ref.header(["Base", "New", "HM"]), row_header="dataset")
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
                       [c for cell, key in zip(averages, ("base", "new", "hm")) for c in ref.cells(cell, "average", key)]))
    table.notes.append("HM from the seed-averaged base and new accuracies; the average row's HM is the HM of the "
                       "average base and new (datasets with both measured).")
    return table, averages, len(complete)


def _per_dataset_rows(records: list[Record], suite: str | None, paper: dict | None) -> tuple[list[str], dict | None]:
    """The dataset rows of a per-dataset table (in the suite's order) and the suite's published numbers."""
    seen = {r.target for r in records}
    chosen = pick_suite(records, suite, lambda s: seen <= set(s.base2new))
    return _order(seen, tuple(chosen.base2new) if chosen else ()), _published_for(paper, chosen)


def base_to_new_tables(records: list[Record], suite: str | None = None, paper: dict | None = None) -> list[Table]:
    """One Table 1 per method variant and shots, plus a summary of their averages (ablations)."""
    b2n = [r for r in records if r.protocol == "base2new"]
    if not b2n:
        return []
    datasets, paper = _per_dataset_rows(b2n, suite, paper)
    tables, summary = [], []
    for (label, shots), recs in sorted(_by(b2n, "label", "shots").items()):
        table, averages, present = base_to_new_table(recs, label, shots, datasets, paper)
        tables.append(table)
        summary.append((label, shots, averages, present))
    if len(summary) > 1:
        tables.append(_summary_table(summary, len(datasets), paper))
    return tables


def _summary_table(summary, total: int, paper: dict | None) -> Table:
    table = Table("table_ablation_base2new", "Base-to-new averages by method and config variant (ablations)",
                  ["Base", "New", "HM", "datasets"], row_header="method")
    for label, shots, averages, present in summary:
        name = label if shots == 16 else f"{label} ({shots} shots)"
        table.rows.append((name, [*averages, f"{present}/{total}"]))
        ref = _Paper(paper, "base2new", label)
        if ref.enabled:
            published = [_paper(ref.node, "average", k) for k in ("base", "new", "hm")]
            table.rows.append((f"{name} (paper)", [*published, ""]))
            table.rows.append((f"Δ {name}", [*(difference(o, p) for o, p in zip(averages, published)), ""]))
    return table


def few_shot_tables(records: list[Record], suite: str | None = None, paper: dict | None = None) -> list[Table]:
    """Tables 4/11: per method variant, accuracy per dataset and K, with the average per K."""
    fs = [r for r in records if r.protocol == "fewshot"]
    if not fs:
        return []
    datasets, paper = _per_dataset_rows(fs, suite, paper)
    ks = sorted(set(FEW_SHOT_K) | {r.shots for r in fs})
    tables = []
    for (label,), recs in sorted(_by(fs, "label").items()):
        ref = _Paper(paper, "fewshot", label)
        table = Table(f"table4_fewshot_{label}", f"Few-shot: {label}", ref.header([f"K={k}" for k in ks]),
                      row_header="dataset")
        columns = {k: [_stat(recs, target=ds, shots=k) for ds in datasets] for k in ks}
        for i, ds in enumerate(datasets):
            table.rows.append((ds, [c for k in ks for c in ref.cells(columns[k][i], ds, k)]))
        counts = {k: sum(not c.missing for c in columns[k]) for k in ks}
        complete = all(n == len(datasets) for n in counts.values())
        table.rows.append(("Average" if complete else "Average (datasets present)",
                           [c for k in ks for c in ref.cells(mean_of(columns[k]), "average", k)]))
        if not complete:
            table.notes.append("averages over " + ", ".join(f"K={k}: {n} of {len(datasets)}" for k, n in counts.items()))
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
                    paper: dict | None) -> Table:
    number, name = ("2", "Cross-dataset") if kind == "crossdataset" else ("3", "Domain generalisation")
    table = Table(f"table{number}_{kind}_{source}_shots{shots}", f"{name}: trained on {source} ({shots} shots)",
                  [f"{source} (source)", *targets, "Average"], row_header="method")
    for (label,), rows in sorted(_by(recs, "label").items()):
        cells = [_stat(rows, target=t) for t in (source, *targets)]
        average = mean_of(cells[1:])
        present = sum(not c.missing for c in cells[1:])
        table.rows.append((label, [*cells, average]))
        if present < len(targets):
            table.notes.append(f"{label}: average over {present} of {len(targets)} targets")
        ref = _Paper(paper, kind, label)
        if ref.enabled:
            published = [_paper(ref.node, t) for t in (source, *targets, "average")]
            table.rows.append((f"{label} (paper)", published))
            table.rows.append((f"Δ {label}", [difference(o, p) for o, p in zip([*cells, average], published)]))
    table.notes.append("Average over the targets (the source excluded).")
    return table


def build_tables(records: list[Record], suite: str | None = None, compare: str | None = None) -> list[Table]:
    """Every table the records allow, in the paper's order (1, 2, 3, 4, ablations)."""
    if compare not in (None, "paper"):
        raise ValueError(f"--compare {compare!r}: only 'paper' is known")
    paper = load_paper_results() if compare == "paper" else None
    b2n = base_to_new_tables(records, suite, paper)
    tables = [t for t in b2n if not t.key.startswith("table_ablation")]
    tables += transfer_tables(records, suite, paper) + few_shot_tables(records, suite, paper)
    return tables + [t for t in b2n if t.key.startswith("table_ablation")]




def build_report(root: str | Path, suite: str | None = None, compare: str | None = None) -> list[Table]:
    """Collect ``root``'s ``metrics.json`` files and build every table they allow."""
    return build_tables(collect(root), suite=suite, compare=compare)
