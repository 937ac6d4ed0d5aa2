"""Contrastive pretraining of the tiny CLIP on the mini world, on CPU, deterministic from a seed.

Captions cover every class of every mini dataset (new-class halves included, as web pretraining
covers them) with varied templates and each dataset's own template. Images come from a pool of
rendered images (a seed namespace disjoint from the split images) in which a few slots are
re-rendered every step, so the model sees fresh nuisance samples at a fraction of the rendering
cost. Both the pool and the batches are pure functions of (seed, step), which makes resuming exact.

Run ``python -m alignednorm.mini.pretrain`` (8000 steps, about 40 minutes on one CPU thread; see
``--help``). The work folder keeps an atomic checkpoint to resume from; the result is an
OpenAI-format float16 safetensors file plus ``mini_clip.json`` metadata.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from . import mini_clip_path
from .model import (
    MINI_CLIP,
    accuracy,
    build_mini_clip,
    class_embeddings,
    encode_text,
    load_mini_clip,
    rendered_split,
    to_tensor,
    tokenize,
)
from .objects import render_object
from .world import MINI_DATASETS, WORLD_VERSION, MiniDataset

log = logging.getLogger(__name__)

CAPTIONS = (
    "a photo of a {}.", "a picture of a {}.", "an image of {}.", "{}.", "{}", "a small photo of the {}.",
    "a rendering of a {}.", "a close-up image of the {}.", "this is {}.", "look, a {}!",
    "a low resolution photo of a {}.", "a synthetic image showing a {}, drawn by a simple procedural program.",
    "an example of a {}, one of many classes in a small synthetic world of images.",
    "a tiny, slightly blurry, low resolution picture of a {}, rendered on a random background with some clutter.",
)
"""Generic caption templates; long ones train the positions a learned context later occupies."""
OBJECT_STYLES = {"photo": 0.8, "wide": 0.05, "sketch": 0.05, "hard": 0.05, "restyled": 0.05}
"""How often a pretraining image of the broad dataset is drawn in each style: web data holds sketches,
renditions and hard photos too, which is why CLIP transfers to the ImageNet variants at all."""
ENSEMBLE = ("a photo of a {}.", "a picture of a {}.", "a rendering of a {}.", "{}.")
"""Extra templates of the template-ensemble zero-shot numbers (added to each dataset's own)."""


@dataclass
class PretrainConfig:
    """Hyper-parameters of the pretraining run (saved in the checkpoint and the metadata)."""

    steps: int = 8000
    seed: int = 0
    batch_size: int = 128
    datasets_per_batch: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup: int = 300
    grad_clip: float = 1.0
    dataset_template_prob: float = 0.5
    pool_per_class: int = 128
    refresh_per_step: int = 24
    weights: dict[str, float] = field(default_factory=lambda: {
        "mini_objects": 3.0, "mini_shapes": 1.2, "mini_textures": 0.8, "mini_glyphs": 1.3, "mini_counts": 1.3,
        "mini_relations": 1.0, "mini_satellite": 0.8})
    threads: int = 1
    checkpoint_every: int = 200
    eval_every: int = 500
    eval_per_class: int = 10
    arch: dict[str, int] = field(default_factory=lambda: dict(MINI_CLIP))


def pretraining_image(dataset: MiniDataset, label: int, rng: np.random.Generator) -> Image.Image:
    """One pretraining image of class ``label``; broad-dataset images vary in style (:data:`OBJECT_STYLES`)."""
    factors = dataset.classes[label][1]
    if dataset.render is render_object:
        style = list(OBJECT_STYLES)[rng.choice(len(OBJECT_STYLES), p=list(OBJECT_STYLES.values()))]
        return render_object(rng, factors[0], factors[1], style)
    return dataset.render(rng, *factors)  # clean: each dataset's capture condition is downstream-only


def training_datasets() -> list[MiniDataset]:
    """The datasets whose images and captions are used (the shifted test sets are not trained on)."""
    return [d for d in MINI_DATASETS if not d.test_only]


class ImagePool:
    """Rendered training images, ``pool_per_class`` per class; slot k is re-rendered in turn.

    The content of every slot at step ``s`` is a function of (seed, slot, generation), with
    generation ``(s * refresh - k + N - 1) // N``, so the pool can be rebuilt at any step.
    """

    def __init__(self, cfg: PretrainConfig, step: int = 0):
        self.cfg, self.datasets = cfg, training_datasets()
        self.owner = [(d, lab) for d in self.datasets for lab in range(len(d.classes))
                      for _ in range(cfg.pool_per_class)]
        self.offset, start = {}, 0
        for d in self.datasets:
            self.offset[d.name], start = start, start + len(d.classes) * cfg.pool_per_class
        size = len(self.owner)
        self.images = np.zeros((size, MINI_CLIP["image_size"], MINI_CLIP["image_size"], 3), np.uint8)
        for k in range(size):
            self._render(k, (step * cfg.refresh_per_step - k + size - 1) // size)

    def _render(self, slot: int, generation: int) -> None:
        dataset, label = self.owner[slot]
        rng = np.random.default_rng([self.cfg.seed, 2, slot, generation])
        self.images[slot] = np.asarray(pretraining_image(dataset, label, rng))

    def refresh(self, step: int) -> None:
        """Re-render the slots due at ``step`` (call once per step, before sampling)."""
        for c in range(step * self.cfg.refresh_per_step, (step + 1) * self.cfg.refresh_per_step):
            self._render(c % len(self.owner), c // len(self.owner) + 1)

    def slot(self, dataset: MiniDataset, label: np.ndarray, index: np.ndarray) -> np.ndarray:
        return self.offset[dataset.name] + label * self.cfg.pool_per_class + index


def caption_tokens(datasets: list[MiniDataset], context_length: int) -> dict[str, torch.Tensor]:
    """Token ids of every (class, template) caption: per dataset (C, 1 + len(CAPTIONS), L), own template first."""
    return {d.name: tokenize([t.format(c) for c in d.classnames for t in (d.template, *CAPTIONS)],
                             context_length).view(len(d.classes), 1 + len(CAPTIONS), context_length)
            for d in datasets}


def sample_batch(step: int, cfg: PretrainConfig, pool: ImagePool, tokens: dict[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch: images (B, 3, H, W), one caption per (dataset, class) present (T, L), image -> caption (B,)."""
    rng = np.random.default_rng([cfg.seed, 1, step])
    weights = np.array([cfg.weights.get(d.name, 1.0) for d in pool.datasets])
    chosen = rng.choice(len(pool.datasets), cfg.datasets_per_batch, replace=False, p=weights / weights.sum())
    slots, captions, targets = [], [], []
    per = cfg.batch_size // cfg.datasets_per_batch
    for i in chosen:
        dataset = pool.datasets[i]
        labels = rng.integers(0, len(dataset.classes), per)
        slots.append(pool.slot(dataset, labels, rng.integers(0, cfg.pool_per_class, per)))
        present, inverse = np.unique(labels, return_inverse=True)
        own = rng.uniform(size=len(present)) < cfg.dataset_template_prob
        which = np.where(own, 0, rng.integers(1, 1 + len(CAPTIONS), len(present)))
        targets.append(torch.from_numpy(inverse + sum(len(c) for c in captions)))
        captions.append(tokens[dataset.name][present, which])
    images = to_tensor(pool.images[np.concatenate(slots)])
    return images, torch.cat(captions), torch.cat(targets)


def contrastive_loss(image_feats: torch.Tensor, text_feats: torch.Tensor, targets: torch.Tensor,
                     logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE where all images of a class share that class's caption as positive.

    Args:
        image_feats: (B, D) normalised. text_feats: (T, D) normalised. targets: (B,) caption of each image.
    """
    logits = logit_scale.exp().clamp(max=100) * image_feats @ text_feats.T  # (B, T)
    image_loss = F.cross_entropy(logits, targets)
    positives = F.one_hot(targets, text_feats.shape[0]).float().T  # (T, B)
    text_logp = F.log_softmax(logits.T, dim=-1)
    text_loss = -(text_logp * positives).sum(-1).div(positives.sum(-1)).mean()
    return (image_loss + text_loss) / 2


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)))


def make_optimizer(model: torch.nn.Module, cfg: PretrainConfig) -> torch.optim.AdamW:
    """AdamW without weight decay on gains, biases and the logit scale (as open_clip does)."""
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "ln" in n or "bias" in n or "logit_scale" in n]
    ids = {id(p) for p in no_decay}
    decay = [p for p in model.parameters() if id(p) not in ids]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6, foreach=True)


