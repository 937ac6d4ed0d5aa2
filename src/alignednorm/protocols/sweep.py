"""Dispatching a list of jobs: in this process, as local processes, or as a SLURM job array.

- ``inline``: one after the other in this process, sharing the loaded backbone (no submitit needed).
- ``processes``: independent jobs in parallel processes on this machine (CPU sweeps: a small model's
  step is dispatch-bound, so two one-thread jobs on two cores beat one two-thread job). Each process
  loads its backbone once and runs the jobs it is handed; numbers are those of ``inline``.
- ``local``: each job in its own process through ``submitit.LocalExecutor``: one job per visible GPU
  at a time, or one at a time on a CPU-only machine. Waits for all of them.
- ``slurm``: one job array through ``submitit.SlurmExecutor`` (partition, GPUs, time, ...); returns
  once submitted. Job logs and pickles go to ``<output>/.submitit``.

``inline`` and ``processes`` run jobs that train on the same data back to back in one process
(:func:`same_data_groups`), sharing the backbone's frozen-pass memo: their runs draw the same batches, so
a later run reuses the prompt-free prefix and frozen-teacher passes of an earlier one (exact).

Finished runs are skipped in every mode, so re-submitting a partly finished sweep only runs the rest.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from alignednorm.engine.cpus import usable_cpus
from alignednorm.errors import AlignedNormError

from .executor import EXECUTORS, ExecutorOptions, process_context
from .runner import Job, is_finished, load_backbone, run_job

log = logging.getLogger(__name__)
progress_log = logging.getLogger("alignednorm.progress")  # one line per job start and end (see engine.tracking)

FROZEN_MEMO_BYTES = 512 << 20
"""The most a process keeps of frozen passes for one group of same-data jobs (CPU memory)."""


@dataclass
class SweepOutcome:
    """What happened to a sweep: job names that finished or failed, and submitted SLURM job ids."""

    finished: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    submitted: dict[str, str] = field(default_factory=dict)

    @property
    def count(self) -> int:
        """Jobs that finished or failed so far."""
        return len(self.finished) + len(self.failed)


def run_submitted(job: Job, force: bool = False) -> dict:
    """Entry point of a job in a submitit process: log to stderr, no progress bars."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import alignednorm.mini  # noqa: F401  (a fresh process must know the mini benchmark's datasets too)
    except ImportError:
        pass
    job.progress = False
    log.info("running %s (CUDA_VISIBLE_DEVICES=%s)", job.name, os.environ.get("CUDA_VISIBLE_DEVICES", "unset"))
    return run_job(job, force=force)


def run_sweep(jobs: list[Job], executor: str = "inline", force: bool = False,
              options: ExecutorOptions | None = None, output: str | None = None) -> SweepOutcome:
    """Run or submit ``jobs`` with ``executor`` (``inline``, ``local`` or ``slurm``)."""
    options = options or ExecutorOptions()
    if executor not in EXECUTORS:
        raise AlignedNormError(f"--executor {executor!r}: expected one of {', '.join(EXECUTORS)}")
    done = [] if force else [job for job in jobs if is_finished(job)]
    done_names = {job.name for job in done}
    todo = [job for job in jobs if job.name not in done_names]
    if done:
        log.info("%d of %d jobs are finished and skipped (use --force to re-run them)", len(done), len(jobs))
    folder = options.folder or str(Path(output or ".") / ".submitit")
    if executor == "inline":
        outcome = run_inline(todo, force)
    elif executor == "processes":
        outcome = run_processes(todo, force, options.processes)
    elif executor == "local":
        outcome = run_local(todo, folder, force, options)
    else:
        outcome = submit_slurm(todo, folder, force, options)
    outcome.finished[:0] = [job.name for job in done]
    return outcome


def shared_backbone(job: Job, loaded: dict):
    """``job``'s backbone from ``loaded``, loaded there first when the previous job used another (one kept)."""
    key = (job.clip, job.clip_model, job.device)
    if key not in loaded:
        loaded.clear()
        loaded[key] = load_backbone(job)
    return loaded[key]


