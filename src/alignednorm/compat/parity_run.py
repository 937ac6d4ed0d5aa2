"""Run-level parity: a whole official training run, reproduced epoch by epoch through ``alignednorm train``'s path.

Reached through ``python -m alignednorm.compat.parity FIXTURE_DIR`` for a manifest whose ``kind`` is a
run-level golden fixture (``shared/reference/README.md``, "Run-level fixtures": ``coop_run_a``,
``mmrlpp_run_a``). Every setting comes from the manifest's frozen official Dassl config:

1. The dataset's pixels are written as PNG files into the recorded layout (the catalog dataset named
   by ``DATASET.NAME``, e.g. ``eurosat/2750/...`` + ``split_zhou_EuroSAT.json``) in a temporary folder.
2. The official config becomes ours (:func:`plan_from_manifest`): the optimiser, schedule, batch,
   epochs, seed, shots, classes, transforms and model selection here; the method's own section
   (``TRAINER.<NAME>``) through that method's parity module (``method_from_manifest`` of
   ``parity_coop`` / ``parity_mmrl``, found by :data:`alignednorm.compat.parity.SECTIONS`).
3. The official initial values (``init.*``) become ``train.init_learnable``: the official code draws
   them from torch's global generator after building its own CLIP copy, an order of draws ours does
   not repeat.
4. The run goes through the protocol runner's steps (:func:`~alignednorm.engine.run.execute`, then
   :func:`~alignednorm.engine.run.load_run` and :func:`~alignednorm.protocols.runner.run_eval_step`),
   i.e. our few-shot sampler, trainer, validation, best-epoch selection and evaluation. An epoch
   callback records the lr, loss terms, learned tensors and optimiser state after every epoch, and
   the validation logits (recomputed from the same values, so bit-identical to the validation's).

Compared, with tolerances in the spirit of the step fixtures (``parity.DEFAULT_TOLERANCES``), scaled by
the epochs trained where values are carried from epoch to epoch (:data:`TOLERANCES`):

* the few-shot split: files, labels and order, exactly (Dassl's ``random.sample`` per class);
* every epoch's lr: relative 1e-9 (our closed-form cosine against torch's recursive one);
* the loss: 5e-5 (the step fixtures' loss tolerance) per epoch trained; per-epoch train accuracy 1e-4;
* every learned tensor after every epoch: 2e-5 (the step fixtures' ``after_step``) per epoch trained.
  Epoch 1 agrees to ~1e-9; float rounding (other kernels and summation orders than the official
  code's; feeding the official sample order changes nothing measurable) is then carried and
  amplified by momentum: CoOp at lr 0.05 reaches 4e-6 after 10 epochs, MMRL++ 9e-6 (Adam's first
  steps on near-zero gradients);
* the optimiser state (momentum buffer; Adam's moments and step count) relative to its largest
  entry: 1e-4 (the step fixtures' ``gradients_rel``) per epoch trained;
* validation logits after epoch k and test logits of the tested epoch: 1e-4 (the step fixtures'
  logits tolerance) per epoch trained: logits amplify the prompt's drift ~100x on this random CLIP
  (CoOp: 5e-4 after epoch 10);
* validation accuracy of every epoch, the selected epoch, final and new-class accuracies: exactly.
  The smallest top-1 margins are ~1e-3, so these are the comparisons that must not drift.

A batch per epoch is required (more batches would need Dassl's sample order, drawn from torch's global
generator). Our lr schedule needed no change: ``lr_at_epoch`` already starts the cosine at the epoch
after the warm-up, so epoch k > W runs at ``LR/2 (1 + cos(pi (k-1-W)/E))``, Dassl's late hand-over.

Not reproduced: MMRL++'s official inference cache (text features kept from the first evaluation
forward, never refreshed, and surviving the best-val reload in the same process). It matters only
when a run evaluates before its final test (``best_val``); our final test rebuilds the method from
its run folder, so matching it would need the stale features saved with the prompt. Such a fixture
is compared all the same and its stale-feature evaluations would show as failures.
"""

from __future__ import annotations

import importlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image
from safetensors.torch import load_file

