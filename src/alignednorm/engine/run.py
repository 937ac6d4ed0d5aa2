"""One run: load data and backbone, train a method, evaluate it, write the run folder.

A run folder holds ``config.yaml`` (the resolved config), ``run.json`` (what was run: method,
dataset, shots, seed, backbone file and checksum, class names), ``learnable.safetensors``,
``checkpoint.pt`` while training, ``log.jsonl`` and finally ``metrics.json``. Every file is
written atomically; a folder with ``metrics.json`` is complete and is skipped unless forced.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from alignednorm import data as D
from alignednorm.backbone.clip import ClipBackbone
from alignednorm.config import build, to_yaml
from alignednorm.data.dataset import skip_none_collate
from alignednorm.engine import distributed
from alignednorm.engine.evaluate import evaluate
from alignednorm.engine.io import save_tensors, write_json, write_text
from alignednorm.engine.trainer import Trainer, seed_everything
from alignednorm.errors import AlignedNormError
from alignednorm.methods import Method, create_method

log = logging.getLogger(__name__)


@dataclass
class RunSpec:
    """What to run.

    Attributes:
        method: registered method name.
        dataset: dataset to train on (catalog name).
        data_root: the CoOp-layout data folder.
        clip: backbone checkpoint file; ``clip_model`` its open_clip name for open_clip checkpoints.
        output: the run folder.
        config: the resolved ``{method, train, data}`` config.
        shots: K-shot training (0 = all training images).
        train_subset: classes trained on: ``base`` (base-to-new) or ``all``.
        evals: ``(name, dataset, subset)`` triples evaluated after training.
        cache_dir: few-shot index cache (default: ``<data_root>/../.alignednorm-cache`` is avoided;
            ``<output>/../../.cache`` keeps it beside the runs).
    """

    method: str
    dataset: str
    data_root: str
    clip: str
    output: str
    config: DictConfig
    shots: int = 16
    train_subset: str = "base"
    evals: list[tuple[str, str, str]] = field(default_factory=lambda: [("base", "", "base"), ("new", "", "new")])
    clip_model: str | None = None
    cache_dir: str | None = None
    progress: bool = True


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


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


def load_split(spec: RunSpec, dataset: str, subset: str, seed: int) -> D.DatasetSplits:
    """The dataset's splits after Dassl's few-shot sampling and CoOp's base/new selection."""
    splits = D.load_splits(dataset, spec.data_root)
    if spec.shots > 0 and dataset == spec.dataset:
        cache = spec.cache_dir or str(Path(spec.output).resolve().parent / ".fewshot-cache")
        splits = D.few_shot_splits(splits, spec.shots, seed, cache_dir=cache)
    return D.subsample_classes(splits, subset)


def eval_loader(items, backbone: ClipBackbone, batch_size: int, skip_corrupt: bool) -> DataLoader:
    transform = D.build_transform(backbone.image_size, train=False)
    return DataLoader(D.ImageListDataset(items, transform, skip_corrupt=skip_corrupt), batch_size=batch_size,
                      collate_fn=skip_none_collate)


def execute(spec: RunSpec, backbone: ClipBackbone | None = None, force: bool = False, resume: bool = False) -> dict:
    """Train (unless nothing is learnable) and evaluate; returns the metrics written.

    A finished run (``metrics.json``) is skipped unless ``force``. An interrupted one
    (``checkpoint.pt`` without ``metrics.json``) continues with ``resume``, restarts with
    ``force``, and is otherwise refused, so no partial work is lost silently. Under ``torchrun``
    every process trains its share of each batch; process 0 alone writes and evaluates.
    """
    device = distributed.init_from_env()
    run_dir = Path(spec.output)
    finished, interrupted = (run_dir / "metrics.json").is_file(), (run_dir / "checkpoint.pt").is_file()
    distributed.barrier()  # every process decides from the same files
    if finished and not force:
        log.info("skipping %s: metrics.json exists (use --force to re-run)", run_dir)
        return json.loads((run_dir / "metrics.json").read_text())
    if interrupted and not (resume or force):
        raise AlignedNormError(f"{run_dir} holds an interrupted run (checkpoint.pt); pass --resume to continue it "
                               "or --force to start over")
    if device is not None and backbone is None:
        backbone = ClipBackbone.from_file(spec.clip, spec.clip_model).to(device)
    if not distributed.is_main():
        return _execute(spec, run_dir, backbone)
    with RunLock(run_dir):
        if force:
            for name in ("metrics.json", "checkpoint.pt", "log.jsonl", "learnable.safetensors"):
                (run_dir / name).unlink(missing_ok=True)
        distributed.barrier()
        return _execute(spec, run_dir, backbone)


