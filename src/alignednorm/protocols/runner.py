"""Sweeps as lists of jobs: each job trains one prompt, then evaluates it on one or more test sets.

A protocol module expands a :class:`SweepRequest` into :class:`Job` objects (plain, picklable
dataclasses) and :func:`run_job` runs one of them: :func:`alignednorm.engine.run.execute` trains
(or skips a finished training run), then every :class:`EvalStep` loads ``learnable.safetensors``
from that training run and evaluates it into a folder of its own. Evaluating another target never
re-trains, and the cross-dataset and domain-generalisation protocols share one training run.

Layout under ``output`` (``<variant>`` is ``default``, the ``--tag``, or ``custom-<hash>`` of the
user's config file and ``--set`` overrides, so that two configs never share a folder)::

    <protocol>/<dataset>/shots<K>/<method>/<variant>/seed<S>/   training run (engine.run layout)
        eval/<target>/metrics.json                              one file per evaluated dataset

where ``<protocol>`` is ``base2new``, ``fewshot`` or ``crossdataset`` (the latter also holds the
domain-generalisation evaluations). Each evaluation's ``metrics.json`` names its protocol, method,
variant, suite, training dataset, target, shots and seed, so reports need nothing else.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf

from alignednorm import data as D
from alignednorm.backbone.clip import ClipBackbone
from alignednorm.config import build, preset_path, resolve_config, to_yaml
from alignednorm.data.catalog import Suite, get_suite
from alignednorm.engine.environment import resolve_device
from alignednorm.engine.io import clean_stale_temp_files, write_json, write_text
from alignednorm.engine.run import (
    COST_KEYS,
    NON_RESULT_KEYS,
    RunLock,
    RunSpec,
    TrainedRun,
    check_identity,
    execute,
    identity_differences,
    load_run,
    run_identity,
)
from alignednorm.errors import AlignedNormError, ConfigError
from alignednorm.methods import RULES, check_config_keys

from .data import evaluate_split, load_split, training_data

log = logging.getLogger(__name__)

PAPER_SEEDS = (1, 2, 3)
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass(frozen=True)
class Evaluation:
    """One accuracy measured on a target's test split.

    Attributes:
        name: key in ``metrics.json`` (``base``, ``new``, ``all``).
        classes: which classes of the test split are kept and classified among: ``base``, ``new``, ``all``.
        rule: the inference rule passed to ``method.predict``: ``seen`` (the classes the prompt was
            trained on), ``unseen`` or ``any``. MMRL++'s decoupled rule reads it (seen: fused logits,
            otherwise the class branch); unified methods ignore it.
    """

    name: str
    classes: str
    rule: str

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"Evaluation.rule must be one of {RULES}, got {self.rule!r}")


@dataclass(frozen=True)
class EvalStep:
    """Evaluations of a trained prompt on one target dataset, written to ``run_dir/metrics.json``.

    Attributes:
        target: catalog name of the dataset evaluated.
        run_dir: the evaluation folder (``<training run>/eval/<target>``).
        evaluations: what is measured there.
        method_overrides: test-time method settings for this target (e.g. MMRL++'s official
            per-target ``prc_beta`` in cross-dataset evaluation), validated against the method's
            config; empty keeps the trained values.
        protocol: the protocol that asked for this evaluation.
    """

    target: str
    run_dir: str
    evaluations: tuple[Evaluation, ...]
    method_overrides: dict = field(default_factory=dict, hash=False)
    protocol: str = ""

    def settings(self) -> dict:
        """What determines this step's numbers besides the trained prompt."""
        return {"target": self.target, "evaluations": [list(vars(e).values()) for e in self.evaluations],
                "method_overrides": dict(self.method_overrides)}