from alignednorm import data as D
from alignednorm.compat.official import convert_official_state
from alignednorm.compat.parity import RUN_LEVEL_KIND, SECTIONS, build_report
from alignednorm.config import build
from alignednorm.engine.io import save_tensors, write_json
from alignednorm.engine.run import execute, load_run
from alignednorm.errors import AlignedNormError
from alignednorm.protocols.data import eval_loader
from alignednorm.protocols.runner import EvalStep, Evaluation, SweepRequest, load_backbone, run_eval_step

KIND = RUN_LEVEL_KIND
# Per-epoch tolerances are multiplied by the epochs trained (see the module docstring).
TOLERANCES = {"lr_rel": 1e-9, "loss_per_epoch": 5e-5, "learnable_per_epoch": 2e-5, "optimizer_rel_per_epoch": 1e-4,
              "logits_per_epoch": 1e-4, "train_accuracy": 1e-4, "accuracy": 1e-9}
_OPTIMIZERS = {"sgd": "sgd", "adam": "adam", "adamw": "adamw"}
_PRECISIONS = {"fp32": "fp32", "fp16": "fp16", "amp": "fp16"}
# Dassl's INPUT.TRANSFORMS names -> our data settings they switch on.
_TRANSFORMS = {"random_resized_crop": "random_resized_crop", "random_flip": "hflip", "normalize": None}


class FixtureError(AlignedNormError):
    """A run-level fixture asks for something this comparison cannot reproduce, or is malformed."""


def is_run_fixture(manifest: dict) -> bool:
    return str(manifest.get("kind", "")).startswith(KIND)


@dataclass
class RunPlan:
    """Our run for an official one: method, config sections, dataset, shots, classes, protocol."""

    method: str
    config: dict
    dataset: str
    shots: int
    seed: int
    subset: str
    protocol: str
    evaluations: tuple[Evaluation, ...]
    official_names: dict[str, str] = field(default_factory=dict)