def _save_atomic(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def quick_eval(model: torch.nn.Module, evalset: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Zero-shot accuracy with each dataset's own template on small held-out test subsets."""
    model.eval()
    out = {}
    for dataset in training_datasets():
        weights = class_embeddings(model, dataset.classnames, [dataset.template])
        out[dataset.name] = round(accuracy(model, *evalset[dataset.name], weights), 4)
    model.train()
    return out


def _restore(state_path: Path, cfg: PretrainConfig, model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Load the checkpoint into ``model``/``opt``; the run's config must match."""
    state = torch.load(state_path, map_location="cpu", weights_only=False)
    if state["config"] != asdict(cfg):
        raise ValueError(f"{state_path} was written with another configuration: {state['config']} (now {asdict(cfg)});"
                         " delete it or pass the same options")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optim"])
    log.info("resuming from step %d (%s)", state["step"], state_path)
    return state


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, cfg: PretrainConfig, step: int,
               images: torch.Tensor, captions: torch.Tensor, targets: torch.Tensor) -> float:
    """One optimisation step on a batch from :func:`sample_batch`; returns the loss."""
    for group in opt.param_groups:
        group["lr"] = lr_at(step, cfg)
    loss = contrastive_loss(F.normalize(model.encode_image(images), dim=-1),
                            F.normalize(encode_text(model, captions), dim=-1), targets, model.logit_scale)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    return loss.item()


def train(cfg: PretrainConfig, work_dir: Path, until: int | None = None) -> tuple[torch.nn.Module, dict]:
    """Run (or resume) pretraining in ``work_dir``; returns the model and the run's record.

    ``until`` stops (with a checkpoint) after that many steps in total, for time-sliced runs. Torch
    uses ``cfg.threads`` threads meanwhile: one by default, because on a small machine shared with
    other busy processes two spinning OpenMP threads run about ten times slower than one.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, work_dir, until)
    finally:
        torch.set_num_threads(previous)


def _train(cfg: PretrainConfig, work_dir: Path, until: int | None) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(cfg.seed)
    work_dir.mkdir(parents=True, exist_ok=True)
    model = build_mini_clip(**cfg.arch)
    opt = make_optimizer(model, cfg)
    state_path = work_dir / "pretrain_state.pt"
    record = {"step": 0, "elapsed_s": 0.0, "history": []}
    if state_path.exists():
        record = {k: v for k, v in _restore(state_path, cfg, model, opt).items() if k in record}
    tokens = caption_tokens(training_datasets(), model.context_length)
    evalset = {d.name: rendered_split(d, cfg.seed, "test", cfg.eval_per_class) for d in training_datasets()}
    pool = ImagePool(cfg, record["step"])
    model.train()
    start, done_before = time.perf_counter(), record["elapsed_s"]
    last = min(cfg.steps, until or cfg.steps)
    for step in range(record["step"], last):
        pool.refresh(step)
        loss = train_step(model, opt, cfg, step, *sample_batch(step, cfg, pool, tokens))
        record.update(step=step + 1, elapsed_s=done_before + time.perf_counter() - start)
        if (step + 1) % 50 == 0:
            log.info("step %d/%d loss %.4f lr %.2e scale %.1f %.2fs/step", step + 1, cfg.steps, loss,
                     lr_at(step, cfg), model.logit_scale.exp().item(), record["elapsed_s"] / (step + 1))
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            accs = quick_eval(model, evalset)
            record["history"].append({"step": step + 1, "zero_shot": accs})
            log.info("step %d zero-shot %s mean %.3f", step + 1, accs, sum(accs.values()) / len(accs))
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == last:
            _save_atomic({"model": model.state_dict(), "optim": opt.state_dict(), "config": asdict(cfg), **record},
                         state_path)
    return model.eval(), record


@torch.no_grad()
def zero_shot_table(path: Path, seed: int = 0) -> dict[str, dict[str, float]]:
    """Full-test-split zero-shot accuracy of a saved checkpoint on every mini dataset.

    Returns:
        ``{"single": {name: acc}, "ensemble": {name: acc}, "chance": {name: 1 / classes}}``; single uses
        the dataset's own template (what the prompt methods start from), ensemble adds :data:`ENSEMBLE`.
    """
    model = load_mini_clip(path)
    table: dict[str, dict[str, float]] = {"single": {}, "ensemble": {}, "chance": {}}
    for dataset in MINI_DATASETS:
        images, labels = rendered_split(dataset, seed, "test")
        for key, templates in (("single", [dataset.template]), ("ensemble", [dataset.template, *ENSEMBLE])):
            weights = class_embeddings(model, dataset.classnames, templates)
            table[key][dataset.name] = round(accuracy(model, images, labels, weights), 4)
        table["chance"][dataset.name] = round(1 / len(dataset.classes), 4)
    return table


def export(model: torch.nn.Module, out_path: Path, cfg: PretrainConfig, record: dict, command: str) -> dict:
    """Save the weights as float16 safetensors (OpenAI key names) and ``<out>.json`` metadata; return it."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    tmp = out_path.with_name(out_path.name + ".tmp")
    save_file(state, tmp, metadata={"format": "pt"})
    os.replace(tmp, out_path)
    out_path.chmod(0o644)
    meta = {
        "architecture": {**cfg.arch, "heads": cfg.arch["vision_width"] // 64, "activation": "QuickGELU",
                         "tokenizer": "OpenAI BPE (open_clip SimpleTokenizer)",
                         "parameters": sum(v.numel() for v in state.values())},
        "config": asdict(cfg),
        "steps": record["step"], "wall_time_s": round(record["elapsed_s"], 1),
        "seconds_per_step": round(record["elapsed_s"] / max(1, record["step"]), 3),
        "file_bytes": out_path.stat().st_size,
        **_zero_shot_fields(out_path, cfg.seed),
        "history": record["history"],
        "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__, "numpy": np.__version__},
        "command": command,
    }
    _write_meta(out_path, meta)
    return meta


def _zero_shot_fields(path: Path, seed: int) -> dict:
    table = zero_shot_table(path, seed)
    main = [d.name for d in training_datasets()]
    return {
        "zero_shot": table,
        "zero_shot_mean_single": round(sum(table["single"][n] for n in main) / len(main), 4),
        "zero_shot_mean_ensemble": round(sum(table["ensemble"][n] for n in main) / len(main), 4),
        "world_version": WORLD_VERSION,
    }


def _write_meta(out_path: Path, meta: dict) -> None:
    tmp_json = out_path.with_suffix(".json.tmp")
    tmp_json.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp_json, out_path.with_suffix(".json"))


def rescore(path: str | os.PathLike | None = None) -> dict:
    """Re-measure a checkpoint's zero-shot table on the current world (after its renderers or captures
    changed) and rewrite those fields of its metadata; the weights and training record are untouched."""
    path = Path(path) if path is not None else mini_clip_path()
    meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    meta.update(_zero_shot_fields(path, meta["config"]["seed"]))
    _write_meta(path, meta)
    return meta


def pretrain(out_path: str | os.PathLike | None = None, seed: int = 0, steps: int = 8000,
             work_dir: str | os.PathLike = "runs/mini_clip_pretrain", **overrides) -> dict:
    """Pretrain (or resume) the tiny CLIP and export it.

    Args:
        out_path: the safetensors file to write (default: the packaged :func:`mini_clip_path`).
        seed: seed of the model initialisation, the image pool and the batches.
        steps: optimisation steps (the learning-rate schedule depends on it).
        work_dir: folder of the resumable checkpoint ``pretrain_state.pt``.
        **overrides: further :class:`PretrainConfig` fields.

    Returns:
        The metadata written next to the weights (zero-shot accuracies, timings, ...).
    """
    cfg = PretrainConfig(steps=steps, seed=seed, **overrides)
    out = Path(out_path) if out_path is not None else mini_clip_path()
    command = " ".join(["python -m alignednorm.mini.pretrain", *sys.argv[1:]]) if sys.argv[1:] else \
        f"python -m alignednorm.mini.pretrain --seed {seed} --steps {steps}"
    model, record = train(cfg, Path(work_dir))
    meta = export(model, out, cfg, record, command)
    log.info("wrote %s (%d bytes); zero-shot (own template) %s; mean %.3f", out, meta["file_bytes"],
             meta["zero_shot"]["single"], meta["zero_shot_mean_single"])
    return meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m alignednorm.mini.pretrain", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="safetensors to write (default: the packaged asset)")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/mini_clip_pretrain"),
                        help="folder of the resumable checkpoint")
    parser.add_argument("--steps", type=int, default=PretrainConfig.steps)
    parser.add_argument("--seed", type=int, default=PretrainConfig.seed)
    parser.add_argument("--batch-size", type=int, default=PretrainConfig.batch_size)
    parser.add_argument("--lr", type=float, default=PretrainConfig.lr)
    parser.add_argument("--threads", type=int, default=PretrainConfig.threads)
    parser.add_argument("--eval-every", type=int, default=PretrainConfig.eval_every)
    parser.add_argument("--patch-size", type=int, default=MINI_CLIP["patch_size"])
    parser.add_argument("--rescore", action="store_true",
                        help="only re-measure the zero-shot table of --out (or the packaged asset) "
                             "on the current world")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.rescore:
        meta = rescore(args.out)
        log.info("zero-shot (own template) %s; mean %.3f", meta["zero_shot"]["single"], meta["zero_shot_mean_single"])
        return
    pretrain(args.out, seed=args.seed, steps=args.steps, work_dir=args.work_dir, batch_size=args.batch_size,
             lr=args.lr, threads=args.threads, eval_every=args.eval_every,
             arch={**MINI_CLIP, "patch_size": args.patch_size})


if __name__ == "__main__":
    main()