@dataclass
class Job:
    """One training run and the evaluations of its prompt, run in order by :func:`run_job`."""

    protocol: str
    method: str
    variant: str
    suite: str
    dataset: str
    seed: int
    shots: int
    train_subset: str
    train_dir: str
    config: dict
    data_root: str
    clip: str
    evals: list[EvalStep] = field(default_factory=list)
    clip_model: str | None = None
    cache_dir: str | None = None
    device: str = "auto"
    progress: bool = True
    resume: bool = True
    command: str | None = None

    @property
    def feature_cache_dir(self) -> str | None:
        """Frozen image features shared by the runs of one output folder (beside the few-shot cache)."""
        return None if self.cache_dir is None else str(Path(self.cache_dir).with_name(".feature-cache"))

    @property
    def name(self) -> str:
        return f"{self.protocol}/{self.dataset}/shots{self.shots}/{self.method}/{self.variant}/seed{self.seed}"

    def run_spec(self) -> RunSpec:
        return RunSpec(method=self.method, dataset=self.dataset, data_root=self.data_root, clip=self.clip,
                       output=self.train_dir, config=OmegaConf.create(self.config), shots=self.shots,
                       train_subset=self.train_subset, clip_model=self.clip_model,
                       progress=self.progress, command=self.command,
                       epoch_callback=EpochTest(self) if self.config["train"].get("eval_test_every_epoch") else None)

    def training_data(self, backbone: ClipBackbone):
        """What the run trains on (:func:`.data.training_data`): the few-shot, base/new split of the dataset."""
        cfg = OmegaConf.create(self.config)
        data_cfg = build(self.method, cfg)[2]
        cache = self.cache_dir or str(Path(self.train_dir).resolve().parent / ".fewshot-cache")
        split = load_split(self.dataset, self.data_root, self.shots, int(cfg.train.seed), self.train_subset, cache)
        return training_data(split, self.dataset, backbone, data_cfg)


class EpochTest:
    """``epoch_callback`` of ``train.eval_test_every_epoch``: the training classes' test accuracy after every epoch.

    Logged as ``{"epoch": E, "test_accuracy": %}`` in the run's ``log.jsonl`` (and TensorBoard / wandb) through
    the trainer's tracker, for Nemesis's Fig. 3 (test accuracy beside the prompt norms over epochs). The test
    split is the one the job's final evaluation of its own dataset reads (the ``seen`` rule, its classes).
    """

    def __init__(self, job: Job):
        self.job = job
        self.split: D.DatasetSplits | None = None

    def __call__(self, trainer, epoch: int, terms: dict) -> None:
        job, cfg = self.job, OmegaConf.create(self.job.config)
        if self.split is None:
            cache = job.cache_dir or str(Path(job.train_dir).resolve().parent / ".fewshot-cache")
            self.split = load_split(job.dataset, job.data_root, job.shots, int(cfg.train.seed), job.train_subset, cache)
        with torch.no_grad():
            result = evaluate_split(trainer.method, self.split, job.dataset, "seen", build(job.method, cfg)[2],
                                    progress=False, feature_cache=job.feature_cache_dir)
        trainer.method.train()
        trainer.tracker.log({"epoch": epoch + 1, "test_accuracy": result["accuracy"]}, trainer.global_step, "test")


def setting_only(item: str) -> bool:
    """Whether a ``--set key=value`` changes how runs are carried out, never their numbers (``NON_RESULT_KEYS``)."""
    section, _, name = item.partition("=")[0].strip().partition(".")
    return name in NON_RESULT_KEYS.get(section, ())


def variant_name(tag: str | None, config_file: str | None, sets: tuple[str, ...] | list[str]) -> str:
    """``tag`` when given, ``default`` without user config, else ``custom-<8 hex>`` of the user's config.

    ``--set`` items of settings that never change a number (``data.num_workers``, ``train.log_every``, ...)
    do not name a variant: such a sweep reuses and extends the runs without them.
    """
    if config_file is not None and not Path(config_file).is_file():
        raise ConfigError(f"--config {config_file}: no such file (expected a YAML file of method/train/data settings)")
    if tag is not None:
        if not _TAG.match(tag):
            raise ConfigError(f"--tag {tag!r}: use letters, digits and . _ + - (it names a folder)")
        return tag
    sets = [item for item in sets if not setting_only(item)]  # workers, logging: the same runs, the same folder
    if config_file is None and not sets:
        return "default"
    text = Path(config_file).read_text() if config_file is not None else ""
    digest = hashlib.sha256(json.dumps({"config": text, "sets": list(sets)}).encode()).hexdigest()
    return f"custom-{digest[:8]}"


