"""``alignednorm report --cost``: what each method's runs cost, in the shape of the paper's Table 5.

Read from the run folders (never from logs): ``run.json`` (learnable parameters, training batch
size, environment, the command's ``--set``/``--config`` settings that name a custom variant), the
training ``metrics.json`` (seconds per training iteration, peak memory) and each evaluation's
``metrics.json`` (seconds per test batch); the HM column averages the base-to-new evaluations.
Seconds per iteration only compare at one batch size, hence its column.
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

from alignednorm.results import Record, Table, collect, harmonic_mean, run_label, variant_settings

log = logging.getLogger(__name__)


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("skipping %s: %s", path, exc)
        return None


def _variant(run_dir: Path) -> str:
    """The variant recorded by the run's evaluations, else the runner layout's folder."""
    for path in sorted(run_dir.glob("eval/*/metrics.json")):
        data = _read(path)
        if data and "variant" in data:  # as the result rows name it (see results.records_from)
            return data["variant"] + ("+templates-no-descriptions" if data.get("description_fallback") else "")
    return run_dir.parent.name if run_dir.name.startswith("seed") else "default"


def _test_seconds(run_dir: Path) -> list[float]:
    out = []
    for path in sorted(run_dir.glob("eval/*/metrics.json")):
        for cost in ((_read(path) or {}).get("cost") or {}).values():
            if isinstance(cost, dict) and isinstance(cost.get("seconds_per_batch"), int | float):
                out.append(float(cost["seconds_per_batch"]))
    return out


def _hm(records: list[Record], method: str, variant: str) -> float | None:
    base = [r.accuracy for r in records if (r.protocol, r.method, r.variant, r.metric) == ("base2new", method, variant,
                                                                                             "base")]
    new = [r.accuracy for r in records if (r.protocol, r.method, r.variant, r.metric) == ("base2new", method, variant,
                                                                                            "new")]
    return harmonic_mean(statistics.mean(base), statistics.mean(new)) if base and new else None


def cost_table(root: str | Path) -> Table | None:
    """Train s/iter, batch size, test s/batch, learnable parameters, peak memory and HM per method and variant."""
    root = Path(root)
    groups: dict[tuple[str, str], dict] = {}
    for info_path in sorted(root.rglob("run.json")):
        run_dir, info = info_path.parent, _read(info_path)
        metrics = _read(run_dir / "metrics.json") if (run_dir / "metrics.json").is_file() else None
        if not info or not metrics or "method" not in info:
            continue
        group = groups.setdefault((info["method"], _variant(run_dir)), {
            "train": [], "test": [], "params": [], "memory": [], "batch": set(), "gpu": set(),
            "settings": variant_settings(run_dir)})
        _add_run(group, info, metrics, run_dir)
    if not groups:
        return None
    records = collect(root)
    table = Table("table5_cost", "Cost per method (paper Table 5 shape): mean over runs",
                  ["train s/iter", "batch size", "test s/batch", "learnable params", "peak memory (MB)", "HM", "runs",
                   "device"], row_header="method")
    for (method, variant), g in sorted(groups.items()):
        hm = _hm(records, method, variant)
        cells = [_mean(g["train"]), _distinct(g["batch"]), _mean(g["test"]), _count(g["params"]),
                 _mean(g["memory"], 0), f"{hm:.2f}" if hm is not None else "-",
                 str(max(len(g["params"]), len(g["train"]))), ", ".join(sorted(g["gpu"]))]
        table.rows.append((run_label(method, variant, g["settings"]), cells))
    table.notes.append("train s/iter: forward, backward and optimiser step of one batch of the batch size shown; "
                       "test s/batch: one evaluation batch; learnable params: a count (a range when the runs "
                       "differ, e.g. class-specific prompts); memory: CUDA peak on GPUs, the process's peak resident "
                       "set on CPUs.")
    return table


def _add_run(group: dict, info: dict, metrics: dict, run_dir: Path) -> None:
    train = metrics.get("cost") or {}
    if isinstance(train.get("seconds_per_iter"), int | float):
        group["train"].append(float(train["seconds_per_iter"]))
    if isinstance(train.get("peak_memory_mb"), int | float):
        group["memory"].append(float(train["peak_memory_mb"]))
    group["test"] += _test_seconds(run_dir)
    params = info.get("learnable_parameters")
    if isinstance(params, int):
        group["params"].append(params)
    batch = (((info.get("identity") or {}).get("config") or {}).get("train") or {}).get("batch_size")
    if isinstance(batch, int) and params != 0:  # a method that learns nothing trains on no batches
        group["batch"].add(batch)
    group["gpu"].add(((info.get("environment") or {}).get("gpu")) or "CPU")


def _count(values: list[int]) -> str:
    """``8,192``; ``8,192–16,384`` when the runs differ."""
    if not values:
        return "-"
    low, high = min(values), max(values)
    return f"{low:,}" if low == high else f"{low:,}–{high:,}"


def _distinct(values: set[int]) -> str:
    return ", ".join(str(v) for v in sorted(values)) or "-"


def _mean(values: list[float], digits: int = 4) -> str:
    return f"{statistics.mean(values):.{digits}f}" if values else "-"
