"""How a sweep's jobs run: the executor options (:mod:`.sweep` runs them; ``alignednorm run`` exposes them)
and how its job processes start.

Kept apart from :mod:`.sweep` so that the command line can declare its options from these fields
without importing the runner (and torch).
"""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass, field

EXECUTORS = ("inline", "processes", "local", "slurm")


def _cli(flag: str, help_text: str, default=None):
    """A field that is also an ``alignednorm run`` option."""
    return field(default=default, metadata={"cli": flag, "help": help_text})


@dataclass
class ExecutorOptions:
    """Where and how jobs run (the SLURM fields only matter for ``slurm``).

    Each field with ``cli`` metadata is an option of ``alignednorm run`` (flag and help declared here once).

    Attributes:
        folder: submitit's folder for job pickles and logs (default ``<output>/.submitit``).
        partition: SLURM partition.
        gpus: GPUs per job (SLURM ``--gpus-per-node``).
        cpus: CPU cores per job (SLURM ``--cpus-per-task``).
        timeout_min: time limit per job in minutes (SLURM ``--time``; local processes are killed after it).
        mem: memory per job, e.g. ``64G`` (SLURM ``--mem``).
        array_parallelism: at most this many array tasks at once.
        account: SLURM account; ``qos`` its quality of service.
        slurm_args: extra ``sbatch`` options as ``key=value`` (e.g. ``constraint=a100``).
        gpu_ids: GPUs the local executor may use; None means every visible one.
        processes: parallel processes of the ``processes`` executor (independent jobs on this machine's
            CPU cores, each with its share of intra-op threads); 0 is one per usable core (one process
            when the jobs would run on a visible GPU: ``local`` spreads jobs over GPUs).
    """

    folder: str | None = None
    partition: str | None = _cli("--partition", "SLURM partition")
    gpus: int = _cli("--gpus", "GPUs per SLURM job", 1)
    cpus: int = _cli("--cpus", "CPU cores per SLURM job", 8)
    timeout_min: int = _cli("--time", "time limit per job, minutes (slurm, local)", 24 * 60)
    mem: str | None = _cli("--mem", "memory per SLURM job, e.g. 64G")
    array_parallelism: int = _cli("--array-parallelism", "SLURM array tasks running at once", 64)
    account: str | None = _cli("--account", "SLURM account")
    qos: str | None = _cli("--qos", "SLURM quality of service")
    slurm_args: tuple[str, ...] = _cli("--slurm-arg", "extra sbatch option key=value (repeatable)", ())
    gpu_ids: tuple[int, ...] | None = None
    processes: int = _cli("--processes", "parallel processes of --executor processes (0: one per CPU core)", 0)


# What a job process needs, imported once by the fork server instead of by every process (seconds each).
_PRELOAD = ["alignednorm.protocols.runner", "alignednorm.mini"]


def process_context():
    """Job processes forked from a fork server that imported the package once; ``spawn`` where there is none.

    A plain ``fork`` of the calling process could hang when its thread pools have run; the server is a
    fresh single-threaded process, and ``spawn`` would import torch and open_clip again in every job process.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)  # effective when the server starts (the first pool)
    return context


def start_process_server() -> None:
    """Start the fork server now, so that its imports overlap other work (e.g. rendering the mini world)."""
    context = process_context()
    if context.get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()