@dataclass
class SweepRequest:
    """What the user asked for; a protocol turns it into jobs.

    Attributes:
        method: registered method name.
        data_root: the CoOp-layout data folder.
        clip: CLIP checkpoint file; ``clip_model`` its open_clip name when needed.
        output: the runs folder.
        suite: benchmark suite naming the protocol's datasets (``paper``, ``mini``, ...).
        datasets: restrict to these datasets (base-to-new, few-shot: trained; cross-dataset and
            domain generalisation: targets); None uses the suite's.
        seeds: training seeds.
        shots: K values; None uses the protocol's default.
        config_file: the user's YAML merged over the presets; ``sets`` the ``key=value`` overrides.
        tag: name of this config variant (the run folder level below the method).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda[:i]``.
    """

    method: str
    data_root: str
    clip: str
    output: str
    suite: str = "paper"
    datasets: tuple[str, ...] | None = None
    seeds: tuple[int, ...] = PAPER_SEEDS
    shots: tuple[int, ...] | None = None
    clip_model: str | None = None
    config_file: str | None = None
    sets: tuple[str, ...] = ()
    tag: str | None = None
    device: str = "auto"
    progress: bool = True
    _configs: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def variant(self) -> str:
        return variant_name(self.tag, self.config_file, self.sets)

    def get_suite(self) -> Suite:
        try:
            return get_suite(self.suite)
        except KeyError as exc:
            raise ConfigError(str(exc.args[0])) from None

    def run_dir(self, protocol: str, dataset: str, shots: int, seed: int) -> Path:
        return Path(self.output) / protocol / dataset / f"shots{shots}" / self.method / self.variant / f"seed{seed}"

    def job(self, protocol: str, dataset: str, shots: int, seed: int, train_subset: str,
            evals: list[EvalStep], config_protocol: str | None = None) -> Job:
        """A job training ``dataset`` with the presets of ``config_protocol`` (default ``protocol``)."""
        cfg = self.config(config_protocol or protocol, dataset, seed, shots)
        return Job(protocol=protocol, method=self.method, variant=self.variant, suite=self.suite, dataset=dataset,
                   seed=seed, shots=shots, train_subset=train_subset,
                   train_dir=str(self.run_dir(config_protocol or protocol, dataset, shots, seed)),
                   config=cfg, data_root=self.data_root, clip=self.clip,
                   evals=evals, clip_model=self.clip_model, cache_dir=str(Path(self.output) / ".fewshot-cache"),
                   device=self.device, progress=self.progress)

    def config(self, protocol: str, dataset: str, seed: int, shots: int | None = None) -> dict:
        """The resolved config of one run as a plain dict; ``train.seed`` is ``seed`` unless ``--set`` fixes it."""
        key = (protocol, dataset, shots)
        if key not in self._configs:  # resolving is the slow part of expanding 165 few-shot jobs
            cfg = resolve_config(self.method, protocol, dataset, self.config_file, list(self.sets), shots)
            self._configs[key] = OmegaConf.to_container(cfg, resolve=True)
        cfg = copy.deepcopy(self._configs[key])
        if not any(s.replace(" ", "").startswith("train.seed=") for s in self.sets):
            cfg["train"]["seed"] = seed
        return cfg


def canonical_datasets(names) -> tuple[str, ...]:
    """Catalog names of ``names`` (Dassl class names accepted), failing with the known names."""
    out = []
    for name in names:
        try:
            out.append(D.get_dataset(name).name)
        except KeyError as exc:
            raise ConfigError(str(exc.args[0])) from None
    return tuple(out)


def target_overrides(method: str, protocol: str) -> dict[str, dict]:
    """The preset's test-time method settings per target (``protocols.<protocol>.targets``), checked."""
    path = preset_path(method)
    if not path.is_file():
        return {}
    sections = OmegaConf.to_container(OmegaConf.load(path)).get("protocols", {})
    for name in (protocol, "crossdataset"):
        targets = (sections.get(name) or {}).get("targets")
        if targets:
            for target, values in targets.items():
                if not isinstance(values, dict):
                    raise ConfigError(f"{path} protocols.{name}.targets.{target}: expected a mapping of method "
                                      f"settings, e.g. {{prc_beta: 0.9}}; got {values!r}")
                check_config_keys(method, values)
            return {str(k): dict(v) for k, v in targets.items()}
    return {}


# ---------------------------------------------------------------------------------------- running
def load_backbone(job: Job) -> ClipBackbone:
    return ClipBackbone.from_file(job.clip, job.clip_model).to(resolve_device(job.device))


def run_job(job: Job, force: bool = False, backbone: ClipBackbone | None = None) -> dict[str, dict]:
    """Train (unless finished with the same settings; resuming an interrupted run), then evaluate.

    Args:
        job: the job.
        force: re-train and re-evaluate even when ``metrics.json`` files exist.
        backbone: a loaded backbone to reuse (it must be ``job.clip``); loaded when None.

    Returns:
        ``{target: metrics}`` for every evaluation of the job, read back when it was skipped.
    """
    spec = job.run_spec()
    trained = (Path(job.train_dir) / "metrics.json").is_file() and not force
    if trained:  # a finished folder with other settings is refused before anything is reused
        check_identity(Path(job.train_dir), run_identity(spec), "training run")
    pending = [s for s in job.evals if not trained or not _step_done(s)]
    results = {s.target: _read_metrics(s.run_dir) for s in job.evals if s not in pending}
    if trained and not pending:
        log.info("skipping %s: training and evaluations are finished (use --force to re-run)", job.name)
        return results
    backbone = backbone or load_backbone(job)
    execute(spec, job.training_data, backbone=backbone, force=force, resume=job.resume)
    if pending:
        trained_run = load_run(job.train_dir, backbone=backbone)
        for step in pending:
            results[step.target] = run_eval_step(job, step, trained_run)
    return results