def _get(cfg: dict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise FixtureError(f"manifest.json: config.{dotted} is missing")
        node = node[part]
    return node


def _require(cfg: dict, dotted: str, allowed) -> object:
    value = _get(cfg, dotted)
    if value not in allowed:
        raise FixtureError(f"manifest.json: config.{dotted} = {value!r}; run-level parity supports {list(allowed)}")
    return value


def trainer_section(cfg: dict) -> tuple[str, dict]:
    """``(section name, values)`` of the trainer's own config section (``TRAINER.<NAME>``, Dassl's spelling)."""
    name, trainers = _get(cfg, "TRAINER.NAME"), _get(cfg, "TRAINER")
    for key in (name, name.upper()):
        if isinstance(trainers.get(key), dict):
            return key, trainers[key]
    raise FixtureError(f"manifest.json: config.TRAINER has no section for trainer {name!r}")


def method_settings(cfg: dict) -> tuple[str, dict, str]:
    """Our method, its config (from the method family's own mapping) and the precision of the section's PREC."""
    key, values = trainer_section(cfg)
    module = SECTIONS.get(f"TRAINER.{key}")
    if module is None:
        raise FixtureError(f"manifest.json: config.TRAINER.{key}: no method of ours maps this trainer")
    # The step fixtures' flat view: only this trainer's section (a CoCoOp run also holds a COOP section).
    flat = {f"{part}.{k}": v for part, sub in cfg.items() if isinstance(sub, dict) and part != "TRAINER"
            for k, v in sub.items()}
    name, config, *_ = importlib.import_module(f"alignednorm.compat.{module}").method_from_manifest(
        {"config": {**{k: v for k, v in cfg.items() if k != "TRAINER"}, **flat, f"TRAINER.{key}": values}})
    precision = _PRECISIONS.get(str(values.get("PREC", "fp32")))
    if precision is None:
        raise FixtureError(f"manifest.json: config.TRAINER.{key}.PREC = {values['PREC']!r}; expected fp32, fp16 or amp")
    return name, config, precision


def train_settings(cfg: dict, precision: str) -> dict:
    """``train`` settings from Dassl's OPTIM / DATALOADER / TEST / SEED keys."""
    _require(cfg, "OPTIM.LR_SCHEDULER", ("cosine",))
    _require(cfg, "OPTIM.STAGED_LR", (False,))
    warmup = int(_get(cfg, "OPTIM.WARMUP_EPOCH"))
    if warmup > 0:
        _require(cfg, "OPTIM.WARMUP_TYPE", ("constant",))
    select = {"best_val": "best-val", "last_step": "last"}[_require(cfg, "TEST.FINAL_MODEL", ("best_val", "last_step"))]
    return {
        "optimizer": _OPTIMIZERS[_require(cfg, "OPTIM.NAME", _OPTIMIZERS)], "lr": float(_get(cfg, "OPTIM.LR")),
        "weight_decay": float(_get(cfg, "OPTIM.WEIGHT_DECAY")), "momentum": float(_get(cfg, "OPTIM.MOMENTUM")),
        "sgd_dampening": float(_get(cfg, "OPTIM.SGD_DAMPNING")), "sgd_nesterov": bool(_get(cfg, "OPTIM.SGD_NESTEROV")),
        "adam_beta1": float(_get(cfg, "OPTIM.ADAM_BETA1")), "adam_beta2": float(_get(cfg, "OPTIM.ADAM_BETA2")),
        "adam_eps": 1e-8,  # Dassl passes none: torch's default
        "epochs": int(_get(cfg, "OPTIM.MAX_EPOCH")), "warmup_epochs": max(warmup, 0),
        "warmup_lr": float(_get(cfg, "OPTIM.WARMUP_CONS_LR")),
        "batch_size": int(_get(cfg, "DATALOADER.TRAIN_X.BATCH_SIZE")),
        "seed": int(_get(cfg, "SEED")), "select": select, "precision": precision, "grad_accum": 1,
        "log_every": 1, "tensorboard": False, "wandb_project": "",
    }


def data_settings(cfg: dict, image_size: int) -> dict:
    """``data`` settings from Dassl's INPUT keys (only what our transforms can express is accepted)."""
    names = list(_get(cfg, "INPUT.TRANSFORMS"))
    unknown = [t for t in names if t not in _TRANSFORMS]
    if unknown or "normalize" not in names:
        raise FixtureError(f"manifest.json: config.INPUT.TRANSFORMS = {names}; run-level parity supports "
                           f"{list(_TRANSFORMS)} with normalize")
    if list(_get(cfg, "INPUT.SIZE")) != [image_size, image_size]:
        raise FixtureError(f"manifest.json: config.INPUT.SIZE = {_get(cfg, 'INPUT.SIZE')}; "
                           f"the CLIP's input is {image_size}")
    _require(cfg, "INPUT.INTERPOLATION", ("bicubic",))
    for key, ours in (("PIXEL_MEAN", OPENAI_DATASET_MEAN), ("PIXEL_STD", OPENAI_DATASET_STD)):
        if not np.allclose(_get(cfg, f"INPUT.{key}"), ours, atol=1e-8):
            raise FixtureError(f"manifest.json: config.INPUT.{key} = {_get(cfg, f'INPUT.{key}')}; "
                               f"ours is CLIP's {ours}")
    return {"random_resized_crop": "random_resized_crop" in names, "hflip": "random_flip" in names,
            "crop_scale": [float(v) for v in _get(cfg, "INPUT.RRCROP_SCALE")],
            "eval_batch_size": int(_get(cfg, "DATALOADER.TEST.BATCH_SIZE")), "descriptions": ""}


def plan_from_manifest(manifest: dict, image_size: int) -> RunPlan:
    """Our run (method, ``{method, train, data}``, protocol, ...) for the official run a manifest records."""
    cfg = manifest["config"]
    name, method_cfg, precision = method_settings(cfg)
    subset = _require(cfg, "DATASET.SUBSAMPLE_CLASSES", ("all", "base"))
    try:
        dataset = D.get_dataset(_get(cfg, "DATASET.NAME")).name
    except KeyError as exc:
        raise FixtureError(f"manifest.json: config.DATASET.NAME: {exc.args[0]}") from None
    if subset == "base":  # CoOp's base-to-new: base classes with the seen rule, new ones with the unseen rule
        protocol, evaluations = "base2new", (Evaluation("base", "base", "seen"), Evaluation("new", "new", "unseen"))
    else:
        protocol, evaluations = "fewshot", (Evaluation("all", "all", "seen"),)
    config = {"method": method_cfg, "train": train_settings(cfg, precision), "data": data_settings(cfg, image_size)}
    return RunPlan(name, config, dataset, int(_get(cfg, "DATASET.NUM_SHOTS")), int(_get(cfg, "SEED")), subset,
                   protocol, evaluations)


# ---------------------------------------------------------------------------------------- files
def write_dataset(fixture: Path, manifest: dict, dataset: str, root: Path) -> None:
    """The fixture's images as PNG files in the catalog layout of ``dataset``, plus its CoOp split file."""
    spec = D.get_dataset(dataset)
    if spec.reader != "split_json":
        raise FixtureError(f"manifest.json: config.DATASET.NAME {spec.dassl_name}: "
                           "only split-file datasets are supported")
    index = manifest["dataset"]["index"]
    pixels = load_file(str(fixture / "dataset_pixels.safetensors"))["pixels"]
    if pixels.shape[0] != len(index) or pixels.dtype != torch.uint8:
        raise FixtureError(f"{fixture / 'dataset_pixels.safetensors'}: pixels {tuple(pixels.shape)} {pixels.dtype}; "
                           f"expected {len(index)} uint8 images (manifest.json dataset.index)")
    image_dir = root / spec.folder / spec.image_root
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    for entry, image in zip(index, pixels):
        path = image_dir / entry["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.numpy(), mode="RGB").save(path)
        split[entry["split"]].append([entry["path"], int(entry["label"]), entry["classname"]])
    write_json(root / spec.folder / spec.split_file, split)


def write_start_values(fixture: Path, plan: RunPlan, path: Path) -> None:
    """The official ``init.*`` values under our names (``train.init_learnable``); keeps the name mapping."""
    learnable = load_file(str(fixture / "learnable.safetensors"))
    official = {k.removeprefix("init."): v for k, v in learnable.items() if k.startswith("init.")}
    if not official:
        raise FixtureError(f"{fixture / 'learnable.safetensors'}: no init.* tensors (the official start values)")
    ours = convert_official_state(official, plan.method)
    plan.official_names = {next(iter(convert_official_state({o: t}, plan.method))): o for o, t in official.items()}
    save_tensors(path, {k: v.contiguous() for k, v in ours.items()})
    plan.config["train"]["init_learnable"] = str(path)


# ---------------------------------------------------------------------------------------- recording
class EpochRecorder:
    """The trainer's epoch callback: lr, loss terms, learned tensors, optimiser state and val logits per epoch."""

    def __init__(self, official_names: dict[str, str], val_loader=None):
        self.official_names = official_names
        self.val_loader = val_loader
        self.epochs: list[dict] = []

    def __call__(self, trainer, epoch: int, terms: dict) -> None:
        method = trainer.method
        names = {id(p): n for n, p in method.named_parameters()}
        record = {"epoch": epoch + 1, "lr": trainer.optimizer.param_groups[0]["lr"], "terms": dict(terms),
                  "learnable": {self.official_names.get(k, k): v.detach().clone()
                                for k, v in method.learnable_state_dict().items()},
                  "optimizer": {}}
        for param in trainer.params:
            official = self.official_names.get(names[id(param)], names[id(param)])
            for key, value in trainer.optimizer.state.get(param, {}).items():
                record["optimizer"][f"{key}.{official}"] = torch.as_tensor(value).detach().clone().float()
        if self.val_loader is not None:
            record["val_logits"], record["val_labels"] = predict_all(method, self.val_loader, "seen")
            method.train()
        self.epochs.append(record)


@torch.no_grad()
def predict_all(method, loader, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits ``(N, C)`` and labels ``(N,)`` of ``method.predict`` over a loader (as our evaluation runs it)."""
    method.eval()
    logits, labels = [], []
    for images, y in loader:
        logits.append(method.predict(images, rule=rule))
        labels.append(y)
    return torch.cat(logits), torch.cat(labels)


def recording_predict(method, calls: list) -> None:
    """Let ``method.predict`` keep a copy of every logits tensor it returns (the final evaluations')."""
    original = method.predict

    def predict(images, rule="any"):
        logits = original(images, rule=rule)
        calls.append(logits.detach().clone())
        return logits

    method.predict = predict


# ---------------------------------------------------------------------------------------- the run
def run_ours(fixture: Path, manifest: dict, work: Path) -> dict:
    """Our run of the fixture's official one; returns what was recorded (see :func:`compare_run`)."""
    from alignednorm.backbone.clip import ClipBackbone

    clip = fixture / "clip_tiny.safetensors"
    plan = plan_from_manifest(manifest, ClipBackbone.from_file(clip).image_size)
    data_root = work / "data"
    write_dataset(fixture, manifest, plan.dataset, data_root)
    write_start_values(fixture, plan, work / "init.safetensors")
    write_json(work / "config.json", plan.config)  # JSON is YAML: the user config merged over the presets
    spec = D.get_dataset(plan.dataset)
    request = SweepRequest(method=plan.method, data_root=str(data_root), clip=str(clip), output=str(work / "runs"),
                           suite=spec.suites[0] if spec.suites else "paper", datasets=(plan.dataset,),
                           seeds=(plan.seed,), shots=(plan.shots,), config_file=str(work / "config.json"),
                           progress=False)
    run_dir = request.run_dir(plan.protocol, plan.dataset, plan.shots, plan.seed)
    step = EvalStep(plan.dataset, str(run_dir / "eval" / plan.dataset), plan.evaluations, protocol=plan.protocol)
    job = request.job(plan.protocol, plan.dataset, plan.shots, plan.seed, plan.subset, [step])
    backbone = load_backbone(job)
    full = D.few_shot_splits(D.load_splits(plan.dataset, str(data_root)), plan.shots, plan.seed, job.cache_dir)
    val = D.subsample_classes(full, plan.subset).val
    train_cfg = plan.config["train"]
    val_loader = eval_loader(val, backbone, build(plan.method, OmegaConf.create(plan.config))[2]) \
        if train_cfg["select"] == "best-val" else None
    recorder = EpochRecorder(plan.official_names, val_loader)
    run_spec = job.run_spec()
    run_spec.epoch_callback = recorder
    train_metrics = execute(run_spec, job.training_data, backbone=backbone, force=True)  # run_job's, with the recorder
    trained = load_run(job.train_dir, backbone=backbone)
    calls: list[torch.Tensor] = []
    recording_predict(trained.method, calls)
    metrics = run_eval_step(job, step, trained)
    finals, labels = {}, {}
    for ev in plan.evaluations:
        # evaluated in order, batch after batch
        labels[ev.name] = torch.tensor([it.label for it in D.subsample_classes(full, ev.classes).test])
        rows, parts = metrics["eval"][ev.name]["num_samples"], []
        while sum(len(x) for x in parts) < rows and calls:
            parts.append(calls.pop(0))
        finals[ev.name] = torch.cat(parts) if parts else torch.empty(0)
    return {"plan": plan, "fewshot": full, "data_root": data_root, "epochs": recorder.epochs,
            "train": train_metrics["train"], "eval": metrics["eval"], "final_logits": finals, "final_labels": labels,
            "log": [json.loads(line) for line in (Path(job.train_dir) / "log.jsonl").read_text().splitlines()]}


# ---------------------------------------------------------------------------------------- comparison
def _tensor(ours: torch.Tensor, ref: torch.Tensor, limit: float) -> dict:
    ours = ours.detach().to(torch.float64).reshape(ref.shape) if ours.numel() == ref.numel() else ours
    if ours.shape != ref.shape:
        return {"ok": False, "max_abs_diff": float("inf"), "error": f"shape {tuple(ours.shape)} vs {tuple(ref.shape)}"}
    diff = float((ours - ref.to(torch.float64)).abs().max()) if ref.numel() else 0.0
    return {"max_abs_diff": diff, "tolerance": limit, "ok": diff <= limit}


def _exact(ours, official, limit: float = 0.0) -> dict:
    if isinstance(ours, (int, float)) and isinstance(official, (int, float)):
        diff = abs(float(ours) - float(official))
    else:
        diff = 0.0 if ours == official else 1.0
    return {"ours": ours, "official": official, "max_abs_diff": diff, "tolerance": limit, "ok": diff <= limit}


def _items(items, root: str) -> list[list]:
    """Items as the official split lists them: ``[path relative to the image folder, label, class name]``."""
    return [[Path(it.impath).relative_to(root).as_posix(), it.label, it.classname] for it in items]


def compare_fewshot(ours: dict, manifest: dict) -> dict:
    chosen = manifest.get("fewshot_split_chosen_by_dassl") or {}
    full, spec = ours["fewshot"], D.get_dataset(ours["plan"].dataset)
    root = str(Path(ours["data_root"]) / spec.folder / spec.image_root)
    return {f"fewshot.{split}": _exact(_items(getattr(full, split), root), [list(e) for e in entries])
            for split, entries in chosen.items()}


def compare_epochs(ours: dict, manifest: dict, learnable: dict, outputs: dict, tol: dict) -> tuple[dict, list]:
    """Per epoch: lr, loss, train accuracy, learned tensors, optimiser state, validation logits."""
    results, summary = {}, []
    for rec in manifest["per_epoch"]:
        if rec.get("num_batches", 1) != 1:
            raise FixtureError(f"manifest.json: per_epoch epoch {rec['epoch']} has {rec['num_batches']} batches; "
                               "run-level parity needs one batch per epoch (Dassl's sample order is not reproduced)")
        k = int(rec["epoch"])
        mine = next((e for e in ours["epochs"] if e["epoch"] == k), None)
        if mine is None:
            results[f"epoch{k:02d}"] = {"ok": False, "max_abs_diff": float("inf"), "error": "epoch not run"}
            continue
        lr_limit = tol["lr_rel"] * max(abs(rec["lr_used"]), 1e-12)
        res = {f"lr.epoch{k:02d}": _exact(mine["lr"], rec["lr_used"], lr_limit),
               f"loss.epoch{k:02d}": _exact(mine["terms"]["loss"], rec["loss"], tol["loss_per_epoch"] * k)}
        if "acc" in rec and "acc" in mine["terms"]:
            res[f"train_acc.epoch{k:02d}"] = _exact(mine["terms"]["acc"], rec["acc"], tol["train_accuracy"])
        prefix = f"epoch{k}."
        for key, ref in learnable.items():
            if not key.startswith(prefix):
                continue
            name = key.removeprefix(prefix)
            if name in mine["learnable"]:
                res[f"learnable.epoch{k:02d}.{name}"] = _tensor(mine["learnable"][name], ref,
                                                                tol["learnable_per_epoch"] * k)
            else:
                scale = float(ref.abs().max()) if ref.numel() else 0.0
                got = mine["optimizer"].get(name)
                res[f"optimizer.epoch{k:02d}.{name}"] = _tensor(got, ref, tol["optimizer_rel_per_epoch"] * k * scale
                                                                + 1e-12) if got is not None \
                    else {"ok": False, "max_abs_diff": float("inf"), "error": "not in our optimiser state"}
        if f"epoch{k}.val.logits" in outputs:
            res[f"val.epoch{k:02d}.logits"] = _tensor(mine["val_logits"], outputs[f"epoch{k}.val.logits"],
                                                      tol["logits_per_epoch"] * k)
            res[f"val.epoch{k:02d}.labels"] = _tensor(mine["val_labels"], outputs[f"epoch{k}.val.labels"], 0.0)
        results.update(res)
        summary.append(_epoch_summary(k, res))
    return results, summary


def _epoch_summary(epoch: int, res: dict) -> dict:
    def worst(group: str) -> float | None:
        return max((r["max_abs_diff"] for key, r in res.items() if key.startswith(group)), default=None)

    return {"epoch": epoch, "learnable_max_abs_diff": worst("learnable."), "loss_abs_diff": worst("loss."),
            "optimizer_max_abs_diff": worst("optimizer."), "val_logits_max_abs_diff": worst("val.")}


def official_selected_epoch(manifest: dict) -> int:
    """The epoch whose values the official run tested: its best-val reload, else (last_step) the last one."""
    loads = [b for b in manifest.get("best_checkpoint_loads", []) if b.get("phase") == "train"]
    return int(loads[-1]["epoch"]) if loads else int(manifest["config"]["OPTIM"]["MAX_EPOCH"])


def compare_selection(ours: dict, manifest: dict) -> dict:
    """Validation accuracies (the trainer's own, from ``log.jsonl``) and the selected epoch, exactly."""
    results = {}
    val_log = {r["epoch"]: r["val_accuracy"] for r in ours["log"] if "val_accuracy" in r}
    for ev in manifest.get("evaluations", []):
        if ev.get("phase") == "train" and ev.get("split") == "val":
            k = int(ev["after_epoch"])
            results[f"val.epoch{k:02d}.accuracy"] = (
                _exact(val_log.get(k), ev["results"]["accuracy"], TOLERANCES["accuracy"])
                if k in val_log else {"ok": False, "max_abs_diff": float("inf"), "error": "no validation logged"})
    last = int(manifest["config"]["OPTIM"]["MAX_EPOCH"])
    results["selected_epoch"] = _exact(ours["train"].get("selected_epoch", last), official_selected_epoch(manifest))
    return results


def compare_finals(ours: dict, manifest: dict, outputs: dict, tol: dict) -> dict:
    """Final test (first evaluation: base or all classes) and, for base-to-new, the new classes.

    The tested values are those of the official selected epoch, so the logits get its epochs' tolerance.
    """
    results, epochs = {}, official_selected_epoch(manifest)
    names = [ev.name for ev in ours["plan"].evaluations]
    sections = [("final", manifest.get("final_test"), names[0])]
    if manifest.get("new_class_eval"):
        sections.append(("new.final", manifest["new_class_eval"], "new"))
    for prefix, official, name in sections:
        if official is None or name not in ours["eval"]:
            continue
        results[f"{prefix}.test.accuracy"] = _exact(ours["eval"][name]["accuracy"], official["results"]["accuracy"],
                                                    TOLERANCES["accuracy"])
        if f"{prefix}.test.logits" in outputs:
            results[f"{prefix}.test.logits"] = _tensor(ours["final_logits"][name], outputs[f"{prefix}.test.logits"],
                                                       tol["logits_per_epoch"] * epochs)
            if f"{prefix}.test.labels" in outputs:
                results[f"{prefix}.test.labels"] = _tensor(ours["final_labels"][name], outputs[f"{prefix}.test.labels"],
                                                           0.0)
    return results


def compare_run(fixture: Path, manifest: dict, ours: dict) -> tuple[dict, list]:
    """Every comparison of the report (name -> result) and the per-epoch summary."""
    tol = {**TOLERANCES, **{k: float(v) for k, v in manifest.get("tolerances", {}).items() if k in TOLERANCES}}
    learnable = load_file(str(fixture / "learnable.safetensors"))
    outputs = load_file(str(fixture / "outputs.safetensors"))
    results = compare_fewshot(ours, manifest)
    per_epoch, summary = compare_epochs(ours, manifest, learnable, outputs, tol)
    results.update(per_epoch)
    results.update(compare_selection(ours, manifest))
    results.update(compare_finals(ours, manifest, outputs, tol))
    return results, summary


FILES = ("manifest.json", "clip_tiny.safetensors", "dataset_pixels.safetensors", "learnable.safetensors",
         "outputs.safetensors")
SECTIONS_NEEDED = ("config", "dataset", "per_epoch")


def read_fixture(fixture: Path) -> dict:
    """The manifest of a run-level fixture folder, after checking that its files and sections exist."""
    for name in FILES:
        if not (fixture / name).is_file():
            raise FixtureError(f"{fixture / name} is missing (a run-level fixture holds {', '.join(FILES)})")
    try:
        manifest = json.loads((fixture / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FixtureError(f"{fixture / 'manifest.json'}: unreadable ({exc})") from None
    missing = [key for key in SECTIONS_NEEDED if not isinstance(manifest.get(key), (dict, list))]
    if missing or "index" not in manifest["dataset"]:
        raise FixtureError(f"{fixture / 'manifest.json'}: no {(missing or ['dataset.index'])[0]!r} section")
    return manifest


def run_parity(fixture_dir: str | Path, threads: int | None = None) -> dict:
    """Reproduce a run-level fixture's official run with ours and compare; the report's ``ok`` says all fit."""
    fixture = Path(fixture_dir)
    manifest = read_fixture(fixture)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads or int(manifest.get("produced_by", {}).get("threads", 2)))
    try:
        with tempfile.TemporaryDirectory(prefix="parity-run-") as work:
            ours = run_ours(fixture, manifest, Path(work))
            results, summary = compare_run(fixture, manifest, ours)
    finally:
        torch.set_num_threads(saved)
    plan = ours["plan"]
    report = build_report(fixture, plan.method, plan.config, results)
    report["config"]["train"].pop("init_learnable", None)  # a temporary file, gone by now
    report.update(per_epoch=summary, selected_epoch=results["selected_epoch"]["ours"],
                  accuracies={k.removesuffix(".accuracy"): {"ours": r["ours"], "official": r["official"]}
                              for k, r in results.items() if k.endswith("test.accuracy")})
    return report