def _execute(spec: RunSpec, run_dir: Path, backbone: ClipBackbone | None) -> dict:
    method_cfg, train_cfg, data_cfg = build(spec.method, spec.config)
    seed_everything(train_cfg.seed)
    backbone = backbone or ClipBackbone.from_file(spec.clip, spec.clip_model)
    method = create_method(spec.method, backbone, method_cfg).to(next(backbone.parameters()).device)
    template = D.get_dataset(spec.dataset).template
    train_split = load_split(spec, spec.dataset, spec.train_subset, train_cfg.seed)
    method.set_classnames(train_split.classnames, template)
    if method.learnable_parameters():
        method.set_trained_classnames(train_split.classnames, run_dir)
    main = distributed.is_main()
    if main:
        write_text(run_dir / "config.yaml", to_yaml(spec.config))
        write_json(run_dir / "run.json", _run_info(spec, train_split, backbone))
    train_stats = {}
    if method.learnable_parameters():
        transform = D.build_transform(backbone.image_size, train=True, crop_scale=tuple(data_cfg.crop_scale),
                                      hflip=data_cfg.hflip)
        dataset = D.ImageListDataset(train_split.train, transform, skip_corrupt=data_cfg.skip_corrupt)
        trainer = Trainer(method, train_cfg, run_dir, progress=spec.progress and main)
        train_stats = trainer.fit(dataset, resume=True)
        train_stats["skipped_images"] = dataset.num_skipped
        if main:
            save_tensors(run_dir / "learnable.safetensors", method.learnable_state_dict(),
                         metadata={"method": spec.method, "classnames": json.dumps(train_split.classnames)})
    metrics = {"method": spec.method, "dataset": spec.dataset, "shots": spec.shots, "seed": train_cfg.seed,
               "train": train_stats, "eval": {}}
    if main:
        for name, dataset_name, subset in spec.evals:
            metrics["eval"][name] = evaluate_on(spec, method, dataset_name or spec.dataset, subset, train_cfg.seed,
                                                data_cfg)
        write_json(run_dir / "metrics.json", metrics)
        (run_dir / "checkpoint.pt").unlink(missing_ok=True)  # the run is complete; learnable.safetensors stays
    distributed.barrier()
    return metrics


def evaluate_on(spec: RunSpec, method: Method, dataset: str, subset: str, seed: int, data_cfg) -> dict:
    """Accuracy of ``method`` on ``dataset``'s test split restricted to ``subset``."""
    split = load_split(spec, dataset, subset, seed)
    result = evaluate_split(method, split, dataset, subset, data_cfg, spec.progress)
    result.update(dataset=dataset, subset=subset)
    log.info("%s %s/%s: %.2f%%", spec.method, dataset, subset, result["accuracy"])
    return result


def evaluate_split(method: Method, split: D.DatasetSplits, dataset: str, rule: str, data_cfg,
                   progress: bool = True) -> dict:
    """Accuracy on ``split.test`` over its classes, with the inference rule ``rule`` (base / new / all).

    Unreadable images skipped under ``data.skip_corrupt`` are counted in ``skipped_images``.
    """
    method.check_classnames(split.classnames, rule)
    method.set_classnames(split.classnames, D.get_dataset(dataset).template)
    loader = eval_loader(split.test, method.backbone, data_cfg.eval_batch_size, data_cfg.skip_corrupt)
    result = evaluate(method, loader, subset=rule, progress=progress, desc=f"eval {dataset}/{rule}")
    skipped = loader.dataset.num_skipped
    result.update(num_classes=len(split.classnames), skipped_images=skipped)
    if skipped:
        log.warning("%s/%s: skipped %d unreadable images: %s", dataset, rule, skipped, sorted(loader.dataset.skipped)[:5])
    return result


def remember_training_classes(method: Method, run_dir: str | Path) -> None:
    """Tell ``method`` which classes the prompt saved in ``run_dir`` was trained on (from ``run.json``)."""
    info_path = Path(run_dir) / "run.json"
    try:
        classnames = json.loads(info_path.read_text())["classnames"]
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise AlignedNormError(f"{info_path}: cannot read the training class names ({exc!r}); "
                               "expected the run.json written by training") from exc
    method.set_trained_classnames(classnames, run_dir)


def _run_info(spec: RunSpec, split: D.DatasetSplits, backbone: ClipBackbone) -> dict:
    return {
        "method": spec.method, "dataset": spec.dataset, "shots": spec.shots, "train_subset": spec.train_subset,
        "classnames": split.classnames, "template": D.get_dataset(spec.dataset).template,
        "clip": str(Path(spec.clip).resolve()), "clip_model": spec.clip_model, "clip_sha256": file_sha256(spec.clip),
        "torch": torch.__version__,
    }