def same_data_groups(jobs: list[Job]) -> list[list[Job]]:
    """The jobs, those training on the same data together (in order of first appearance).

    Same data: dataset, class subset, shots, seed, data root and backbone. Such runs draw the same
    batches (MMRL++ and AlignedNorm in a base-to-new sweep), so one process runs them back to back with
    the backbone's frozen-pass memo. Jobs that train nothing stay alone: short, they fill a sweep's tail.
    """
    from alignednorm.methods import get_method_class

    groups: dict = {}
    for job in jobs:
        same_data = (job.data_root, job.dataset, job.train_subset, job.shots, job.seed, job.clip, job.clip_model,
                     job.device)
        groups.setdefault(same_data if get_method_class(job.method).traits.learns else id(job), []).append(job)
    return list(groups.values())


def run_group(jobs: list[Job], force: bool, loaded: dict, started=lambda job: None):
    """Run same-data jobs back to back on one backbone; yields ``(job, results, None)`` or ``(job, None, error)``.

    ``error`` is the one-line message of a user-facing error, or the traceback of a bug; the others still run.
    ``started(job)`` is called as each job begins.
    """
    with contextlib.ExitStack() as memo:
        for job in jobs:
            started(job)
            try:
                backbone = shared_backbone(job, loaded)  # the same one for the whole group
                if len(jobs) > 1 and backbone.frozen_memo is None:
                    memo.enter_context(backbone.memoize_frozen_passes(FROZEN_MEMO_BYTES))
                yield job, run_job(job, force=force, backbone=backbone), None
            except AlignedNormError as exc:  # a user-facing error: its one line says it all
                yield job, None, str(exc)
            except Exception:  # noqa: BLE001  (one broken dataset must not stop a 165-job sweep)
                yield job, None, traceback.format_exc()


def run_inline(jobs: list[Job], force: bool = False) -> SweepOutcome:
    """Run the jobs here, one by one (same-data jobs together); a failing job is logged and the others still run."""
    outcome, backbones = SweepOutcome(), {}

    def started(job: Job) -> None:
        progress_log.info("[%d/%d] started %s", outcome.count + 1, len(jobs), job.name)

    for group in same_data_groups(jobs):
        for job, results, error in run_group(group, force, backbones, started):
            _report(outcome, len(jobs), job, None if results is None else accuracies(results), error)
    return outcome


def _report(outcome: SweepOutcome, total: int, job: Job, summary: str | None, error: str | None) -> None:
    """Log one finished or failed job and add it to ``outcome`` (a failure's last traceback line)."""
    if error is None:
        progress_log.info("[%d/%d] finished %s: %s", outcome.count + 1, total, job.name, summary)
        outcome.finished.append(job.name)
    else:
        log.error("%s failed:%s%s", job.name, "\n" if "Traceback" in error else " ", error)
        outcome.failed[job.name] = error.splitlines()[-1] if "Traceback" in error else error


