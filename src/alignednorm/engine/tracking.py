"""Where a run's training curves go: ``log.jsonl`` always, TensorBoard event files, wandb on request.

Only process 0 writes. On resume TensorBoard purges the events logged after the checkpoint the
run continues from, so an interrupted-and-resumed run shows one clean curve; ``log.jsonl``
keeps every line and marks the resume point.

``log.jsonl`` keeps the methods' own term names (``l_proj_ln_logged``); TensorBoard and wandb get
readable tags (:data:`TAGS`: ``train/L_proj after ln_post x 0.1 (logged only)``), the validation
accuracy of every epoch where validation runs (``val/accuracy (%)``, ``train.select: best-val``) and
the run's hyper-parameters (the resolved ``config.yaml``, in TensorBoard's HPARAMS tab).

Each finished epoch is also one line on the ``alignednorm.progress`` logger (loss, validation
accuracy, seconds), kept out of every number file: the command line shows these lines when stderr
is not a terminal (a log file, nohup, CI), where progress bars stay silent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from pathlib import Path

from alignednorm.engine import distributed
from alignednorm.errors import ConfigError

log = logging.getLogger(__name__)
progress_log = logging.getLogger("alignednorm.progress")

# Readable names of the methods' loss terms and the trainer's numbers (TensorBoard / wandb tags).
TAGS = {
    "lr": "learning rate", "acc": "batch accuracy (%)", "val_accuracy": "accuracy (%)", "seconds": "seconds",
    "ce": "cross-entropy", "ce_cls": "cross-entropy, class-token branch",
    "ce_rep": "cross-entropy, representation branch", "ce_mean": "cross-entropy, mean prompt",
    "task": "task loss (weighted cross-entropies)",
    "reg_img": "self-regularisation, image", "reg_text": "self-regularisation, text",
    "l_token": "L_token (token norm alignment)", "l_proj": "L_proj (projection norm alignment)",
    "l_token_weighted": "L_token x gamma (in the loss)", "l_proj_weighted": "L_proj x beta (in the loss)",
    "l_token_attn": "L_token on the attention branch (logged only)",
    "l_proj_ln": "L_proj after ln_post (logged only)",
    "l_token_attn_logged": "L_token on the attention branch x 0.1 (logged only)",
    "l_proj_ln_logged": "L_proj after ln_post x 0.1 (logged only)",
    "scl": "self-consistency (SCL)", "scl_text": "self-consistency, text", "scl_image": "self-consistency, image",
    "scl_logits": "self-consistency, logits", "l1_text": "L1 to frozen text features",
    "l1_image": "L1 to frozen image features", "kl_sum": "KL to zero-shot logits",
    "pun": "PUN (prompt norm, uniform positions)", "pan": "PAN (prompt norm, position-aware)",
    "omega_e": "omega_E (Nemesis weight)", "distill": "distillation", "distill_text": "distillation, text",
    "distill_image": "distillation, image", "description_fallback": "templates instead of descriptions",
}
_POSITION_TERM = re.compile(r"^(?:ctx_norm_|prompt_norm\.)(\d+)$")  # CoOp-style per-position prompt norms
_SECTIONS = {"epoch_mean": "epoch mean"}


def readable_tag(prefix: str, name: str) -> str:
    """The TensorBoard / wandb tag of a logged number: ``train/L_token (token norm alignment)``.

    Nested records flatten with ``/`` (``epoch_mean/loss``): the section becomes the tag's group.
    """
    *sections, term = name.split("/")
    match = _POSITION_TERM.match(term)
    label = f"prompt norm, position {match.group(1)}" if match else TAGS.get(term, term)
    if sections:
        return "/".join([_SECTIONS.get(sections[0], sections[0]), *sections[1:], label])
    return f"{prefix}/{label}"


class RunTracker:
    """Scalars of one training run.

    Args:
        run_dir: the run folder; ``None`` logs nothing.
        tensorboard: write event files under ``run_dir/tensorboard``.
        wandb_project: also log to this Weights & Biases project ("" = off); the run id is derived
            from the run folder, so a resumed run continues the same wandb run.
        start_step: the global step training (re)starts from.
        config: the training settings (``TrainConfig`` as a dict): the epoch count and selection rule of
            the progress lines, and the hyper-parameters when the run folder has no ``config.yaml``.
    """

    def __init__(self, run_dir: Path | None, tensorboard: bool = True, wandb_project: str = "",
                 start_step: int = 0, config: dict | None = None):
        self.run_dir = run_dir if distributed.is_main() else None
        self.writer = None
        self.wandb_run = None
        self.config = config or {}
        self.pending: dict | None = None  # the finished epoch whose progress line waits for its validation
        if self.run_dir is None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if start_step:
            self._append({"resumed_at_global_step": start_step})
        hparams = run_hyperparameters(self.run_dir, self.config)
        if tensorboard:
            self.writer = _summary_writer(self.run_dir / "tensorboard", start_step)
            self._write_hparams(hparams)
        if wandb_project:
            self.wandb_run = _wandb_run(wandb_project, self.run_dir, hparams)

    def log(self, record: dict, step: int, prefix: str) -> None:
        """Append ``record`` to ``log.jsonl``; its numbers become scalars ``prefix/<name>`` at ``step``."""
        if self.run_dir is None:
            return
        self._append(record)
        scalars = {readable_tag(prefix, k): float(v) for k, v in _flatten(record).items()
                   if isinstance(v, (int, float)) and k not in ("epoch", "step", "global_step")}
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=step)
        self._progress(record, prefix)

    def _progress(self, record: dict, prefix: str) -> None:
        """One line per finished epoch; with best-val selection it waits for the epoch's validation."""
        if prefix == "epoch":
            self._flush_progress()
            self.pending = dict(record)
            if self.config.get("select") != "best-val":
                self._flush_progress()
        elif prefix == "val" and self.pending is not None:
            self.pending["val_accuracy"] = record.get("val_accuracy")
            self._flush_progress()

    def _flush_progress(self) -> None:
        if self.pending is None:
            return
        record, self.pending = self.pending, None
        words = [f"epoch {record.get('epoch')}/{self.config.get('epochs', '?')}"]
        loss = (record.get("epoch_mean") or {}).get("loss")
        words += [f"loss {loss:.4f}"] if isinstance(loss, int | float) else []
        val = record.get("val_accuracy")
        words += [f"val {val:.2f}%"] if isinstance(val, int | float) else []
        words += [f"{record['seconds']:.1f} s"] if isinstance(record.get("seconds"), int | float) else []
        progress_log.info("  %s  (%s)", ", ".join(words), self.run_dir)

    def _write_hparams(self, hparams: dict) -> None:
        """The run's settings in TensorBoard's HPARAMS tab, beside its own scalars (no sub-run)."""
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        metrics = {"val/accuracy (%)": 0.0, "epoch mean/loss": 0.0}  # names only: values are the scalars' own
        for summary in hparams_summary(hparams, metrics):
            self.writer.file_writer.add_summary(summary)

    def close(self) -> None:
        self._flush_progress()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None

    def _append(self, record: dict) -> None:
        with open(self.run_dir / "log.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")


def run_hyperparameters(run_dir: Path, config: dict) -> dict:
    """Flat ``{"method.rep_dim": 512, "train.lr": 0.001, ...}`` of the run's resolved ``config.yaml``,
    else of ``config`` under ``train.``; lists and other values become text (what TensorBoard accepts)."""
    path = run_dir / "config.yaml"
    values = {"train": config}
    if path.is_file():
        from omegaconf import OmegaConf

        try:
            values = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        except Exception as exc:  # noqa: BLE001  (a hand-edited file must not stop training: the defaults are logged)
            log.warning("%s: not read for the hyper-parameters (%s)", path, exc)
    flat = {}
    for key, value in _flatten(values if isinstance(values, dict) else {}).items():
        name = key.replace("/", ".")
        flat[name] = value if isinstance(value, bool | int | float | str) else json.dumps(value)
    return flat


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
