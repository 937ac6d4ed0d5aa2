"""Where a run's training curves go: ``log.jsonl`` always, TensorBoard event files, wandb on request.

Only process 0 writes. On resume TensorBoard purges the events logged after the checkpoint the
run continues from, so an interrupted-and-resumed run shows one clean curve; ``log.jsonl``
keeps every line and marks the resume point.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from alignednorm.engine import distributed
from alignednorm.errors import ConfigError

log = logging.getLogger(__name__)


class RunTracker:
    """Scalars of one training run.

    Args:
        run_dir: the run folder; ``None`` logs nothing.
        tensorboard: write event files under ``run_dir/tensorboard``.
        wandb_project: also log to this Weights & Biases project ("" = off); the run id is derived
            from the run folder, so a resumed run continues the same wandb run.
        start_step: the global step training (re)starts from.
        config: hyper-parameters recorded with the wandb run.
    """

    def __init__(self, run_dir: Path | None, tensorboard: bool = True, wandb_project: str = "",
                 start_step: int = 0, config: dict | None = None):
        self.run_dir = run_dir if distributed.is_main() else None
        self.writer = None
        self.wandb_run = None
        if self.run_dir is None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if start_step:
            self._append({"resumed_at_global_step": start_step})
        if tensorboard:
            self.writer = _summary_writer(self.run_dir / "tensorboard", start_step)
        if wandb_project:
            self.wandb_run = _wandb_run(wandb_project, self.run_dir, config or {})

    def log(self, record: dict, step: int, prefix: str) -> None:
        """Append ``record`` to ``log.jsonl``; its numbers become scalars ``prefix/<name>`` at ``step``."""
        if self.run_dir is None:
            return
        self._append(record)
        scalars = {f"{prefix}/{k}": float(v) for k, v in _flatten(record).items()
                   if isinstance(v, (int, float)) and k not in ("epoch", "step", "global_step")}
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None

    def _append(self, record: dict) -> None:
        with open(self.run_dir / "log.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")


def _flatten(record: dict) -> dict:
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update({f"{key}/{k}": v for k, v in _flatten(value).items()})
        else:
            flat[key] = value
    return flat


def _after_existing_event_files(folder: Path) -> None:
    """Wait (under a second) until a new event file sorts after every existing one.

    Readers load event files in name order, and names start with the creation second: a resumed
    run started within the second of the killed attempt could otherwise be read first, and the
    purge would then not hide the attempt's events past the checkpoint.
    """
    stamps = [int(p.name.split(".")[3]) for p in folder.glob("events.out.tfevents.*") if p.name.split(".")[3].isdigit()]
    while stamps and int(time.time()) <= max(stamps):
        time.sleep(0.05)


def _summary_writer(folder: Path, start_step: int):
    if start_step:
        _after_existing_event_files(folder)
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ConfigError("train.tensorboard = true needs the tensorboard package (pip install tensorboard); "
                          "or pass --set train.tensorboard=false") from exc
    # purge_step drops events a crashed attempt logged past the checkpoint this run resumes from.
    return SummaryWriter(str(folder), purge_step=start_step or None)


def _wandb_run(project: str, run_dir: Path, config: dict):
    try:
        import wandb
    except ImportError as exc:
        raise ConfigError(f"train.wandb_project = {project!r} needs the wandb package (pip install wandb); "
                          "or leave train.wandb_project empty") from exc
    run_id = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]
    log.info("logging to wandb project %s (run id %s)", project, run_id)
    return wandb.init(project=project, dir=str(run_dir), id=run_id, name=str(run_dir), resume="allow", config=config)
