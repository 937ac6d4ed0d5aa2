"""A generic training loop: any method's ``training_step``, AdamW/Adam/SGD, warm-up + cosine, resume.

The trainer knows nothing about methods: it back-propagates ``loss`` from the dict a method
returns and logs every term. Each epoch ends with an atomic checkpoint (learned tensors,
optimiser, scaler, RNG states), so a killed run resumes to the same result; the data order
and augmentation of epoch ``e`` depend only on ``(seed, e)``.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch.nn.utils import get_total_norm
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from alignednorm.config import TrainConfig, compile_backends  # noqa: F401  (re-exported)
from alignednorm.engine import distributed
from alignednorm.engine.batches import Batches, EpochBatches, image_batches
from alignednorm.engine.environment import peak_memory_mb
from alignednorm.engine.io import load_tensors, save_torch
from alignednorm.engine.tracking import RunTracker
from alignednorm.errors import AlignedNormError, CheckpointError, ConfigError
from alignednorm.methods.base import Method, StepState

log = logging.getLogger(__name__)

class TrainingDiverged(AlignedNormError):
    """A loss or gradient became NaN/inf."""


def lr_at_epoch(config: TrainConfig, epoch: int) -> float:
    """Dassl's schedule: constant warm-up, then cosine over ``epochs`` counted after warm-up."""
    if epoch < config.warmup_epochs:
        return config.warmup_lr
    return 0.5 * config.lr * (1 + math.cos(math.pi * (epoch - config.warmup_epochs) / config.epochs))


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` is fp16 with loss scaling on CUDA and fp32 elsewhere; named precisions stay."""
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    return precision


def gradients_finite(params: list[torch.nn.Parameter]) -> bool:
    """No inf or NaN in any gradient.

    A sum is finite only if every term is (NaN and inf never leave it), so a finite sum of the gradients'
    sums settles it — four times cheaper than a max-abs on CPU, where foreach norms loop per tensor. Only
    an overflow of large finite values makes it non-finite, so that case asks the exact max-abs.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or bool(torch.stack([g.sum(dtype=torch.float32) for g in grads]).sum().isfinite()):
        return True
    return bool(torch.isfinite(get_total_norm(grads, norm_type=math.inf)))


def build_optimizer(config: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The optimiser named by ``config.optimizer`` with Dassl's settings.

    ``foreach`` everywhere (torch picks it only for CUDA tensors): the same arithmetic, one call per
    operation for all tensors instead of a Python loop over them, which a tiny model's step feels.
    """
    betas = (config.adam_beta1, config.adam_beta2)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                               dampening=config.sgd_dampening, nesterov=config.sgd_nesterov, foreach=True)
    adam = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return adam(params, lr=config.lr, betas=betas, eps=config.adam_eps, weight_decay=config.weight_decay, foreach=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Train ``method`` on a dataset of ``(image, label)`` pairs.

    Args:
        method: any registered :class:`Method` with its class names set.
        config: optimisation settings.
        run_dir: where ``checkpoint.pt``, ``log.jsonl`` and ``tensorboard/`` go; ``None`` keeps nothing on disk.
        progress: show a progress bar.
        epoch_callback: ``epoch_callback(trainer, epoch, terms)`` after every epoch (0-based ``epoch``,
            the epoch's mean loss terms), after validation and before the checkpoint: for observers
            such as run-level parity checks; it must leave the method's learned values alone.
        workers: loader worker processes (``data.num_workers`` resolved); the numbers do not depend on it.
    """

    def __init__(self, method: Method, config: TrainConfig, run_dir: str | Path | None = None, progress: bool = True,
                 epoch_callback=None, workers: int = 0):
        self.method = method
        self.config = config
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.progress = progress
        self.device = next(method.backbone.parameters()).device
        # listed once: walking the whole backbone's modules every step costs more than a tiny model's step
        self.params = method.learnable_parameters()
        self.optimizer = build_optimizer(config, self.params) if self.params else None
        self.precision = resolve_precision(config.precision, self.device)
        if config.compile:  # in place: the state-dict keys stay those of the eager module
            method.compile(backend=config.compile)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        if config.batch_size % distributed.world_size():
            raise ConfigError(f"train.batch_size = {config.batch_size} must be divisible by the "
                              f"{distributed.world_size()} processes of this distributed run")
        self.start_epoch = 0
        self.global_step = 0
        # best-val selection: {"epoch", "accuracy", "learnable"} of the best epoch so far
        self.best: dict | None = None
        self.tracker: RunTracker | None = None
        self.epoch_callback = epoch_callback
        self.workers = workers
        if config.init_learnable:  # before any resume: a checkpoint's values win over the start values
            self.method.load_learnable_state_dict(load_tensors(config.init_learnable),
                                                  source=f"train.init_learnable {config.init_learnable}")

    @property
    def checkpoint_path(self) -> Path | None:
        return self.run_dir / "checkpoint.pt" if self.run_dir else None

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, epoch: int) -> None:
        if self.checkpoint_path is None or not distributed.is_main():
            return
        state = {
            "epoch": epoch,
            "global_step": self.global_step,
            "learnable": self.method.learnable_state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
            "scaler": self.scaler.state_dict(),
            "config": asdict(self.config),
            "best": self.best,
        }
        save_torch(self.checkpoint_path, state)

    def try_resume(self) -> bool:
        """Load ``checkpoint.pt`` when present; returns whether training resumes from it."""
        if self.checkpoint_path is None or not self.checkpoint_path.is_file():
            return False
        try:
            state = torch.load(self.checkpoint_path, map_location=self.device, weights_only=True)
        except Exception as exc:  # noqa: BLE001  (torch raises many types for a truncated or foreign file)
            raise CheckpointError(f"{self.checkpoint_path}: unreadable or truncated checkpoint ({type(exc).__name__}); "
                                  "pass --force to start the run over") from None
        if not isinstance(state, dict) or not {"epoch", "learnable", "scaler"} <= set(state):
            raise CheckpointError(f"{self.checkpoint_path}: not a training checkpoint of this trainer; "
                                  "pass --force to start the run over")
        self.method.load_learnable_state_dict(state["learnable"], source=str(self.checkpoint_path))
        if self.optimizer and state["optimizer"]:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.start_epoch = state["epoch"] + 1
        self.global_step = state["global_step"]
        self.best = state.get("best")
        log.info("resumed %s after epoch %d", self.checkpoint_path, state["epoch"] + 1)
        return True

    # ------------------------------------------------------------------ loop
    def _loader(self, dataset: Dataset) -> Batches:
        """One loader for every epoch (``set_epoch``): order and augmentation seeded by (seed, epoch)."""
        plan = dataset.plan if getattr(dataset, "plannable", False) else None
        batches = EpochBatches(len(dataset), self.config.batch_size, self.config.seed, plan)
        if distributed.is_distributed():  # every process draws the same order and keeps its slice
            batches = distributed.ShardedBatches(batches, distributed.world_size(), distributed.rank())
        return image_batches(dataset, workers=self.workers, device=self.device, batch_sampler=batches, persistent=True)

    def _autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def _check_finite(self, terms: dict[str, torch.Tensor], epoch: int, step: int) -> None:
        if not torch.isfinite(terms["loss"]):
            values = {k: float(v.detach()) for k, v in terms.items()}
            raise TrainingDiverged(
                f"loss became non-finite at epoch {epoch + 1}, step {step} (global step {self.global_step}): "
                f"{values}; the last good checkpoint is {self.checkpoint_path or 'not kept (no run dir)'}"
            )

    def fit(self, dataset: Dataset, resume: bool = True, validate=None) -> dict:
        """Train for ``config.epochs`` epochs; returns the mean loss terms of the last epoch.

        Args:
            dataset: ``(image, label)`` pairs.
            resume: continue from ``checkpoint.pt`` when present.
            validate: ``validate(method) -> accuracy`` on the validation split, needed by
                ``select: best-val``; the best epoch's learned values are loaded at the end.
        """
        if self.config.select == "best-val" and validate is None:
            raise ConfigError("train.select = 'best-val' needs a validation split; this run has none")
        if self.optimizer is None:
            return {}
        if resume:
            self.try_resume()
        self.tracker = RunTracker(self.run_dir, self.config.tensorboard, self.config.wandb_project,
                                  start_step=self.global_step, config=asdict(self.config))
        last: dict = {}
        seconds, steps = 0.0, 0
        loader = self._loader(dataset)
        # text_chunk holds while training (validation included), not in evaluations after it
        with self.method.backbone.text_options(text_chunk=self.config.text_chunk or None):
            try:
                for epoch in range(self.start_epoch, self.config.epochs):
                    self.method.on_epoch_start(self.step_state(epoch, 0))
                    start, first_step = time.time(), self.global_step
                    getattr(loader, "set_epoch", lambda _: None)(epoch)
                    last = self._train_epoch(loader, epoch)
                    seconds, steps = seconds + time.time() - start, steps + self.global_step - first_step
                    self.method.on_epoch_end(self.step_state(epoch, 0))
                    if self.config.select == "best-val":
                        self._keep_if_best(epoch, validate)
                    if self.epoch_callback is not None:
                        self.epoch_callback(self, epoch, last)
                    self.save_checkpoint(epoch)
                    distributed.barrier()  # nobody starts the next epoch before the checkpoint exists
            finally:
                self.tracker.close()
        if self.best is not None:
            self.method.load_learnable_state_dict(self.best["learnable"], source=f"best epoch {self.best['epoch'] + 1}")
            last = {**last, "selected_epoch": self.best["epoch"] + 1, "val_accuracy": self.best["accuracy"]}
        if steps:  # the cost of this attempt (after a resume: of the epochs it ran)
            last = {**last, "seconds_per_iter": seconds / steps, "peak_memory_mb": peak_memory_mb(self.device)}
        return last

    def _keep_if_best(self, epoch: int, validate) -> None:
        accuracy = float(validate(self.method))
        self.method.train()
        self.tracker.log({"epoch": epoch + 1, "val_accuracy": accuracy}, self.global_step, "val")
        later_wins = self.config.select_ties == "last"
        if self.best is None or accuracy > self.best["accuracy"] or (later_wins and accuracy == self.best["accuracy"]):
            self.best = {"epoch": epoch, "accuracy": accuracy, "learnable": self.method.learnable_state_dict()}

    def step_state(self, epoch: int, step: int) -> StepState:
        return StepState(epoch=epoch, max_epochs=self.config.epochs, step=step, global_step=self.global_step)

    def _train_epoch(self, loader: Batches, epoch: int) -> dict:
        # The method's own draws depend on (seed, epoch) only; the augmentation has its generator (EpochBatches).
        seed_everything(self.config.seed * 1_000 + epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at_epoch(self.config, epoch)
        self.method.train()
        sums: dict[str, float] = {}
        start = time.time()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{self.config.epochs}", disable=None if self.progress else True,
                   leave=False)
        for step, batch in enumerate(bar):
            if batch is None:  # every image of the batch was unreadable and skipped
                continue
            images, labels = batch
            with self._autocast():
                terms = self.method.training_step((images.to(self.device), labels.to(self.device)),
                                                  self.step_state(epoch, step))
            self._check_finite(terms, epoch, step)
            self.scaler.scale(terms["loss"] / self.config.grad_accum).backward()
            if (step + 1) % self.config.grad_accum == 0 or step + 1 == len(loader):
                self._optimizer_step(epoch, step)
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach())
            if step % self.config.log_every == 0:
                self.tracker.log({"epoch": epoch + 1, "step": step, "global_step": self.global_step,
                                  "lr": self.optimizer.param_groups[0]["lr"],
                                  **{k: float(v.detach()) for k, v in terms.items()}}, self.global_step, "train")
            bar.set_postfix(loss=f"{float(terms['loss'].detach()):.3f}")
        means = {k: v / max(len(loader), 1) for k, v in sums.items()}
        self.tracker.log({"epoch": epoch + 1, "epoch_mean": means, "seconds": round(time.time() - start, 3)},
                         self.global_step, "epoch")
        return means

    def _optimizer_step(self, epoch: int, step: int) -> None:
        distributed.average_gradients(self.params)
        self.scaler.unscale_(self.optimizer)
        if self.precision != "fp16" and not gradients_finite(self.params):  # fp16: the scaler skips inf steps
            raise TrainingDiverged(
                f"non-finite gradient at epoch {epoch + 1}, step {step}; "
                f"the last good checkpoint is {self.checkpoint_path or 'not kept (no run dir)'}"
            )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
