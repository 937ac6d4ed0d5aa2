"""One training run: load data and backbone, train a method, write the run folder; rebuild it later.

A run folder holds ``config.yaml`` (the resolved config), ``run.json`` (what was run: method,
dataset, shots, seed, backbone file and checksum, class names, and the run's *identity*),
``learnable.safetensors``, ``checkpoint.pt`` while training, ``log.jsonl`` and finally
``metrics.json``. Every file is written atomically.

A folder is reused (finished: skipped; interrupted: resumed) only when its identity, everything
that determines the result (method, the whole resolved config, dataset, shots, training classes,
backbone checksum), equals the new run's; otherwise the run stops with an error naming the keys
that differ. The engine knows no dataset: the protocol floor prepares what a run trains on
(:class:`TrainingData`, :mod:`alignednorm.protocols.data`) and evaluates the trained method;
:func:`load_run` is the one way to rebuild a trained method from its folder.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from alignednorm.backbone.clip import ClipBackbone
from alignednorm.config import build, load_run_config, run_config_from, to_yaml
from alignednorm.engine import distributed
from alignednorm.engine.batches import resolve_workers
from alignednorm.engine.environment import environment
from alignednorm.engine.io import (
    clean_stale_temp_files,
    file_sha256,
    load_tensors,
    save_tensors,
    write_json,
    write_text,
)
from alignednorm.engine.trainer import Trainer, seed_everything
from alignednorm.errors import AlignedNormError, CheckpointError
from alignednorm.methods import Method, create_method

log = logging.getLogger(__name__)


@dataclass
class RunSpec:
    """What to train.

    Attributes:
        method: registered method name.
        dataset: dataset trained on (catalog name; recorded, and part of the identity).
        data_root: the CoOp-layout data folder (recorded).
        clip: backbone checkpoint file; ``clip_model`` its open_clip name for open_clip checkpoints.
        output: the run folder.
        config: the resolved ``{method, train, data}`` config.
        shots: K-shot training (0 = all training images).
        train_subset: classes trained on: ``base`` (base-to-new) or ``all``.
        command: the command line that asked for the run (recorded in ``run.json`` and model cards).
        epoch_callback: passed to the :class:`Trainer` (called after every epoch; not part of the
            run's identity), for observers such as :mod:`alignednorm.compat.parity_run`.
    """

    method: str
    dataset: str
    data_root: str
    clip: str
    output: str
    config: DictConfig
    shots: int = 16
    train_subset: str = "base"
    clip_model: str | None = None
    progress: bool = True
    command: str | None = None
    epoch_callback: object = None


@dataclass
class TrainingData:
    """What one run trains on, prepared by the protocol floor (:func:`alignednorm.protocols.data.training_data`).

    Attributes:
        classnames: the training classes, in label order.
        template: the dataset's prompt template (recorded in ``run.json``).
        label_space: the method's label space while training (template, class descriptions).
        train: ``(image, label)`` samples, augmented; ``None`` samples (unreadable images) are dropped.
        validate: ``validate(method) -> accuracy`` on the validation images, or ``None`` without them.
        solver_batches: ``() -> (train, val)`` un-augmented batches for methods with their own solver.
    """

    classnames: list[str]
    template: str
    label_space: object
    train: Dataset
    validate: Callable[[Method], float] | None
    solver_batches: Callable[[], tuple[DataLoader | None, DataLoader | None]]


def format_command(words) -> str:
    """A shell command line from its words (quoted where needed), for records and model cards."""
    return " ".join(shlex.quote(str(w)) for w in words)




# The config file of a folder written by ``alignednorm export`` (alignednorm.export).
EXPORT_CONFIG = "alignednorm_config.json"
# What a run costs (time, memory): kept apart from its results, which are deterministic.
COST_KEYS = ("seconds_per_iter", "peak_memory_mb", "seconds_per_batch", "batch_size")
# Settings that change how a run is carried out or logged, never its numbers (beyond float rounding):
# a run resumed with a compiled forward or a chunked text tower after running out of memory is the same run.
NON_RESULT_KEYS = {"train": ("log_every", "tensorboard", "wandb_project", "compile", "text_chunk",
                             "eval_test_every_epoch"),
                   "data": ("eval_batch_size", "num_workers", "decoded_cache_mb")}


def run_identity(spec: RunSpec) -> dict:
    """Everything that determines a training run's result (not where files live or how it is logged)."""
    config = OmegaConf.to_container(spec.config, resolve=True)
    for section, keys in NON_RESULT_KEYS.items():
        for key in keys:
            config.get(section, {}).pop(key, None)
    return {
        "method": spec.method, "dataset": spec.dataset, "shots": spec.shots, "train_subset": spec.train_subset,
        "config": config, "clip_sha256": file_sha256(spec.clip), "clip_model": spec.clip_model,
    }


def identity_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf that differs between two identities (dotted keys)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += identity_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {_short(a)} -> {_short(b)}")
    return out


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 24 else text[:12] + "..." + text[-8:]


def check_identity(run_dir: Path, identity: dict, what: str = "run") -> None:
    """Refuse to reuse ``run_dir`` when its recorded identity is not ``identity``."""
    info_path = run_dir / "run.json"
    if not info_path.is_file():
        return
    old = read_run_info(run_dir).get("identity")
    if old is None:
        raise AlignedNormError(f"{run_dir} holds a {what} without a recorded identity (an older version wrote it); "
                               "pass --force to replace it, or choose another output folder")
    diff = identity_differences(old, identity)
    if diff:
        shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
        raise AlignedNormError(f"{run_dir} holds a {what} with other settings ({shown}); pass --force to replace it, "
                               "or use another --tag / output folder to keep both")


# What predict, load, export and analyze read from a run's run.json.
RUN_INFO_KEYS = ("method", "dataset", "shots", "train_subset", "classnames", "template", "clip", "clip_sha256")


def read_run_info(run_dir: str | Path) -> dict:
    """``run.json`` of a run folder, with a clear error when it is missing or damaged."""
    path = Path(run_dir) / "run.json"
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{run_dir} is not a run folder: {path.name} is missing") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable or truncated ({exc}); re-run the training with --force") from None
    if not isinstance(info, dict) or "method" not in info:
        raise CheckpointError(f"{path}: not a run record (expected a JSON object with 'method')")
    missing = [key for key in RUN_INFO_KEYS if key not in info]
    if missing:
        raise CheckpointError(f"{path}: the run record has no {', '.join(repr(k) for k in missing)}; "
                              "it is damaged or from another tool: re-run the training with --force")
    return info