def run_processes(jobs: list[Job], force: bool = False, processes: int = 0) -> SweepOutcome:
    """Run the jobs in ``processes`` parallel processes (0: one per usable CPU), threads shared out among them.

    Jobs are handed out in the given order (put the longest first); a failing job is logged and the
    others still run.
    """
    outcome = SweepOutcome()
    if not jobs:
        return outcome
    cpus = usable_cpus()
    if not processes and any(job.device != "cpu" for job in jobs) and _cuda_available():
        log.info("--executor processes on a GPU machine runs one process (use --executor local: one per GPU)")
        processes = 1
    groups = same_data_groups(jobs)
    count = max(1, min(processes or cpus, len(groups)))
    with ProcessPoolExecutor(count, mp_context=process_context(), initializer=_start_process,
                             initargs=(max(1, cpus // count),)) as pool:
        pending = [pool.submit(_run_in_process, group, force) for group in groups]
        for future in as_completed(pending):
            for job, summary, error in future.result():
                _report(outcome, len(jobs), job, summary, error)
    return outcome


_PROCESS_BACKBONES: dict = {}


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _start_process(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    try:
        import alignednorm.mini  # noqa: F401  (a fresh process must know the mini benchmark's datasets too)
    except ImportError:
        pass


def _run_in_process(jobs: list[Job], force: bool) -> list[tuple[Job, str | None, str | None]]:
    """``(job, accuracies, None)`` or ``(job, None, error)`` per job of a group, in a :func:`run_processes` process."""
    for job in jobs:
        job.progress = False
    return [(job, None if results is None else accuracies(results), error)
            for job, results, error in run_group(jobs, force, _PROCESS_BACKBONES)]


def accuracies(results: dict[str, dict]) -> str:
    """``dtd base 80.12%, new 70.05%`` from :func:`run_job`'s ``{target: metrics}``."""
    parts = []
    for target, metrics in results.items():
        values = [f"{name} {'n/a' if r.get('accuracy') is None else format(r['accuracy'], '.2f') + '%'}"
                  for name, r in (metrics.get("eval") or {}).items()]
        parts.append(f"{target} {', '.join(values)}")
    return "; ".join(parts) or "no evaluation"


def _submitit():
    try:
        import submitit
    except ImportError:
        raise AlignedNormError("--executor local/slurm needs submitit: pip install 'alignednorm[cluster]'") from None
    return submitit


def visible_gpus() -> list[int]:
    """GPU ids as ``CUDA_VISIBLE_DEVICES`` names them (what a child process must be given)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [int(x) for x in env.split(",") if x.strip().isdigit()]
    import torch

    return list(range(torch.cuda.device_count()))


def run_local(jobs: list[Job], folder: str, force: bool = False,
              options: ExecutorOptions | None = None, poll_s: float = 0.2) -> SweepOutcome:
    """Each job in its own local process: one per GPU at a time, or sequentially without GPUs."""
    submitit, options = _submitit(), options or ExecutorOptions()
    if not jobs:
        return SweepOutcome()
    executor = submitit.LocalExecutor(folder=folder)
    gpus = list(options.gpu_ids) if options.gpu_ids is not None else visible_gpus()
    free: list[int | None] = list(gpus) or [None]
    pending, running, outcome = list(jobs), {}, SweepOutcome()
    while pending or running:
        while pending and free:
            gpu, job = free.pop(0), pending.pop(0)
            executor.update_parameters(timeout_min=options.timeout_min, gpus_per_node=0 if gpu is None else 1,
                                       visible_gpus=() if gpu is None else (gpu,))
            running[executor.submit(run_submitted, job, force)] = (job, gpu)
            progress_log.info("started %s%s", job.name, "" if gpu is None else f" on GPU {gpu}")
        for handle in [h for h in running if h.done()]:
            job, gpu = running.pop(handle)
            free.append(gpu)
            _collect(handle, job, outcome)
        time.sleep(poll_s if running else 0)
    return outcome


def _collect(handle, job: Job, outcome: SweepOutcome) -> None:
    try:
        progress_log.info("finished %s: %s", job.name, accuracies(handle.result()))
        outcome.finished.append(job.name)
    except Exception as exc:  # noqa: BLE001  (the job's own error, re-raised by submitit; reported below)
        log.error("%s failed (logs: %s): %s", job.name, handle.paths.stderr, exc)
        outcome.failed[job.name] = f"{type(exc).__name__}: {exc}"


def slurm_parameters(options: ExecutorOptions, name: str) -> dict:
    """``SlurmExecutor.update_parameters`` arguments for ``options``."""
    extra = {}
    for item in options.slurm_args:
        key, sep, value = item.partition("=")
        if not sep:
            raise AlignedNormError(f"--slurm-arg {item!r}: expected key=value, e.g. constraint=a100")
        extra[key.strip().replace("-", "_")] = value.strip()
    params = {"job_name": name, "time": options.timeout_min, "gpus_per_node": options.gpus,
              "cpus_per_task": options.cpus, "array_parallelism": options.array_parallelism,
              "partition": options.partition, "mem": options.mem, "account": options.account, "qos": options.qos}
    params = {k: v for k, v in params.items() if v is not None}
    if extra:
        params["additional_parameters"] = extra
    return params


def submit_slurm(jobs: list[Job], folder: str, force: bool = False,
                 options: ExecutorOptions | None = None) -> SweepOutcome:
    """Submit ``jobs`` as one SLURM job array; returns at once with the array's job ids."""
    submitit, options = _submitit(), options or ExecutorOptions()
    outcome = SweepOutcome()
    if not jobs:
        return outcome
    executor = submitit.SlurmExecutor(folder=folder)
    executor.update_parameters(**slurm_parameters(options, f"alignednorm-{jobs[0].protocol}"))
    with executor.batch():
        handles = [executor.submit(run_submitted, job, force) for job in jobs]
    for job, handle in zip(jobs, handles):
        outcome.submitted[job.name] = handle.job_id
    return outcome