def _step_done(step: EvalStep) -> bool:
    """Whether ``step`` has its ``metrics.json``, measured with the same settings (else an error)."""
    path = Path(step.run_dir) / "metrics.json"
    if not path.is_file():
        return False
    recorded = _read_metrics(step.run_dir).get("settings")
    diff = identity_differences(recorded or {}, step.settings())
    if diff:
        raise AlignedNormError(f"{step.run_dir} holds an evaluation with other settings ({'; '.join(diff[:4])}); "
                               "pass --force to re-run it")
    return True


def is_finished(job: Job) -> bool:
    """Whether the job's training run and every evaluation are finished *with the job's settings*.

    A folder finished with other settings is not: :func:`run_job` then stops with the keys that differ.
    """
    if not all((Path(d) / "metrics.json").is_file() for d in [job.train_dir, *(s.run_dir for s in job.evals)]):
        return False
    try:
        check_identity(Path(job.train_dir), run_identity(job.run_spec()), "training run")
        return all(_step_done(step) for step in job.evals)
    except AlignedNormError:
        return False


def run_eval_step(job: Job, step: EvalStep, trained: TrainedRun) -> dict:
    """Evaluate the trained method on ``step.target``; write the step's ``config.yaml`` and ``metrics.json``."""
    run_dir, method = Path(step.run_dir), trained.method
    with RunLock(run_dir), method.overridden(step.method_overrides):
        clean_stale_temp_files(run_dir)
        splits = D.load_splits(step.target, job.data_root)
        results = {ev.name: _evaluate(job, trained, step.target, splits, ev) for ev in step.evaluations}
        cost = {name: {k: r.pop(k) for k in COST_KEYS if k in r} for name, r in results.items()}
        cfg = trained.config.copy()
        for key, value in step.method_overrides.items():
            cfg.method[key] = value
        write_text(run_dir / "config.yaml", to_yaml(cfg))
        metrics = {
            "protocol": step.protocol or job.protocol, "method": job.method, "variant": job.variant,
            "suite": job.suite, "dataset": job.dataset, "target": step.target, "shots": job.shots, "seed": job.seed,
            "method_overrides": dict(step.method_overrides), "settings": step.settings(),
            "description_fallback": bool(trained.info.get("description_fallback")),
            "train_run": str(Path(job.train_dir).resolve()), "eval": results, "cost": cost,
        }
        write_json(run_dir / "metrics.json", metrics)
    return metrics


def _evaluate(job: Job, trained: TrainedRun, target: str, splits: D.DatasetSplits, ev: Evaluation) -> dict:
    split = D.subsample_classes(splits, ev.classes)
    reason = trained.method.serves(split.classnames, ev.rule) if trained.method.traits.class_specific else None
    if reason:  # e.g. a linear probe or a class-specific context asked about new classes: no number, a reason
        log.warning("%s %s %s: not applicable: %s", job.name, target, ev.classes, reason)
        return {"accuracy": None, "not_applicable": reason, "dataset": target, "classes": ev.classes, "rule": ev.rule}
    result = evaluate_split(trained.method, split, target, ev.rule, trained.data_config, job.progress,
                            feature_cache=job.feature_cache_dir)
    result.update(dataset=target, classes=ev.classes, rule=ev.rule)
    log.info("%s %s %s/%s: %.2f%%", job.name, target, ev.classes, ev.rule, result["accuracy"])
    return result


def _read_metrics(run_dir: str) -> dict:
    path = Path(run_dir) / "metrics.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AlignedNormError(f"{path}: unreadable ({exc}); delete it or pass --force") from exc


def per_dataset_jobs(request: SweepRequest, protocol: str, default_shots: tuple[int, ...],
                     evaluations: tuple[Evaluation, ...], train_subset: str) -> list[Job]:
    """One job per (dataset, shots, seed) that trains on ``train_subset`` and evaluates on itself."""
    datasets = canonical_datasets(request.datasets or request.get_suite().base2new)
    jobs = []
    for dataset in datasets:
        for shots in request.shots or default_shots:
            for seed in request.seeds:
                run_dir = request.run_dir(protocol, dataset, shots, seed)
                step = EvalStep(dataset, str(run_dir / "eval" / dataset), evaluations, protocol=protocol)
                jobs.append(request.job(protocol, dataset, shots, seed, train_subset, [step]))
    return jobs