class RunLock:
    """An exclusive lock file in the run folder, so two processes never write one run."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            owner = self.path.read_text().strip() or "?"
            if owner.isdigit() and not _pid_alive(int(owner)):
                self.path.unlink(missing_ok=True)  # left behind by a killed process
                return self.__enter__()
            raise AlignedNormError(f"run folder {self.path.parent} is in use by process {owner} (lock {self.path})")
        except OSError as exc:
            raise AlignedNormError(f"cannot write to run folder {self.path.parent}: {exc.strerror}") from exc
        with os.fdopen(fd, "w") as handle:
            handle.write(str(os.getpid()))
        return self

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def execute(spec: RunSpec, prepare: Callable[[ClipBackbone], TrainingData], backbone: ClipBackbone | None = None,
            force: bool = False, resume: bool = True) -> dict:
    """Train (unless nothing is learnable); returns the training run's ``metrics.json``.

    ``prepare(backbone)`` gives the run's :class:`TrainingData` (the protocol's; it may depend on the
    backbone's input size), called once the run is known to need training.

    A finished run with the same identity is skipped unless ``force``; an interrupted one
    (``checkpoint.pt`` without ``metrics.json``) continues when ``resume`` (the default) or restarts
    with ``force``. A folder holding a run with another identity is refused (see module docs).
    Under ``torchrun`` every process trains its share of each batch; process 0 alone writes.
    """
    device = distributed.init_from_env()
    run_dir = Path(spec.output)
    identity = run_identity(spec)
    finished, interrupted = (run_dir / "metrics.json").is_file(), (run_dir / "checkpoint.pt").is_file()
    if not force:
        check_identity(run_dir, identity, "training run")
    distributed.barrier()  # every process decides from the same files
    if finished and not force:
        log.info("skipping %s: metrics.json exists with the same settings (use --force to re-run)", run_dir)
        return json.loads((run_dir / "metrics.json").read_text())
    if interrupted and not (resume or force):
        raise AlignedNormError(f"{run_dir} holds an interrupted run (checkpoint.pt); pass --resume to continue it "
                               "or --force to start over")
    if device is not None and backbone is None:
        backbone = ClipBackbone.from_file(spec.clip, spec.clip_model).to(device)
    if not distributed.is_main():
        return _execute(spec, prepare, run_dir, backbone, identity)
    with RunLock(run_dir):
        removed = clean_stale_temp_files(run_dir)  # left by writes a kill interrupted; nobody else writes here
        if removed:
            log.info("removed %d temp files of interrupted writes in %s", len(removed), run_dir)
        if force:
            for name in ("metrics.json", "checkpoint.pt", "log.jsonl", "learnable.safetensors", "run.json"):
                (run_dir / name).unlink(missing_ok=True)
        distributed.barrier()
        return _execute(spec, prepare, run_dir, backbone, identity)


def _execute(spec: RunSpec, prepare, run_dir: Path, backbone: ClipBackbone | None, identity: dict) -> dict:
    method_cfg, train_cfg, data_cfg = build(spec.method, spec.config)
    seed_everything(train_cfg.seed)
    backbone = backbone or ClipBackbone.from_file(spec.clip, spec.clip_model)
    method = create_method(spec.method, backbone, method_cfg).to(next(backbone.parameters()).device)
    data = prepare(backbone)
    method.set_label_space(data.label_space)
    learns = bool(method.learnable_parameters())
    if learns:
        method.set_trained_classnames(data.classnames, run_dir)
    main = distributed.is_main()
    workers = resolve_workers(data_cfg.num_workers, next(backbone.parameters()).device)
    trainer = Trainer(method, train_cfg, run_dir, progress=spec.progress and main,
                      epoch_callback=spec.epoch_callback, workers=workers) if learns else None
    if trainer is not None:
        trainer.try_resume()  # a damaged checkpoint stops here, before any file of the run is rewritten
    if main:
        write_text(run_dir / "config.yaml", to_yaml(spec.config))
        write_json(run_dir / "run.json", _run_info(spec, data, identity, method))
    train_stats = {}
    if trainer is not None:
        train_stats = method.fit(*data.solver_batches())  # None: the method trains by gradient
        if train_stats is None:
            train_stats = trainer.fit(data.train, resume=False, validate=data.validate)
            train_stats["skipped_images"] = getattr(data.train, "num_skipped", 0)
        if main:
            save_tensors(run_dir / "learnable.safetensors", method.learnable_state_dict(),
                         metadata={"method": spec.method, "classnames": json.dumps(data.classnames)})
    cost = {k: train_stats.pop(k) for k in COST_KEYS if k in train_stats}
    metrics = {"method": spec.method, "dataset": spec.dataset, "shots": spec.shots, "seed": train_cfg.seed,
               "train": train_stats, "cost": cost, "eval": {}}
    if main:
        write_json(run_dir / "metrics.json", metrics)
        (run_dir / "checkpoint.pt").unlink(missing_ok=True)  # the run is complete; learnable.safetensors stays
    distributed.barrier()
    return metrics


@dataclass
class TrainedRun:
    """A method rebuilt from its run folder, with what the folder recorded."""

    method: Method
    info: dict
    config: DictConfig
    run_dir: Path

    @property
    def data_config(self):
        return build(self.info["method"], self.config)[2]


def load_run(run_dir: str | Path, backbone: ClipBackbone | None = None, clip: str | Path | None = None,
             device: str | torch.device | None = None) -> TrainedRun:
    """Rebuild the method trained in ``run_dir`` (used by protocols, ``predict`` and ``alignednorm.load``).

    Args:
        run_dir: a training run folder (``run.json``, ``config.yaml``, ``learnable.safetensors``).
        backbone: an already loaded backbone; its file must be the one the run recorded.
        clip: the backbone file when it moved since training (its SHA-256 must match).
        device: where to put a backbone loaded here (default CPU).
    """
    run_dir = Path(run_dir)
    if (run_dir / EXPORT_CONFIG).is_file():
        info, cfg = read_exported(run_dir)
    else:
        info = read_run_info(run_dir)
        cfg = load_run_config(info["method"], run_dir / "config.yaml")
    if backbone is None:
        backbone = ClipBackbone.from_file(_checked_clip(run_dir, info, clip), info.get("clip_model"))
        backbone = backbone.to(device or "cpu")
    method = create_method(info["method"], backbone, build(info["method"], cfg)[0])
    method = method.to(next(backbone.parameters()).device)
    if method.learnable_parameters():
        weights = run_dir / "learnable.safetensors"
        method.load_learnable_state_dict(load_tensors(weights), source=str(weights))
        method.set_trained_classnames(info["classnames"], run_dir)
    return TrainedRun(method.eval(), info, cfg, run_dir)


def read_exported(folder: Path) -> tuple[dict, DictConfig]:
    """The run record and config of a folder written by ``alignednorm export``."""
    path = folder / EXPORT_CONFIG
    try:
        data = json.loads(path.read_text())
        backbone = data["backbone"]
        info = {"method": data["method"], "classnames": data["classnames"], "template": data["templates"][0],
                "clip": backbone["path"], "clip_sha256": backbone["sha256"], "clip_model": backbone.get("clip_model"),
                "dataset": data.get("dataset"), "shots": data.get("shots")}
    except (OSError, json.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a readable exported prompt ({type(exc).__name__}: {exc})") from None
    return info, run_config_from(info["method"], data.get("config", {}), str(path))


def _checked_clip(run_dir: Path, info: dict, clip: str | Path | None) -> Path:
    record = run_dir / (EXPORT_CONFIG if (run_dir / EXPORT_CONFIG).is_file() else "run.json")
    clip_path = Path(info["clip"] if clip is None else clip).expanduser()  # words such as 'mini': the face's
    if not clip_path.is_file():
        raise CheckpointError(f"backbone {clip_path} (recorded in {record}) does not exist; pass clip=... / --clip")
    if file_sha256(clip_path) != info["clip_sha256"]:
        raise CheckpointError(f"backbone {clip_path} is not the one the prompt was trained with "
                              f"(SHA-256 differs from the one recorded in {record})")
    return clip_path


def _run_info(spec: RunSpec, data: TrainingData, identity: dict, method: Method) -> dict:
    return {
        "command": spec.command or format_command(["alignednorm", *sys.argv[1:]]),
        "environment": environment(),
        "learnable_parameters": sum(p.numel() for p in method.learnable_parameters()),
        "method": spec.method, "dataset": spec.dataset, "shots": spec.shots, "train_subset": spec.train_subset,
        "classnames": data.classnames, "template": data.template,
        "clip": str(Path(spec.clip).resolve()), "clip_model": spec.clip_model, "clip_sha256": identity["clip_sha256"],
        "data_root": str(Path(spec.data_root).resolve()),
        "torch": torch.__version__, "identity": identity,
        # Methods that use class descriptions fall back to the templates without them: say so.
        "description_fallback": method.traits.uses_descriptions and method.label_space.descriptions is None,
    }
