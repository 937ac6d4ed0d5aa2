"""``alignednorm demo``: the whole pipeline on the built-in mini benchmark, on a laptop CPU.

Generates the procedural world (CoOp layout) if it is missing, then runs the base-to-new
protocol on the mini suite with the shipped tiny CLIP for zero-shot CLIP and the prompt
methods, one seed, and prints a table shaped like the paper's Table 1. Exactly the code path
used with real CLIP weights and real datasets: only the files differ.
"""

from __future__ import annotations

import time
from pathlib import Path

from alignednorm.errors import AlignedNormError

DEMO_METHODS = ("zeroshot", "mmrlpp", "alignednorm")


def run_demo(output: str | Path = "runs/demo", data_root: str | Path = "data", methods=DEMO_METHODS, seed: int = 1,
             datasets: tuple[str, ...] | None = None, force: bool = False, progress: bool = True, echo=print,
             sets: tuple[str, ...] = ()) -> str:
    """Run the demo; returns the Markdown table it printed."""
    from alignednorm.engine.cpus import usable_cpus
    from alignednorm.protocols.executor import ExecutorOptions, start_process_server

    start = time.time()
    processes = usable_cpus()  # independent runs, one per core: a tiny model's step is dispatch-bound
    if processes > 1:
        start_process_server()  # its one import of torch and the package runs beside ours and the rendering

    from alignednorm.mini import generate_world, mini_clip_path
    from alignednorm.protocols import expand
    from alignednorm.protocols.runner import SweepRequest
    from alignednorm.protocols.sweep import run_sweep
    from alignednorm.protocols.tables import build_report
    from alignednorm.results import render_all

    clip = mini_clip_path()
    if not clip.is_file():
        raise AlignedNormError(f"the mini CLIP checkpoint {clip} is missing; reinstall alignednorm or run "
                               "`python -m alignednorm.mini.pretrain` to rebuild it")
    jobs = []
    for method in methods:
        request = SweepRequest(method=method, data_root=str(data_root), clip=str(clip), output=str(output),
                               suite="mini", datasets=datasets, seeds=(seed,), device="cpu", progress=progress,
                               sets=tuple(sets))
        jobs += expand("base2new", request)
        echo(f"{method}: {sum(job.method == method for job in jobs)} datasets")
    used = sorted({job.dataset for job in jobs})  # the shifted test sets wait for `alignednorm mini generate`
    echo(f"generating {len(used)} mini datasets under {Path(data_root) / 'mini'} (skipped when present) ...")
    generate_world(data_root, names=used, processes=processes)
    echo(f"world ready in {time.time() - start:.0f} s")
    executor = "processes" if processes > 1 else "inline"
    echo(f"running {len(jobs)} runs" + (f" in {processes} processes ..." if processes > 1 else " ..."))
    outcome = run_sweep(longest_first(jobs), executor, force=force, options=ExecutorOptions(processes=processes))
    failed = dict(outcome.failed)
    tables = [t for t in build_report(output, suite="mini") if t.key.startswith("table1")]
    text = render_all(tables, "md")
    echo(text)
    echo(f"done in {time.time() - start:.0f} s; runs in {output}; `alignednorm report {output}` rebuilds the tables")
    if failed:
        raise AlignedNormError(f"{len(failed)} demo runs failed: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
    return text


def longest_first(jobs: list) -> list:
    """Jobs by their training steps, most first (a zero-shot run trains none), so parallel processes end together."""
    from functools import cache

    from alignednorm import data as D
    from alignednorm.methods import get_method_class

    @cache  # one read of each dataset's split file, whatever the number of methods
    def classes(dataset: str, data_root: str, subset: str) -> int:
        return len(D.subsample_classes(D.load_splits(dataset, data_root), subset).classnames)

    def steps(job) -> float:
        if not get_method_class(job.method).traits.learns:
            return 0.0
        train = job.config["train"]
        return train["epochs"] * classes(job.dataset, job.data_root, job.train_subset) * job.shots / train["batch_size"]

    return sorted(jobs, key=steps, reverse=True)
