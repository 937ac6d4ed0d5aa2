"""Run configuration: dataclass schemas merged with OmegaConf in a documented order.

Precedence, later wins: schema defaults ← method preset (``configs/methods/<method>.yaml``) ←
the preset's protocol section ← its ``shots.<K>`` section (epochs per shot count) ← the dataset's
suite file (``configs/suites/<suite>.yaml``: ``train`` and ``data`` shared by every method, then its
``protocols.<protocol>``, then that protocol's ``datasets.<dataset>``) ← the preset's section for
that suite (``suites.mini``, then ``suites.mini.protocols.<protocol>``) ← its per-dataset section
for that protocol ← the user's YAML ← ``--set key=value`` options. Unknown keys and wrong types
raise :class:`ConfigError` naming the key, the file it came from and the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from alignednorm.errors import ConfigError
from alignednorm.methods import get_method_class

PROTOCOLS = ("base2new", "crossdataset", "domaingen", "fewshot")
# What a run may be resolved for: a protocol's presets, or a plain evaluation (no protocol section).
RUN_KINDS = (*PROTOCOLS, "eval")


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SELECTIONS = ("last", "best-val")
TIE_RULES = ("first", "last")
OPTIMIZERS = ("adamw", "adam", "sgd")


@dataclass
class TrainConfig:
    """Optimisation settings (Dassl's names in brackets).

    Attributes:
        epochs: training epochs (OPTIM.MAX_EPOCH).
        batch_size: images per optimiser step, before accumulation (DATALOADER.TRAIN_X.BATCH_SIZE).
        optimizer: ``adamw``, ``adam`` or ``sgd`` (OPTIM.NAME).
        lr: peak learning rate (OPTIM.LR).
        weight_decay: weight decay (OPTIM.WEIGHT_DECAY; Dassl's default 5e-4); decoupled for AdamW,
            an L2 term in the gradient for Adam and SGD, as torch (and Dassl) apply them.
        momentum: SGD momentum (OPTIM.MOMENTUM).
        sgd_dampening: SGD dampening (OPTIM.SGD_DAMPNING).
        sgd_nesterov: Nesterov momentum (OPTIM.SGD_NESTEROV).
        adam_beta1, adam_beta2: Adam/AdamW betas (OPTIM.ADAM_BETA1/2).
        adam_eps: Adam/AdamW epsilon (torch's default 1e-8; some official codes set their own).
        warmup_epochs: epochs at the constant ``warmup_lr`` before the cosine (OPTIM.WARMUP_EPOCH).
        warmup_lr: the constant warm-up learning rate (OPTIM.WARMUP_CONS_LR).
        precision: ``auto`` (fp16 autocast with loss scaling on CUDA, as the official ``PREC: amp``;
            fp32 elsewhere), ``fp32``, ``bf16`` (autocast) or ``fp16`` (autocast + loss scaling).
        grad_accum: micro-batches accumulated per optimiser step.
        seed: seeds sampling order, augmentation and initialisation.
        log_every: steps between logged training steps (``log.jsonl``, TensorBoard, wandb).
        select: which learned values the run keeps: ``last`` (after the final epoch) or ``best-val``
            (the epoch with the best accuracy on the validation split, HiCroPL's choice).
        select_ties: which of several epochs with the best validation accuracy ``best-val`` keeps:
            ``first`` (Dassl's strict ``>``, the CoOp, MaPLe, PromptSRC and MMRL runs) or ``last``
            (``>=``, HiCroPL's bundled Dassl, ``dassl/engine/trainer.py:432``).
        tensorboard: write TensorBoard event files under ``<run>/tensorboard``.
        wandb_project: also log to this Weights & Biases project when set (needs ``wandb``).
        compile: a ``torch.compile`` backend (``inductor``, ``aot_eager``, ...) for the method's
            forward, or empty (off, the default). Optional speed on GPUs, never needed; numbers stay
            those of the eager path up to float rounding. The first steps pay the compile time.
        text_chunk: encode at most this many class prompts at once, each chunk under activation
            checkpointing (0: all at once). For label spaces that do not fit in memory (1,000
            classes); features and gradients stay those of one pass, the step gets slower.
        init_learnable: a ``.safetensors`` file of start values for every learned tensor (our names,
            as a run's ``learnable.safetensors``), loaded before the first epoch in place of the
            method's random init; empty (the default) keeps the random init. Reproduces a run whose
            random draws ours cannot (e.g. an official run's initial prompt), or warm-starts one.
        eval_test_every_epoch: the protocols also evaluate the training classes' test split after every
            epoch and log ``test_accuracy`` in ``log.jsonl`` (Nemesis's Fig. 3 pairs it with the prompt
            norms). Costs one test pass per epoch; the trained prompt and its final numbers are unchanged.
    """

    epochs: int = 5
    batch_size: int = 4
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 5e-4
    momentum: float = 0.9
    sgd_dampening: float = 0.0
    sgd_nesterov: bool = False
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    precision: str = "auto"
    grad_accum: int = 1
    seed: int = 1
    log_every: int = 10
    select: str = "last"
    select_ties: str = "first"
    tensorboard: bool = True
    wandb_project: str = ""
    compile: str = ""
    text_chunk: int = 0
    init_learnable: str = ""
    eval_test_every_epoch: bool = False

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"train.{f.name} = {value!r}; expected a finite number")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision = {self.precision!r}; expected one of {PRECISIONS}")
        if self.select not in SELECTIONS:
            raise ConfigError(f"train.select = {self.select!r}; expected one of {SELECTIONS}")
        if self.select_ties not in TIE_RULES:
            raise ConfigError(f"train.select_ties = {self.select_ties!r}; expected one of {TIE_RULES}")
        if self.compile and self.compile not in compile_backends():
            raise ConfigError(f"train.compile = {self.compile!r}; expected '' (off) or a torch.compile backend: "
                              f"{', '.join(compile_backends())}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"train.optimizer = {self.optimizer!r}; expected one of {OPTIMIZERS}")
        for name in ("momentum", "sgd_dampening", "adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0 + (name == "sgd_dampening"):
                raise ConfigError(f"train.{name} = {getattr(self, name)!r}; expected a value in [0, 1)")
        if self.adam_eps <= 0:
            raise ConfigError(f"train.adam_eps = {self.adam_eps!r}; expected a value > 0")
        for name in ("epochs", "batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} = {getattr(self, name)!r}; expected an integer >= 1")
        for name in ("lr", "weight_decay", "warmup_lr", "warmup_epochs", "text_chunk"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} = {getattr(self, name)!r}; expected a value >= 0")


def compile_backends() -> list[str]:
    """The ``torch.compile`` backends this torch offers (``inductor``, ``aot_eager``, ``eager``, ...)."""
    return sorted({*torch._dynamo.list_backends(), "eager"})


@dataclass
class DataConfig:
    """How images are read and augmented.

    Attributes:
        crop_scale: RandomResizedCrop scale range for training images.
        hflip: random horizontal flips of training images.
        random_resized_crop: random-resized crops of training images (Dassl's ``random_resized_crop``);
            false resizes them to the input size instead, so with ``hflip: false`` training images
            are not augmented (Dassl's ``INPUT.TRANSFORMS ['normalize']``).
        eval_batch_size: images per evaluation batch (Dassl's DATALOADER.TEST.BATCH_SIZE; presets set
            the official value).
        num_workers: loader worker processes for training and evaluation (DATALOADER.NUM_WORKERS);
            -1 (the default) picks them from the device and the free CPUs (``engine.batches.default_workers``:
            8 on a GPU as the official configs, none on a 2-core CPU). Numbers do not depend on it.
        decoded_cache_mb: training images are decoded once and kept in memory when they fit in this
            many MB (few-shot sets do); the augmentation then works on the kept pixels, with the same
            numbers. 0 reads them from disk every epoch.
        skip_corrupt: skip unreadable images (and count them) instead of failing.
        descriptions: CuPL-style class descriptions (``{"class": ["sentence", ...]}``): a JSON file,
            or a folder holding ``<dataset>.json`` per dataset; "" for none (methods that use
            descriptions then fall back to the templates, and the run records it).
    """

    crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])
    hflip: bool = True
    random_resized_crop: bool = True
    eval_batch_size: int = 100
    num_workers: int = -1
    decoded_cache_mb: int = 4096
    skip_corrupt: bool = False
    descriptions: str = ""

    def __post_init__(self):
        for name, low in (("eval_batch_size", 1), ("num_workers", -1), ("decoded_cache_mb", 0)):
            if getattr(self, name) < low:
                raise ConfigError(f"data.{name} = {getattr(self, name)!r}; expected an integer >= {low}")


def preset_path(method: str) -> Path:
    return Path(str(resources.files("alignednorm") / "configs" / "methods" / f"{method}.yaml"))


def suite_preset_path(suite: str) -> Path:
    return Path(str(resources.files("alignednorm") / "configs" / "suites" / f"{suite}.yaml"))


def _schema(method: str) -> DictConfig:
    method_cls = get_method_class(method).Config
    return OmegaConf.create({
        "method": OmegaConf.structured(method_cls),
        "train": OmegaConf.structured(TrainConfig),
        "data": OmegaConf.structured(DataConfig),
    })


def _valid_keys(schema: DictConfig) -> list[str]:
    return [f"{section}.{key}" for section in schema for key in schema[section]]


def _merge(base: DictConfig, part, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, part)
    except ConfigKeyError as exc:
        key = str(exc.full_key)
        close = difflib.get_close_matches(key, _valid_keys(base), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{source}: unknown config key {key!r}{hint}") from None
    except OmegaConfBaseException as exc:
        reason = str(exc).splitlines()[0]
        raise ConfigError(f"{source}: bad value for {getattr(exc, 'full_key', '?')!r}: {reason}") from None


def _load_yaml(path: Path) -> DictConfig:
    try:
        data = OmegaConf.load(path)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except Exception as exc:  # noqa: BLE001  (yaml and OmegaConf raise many types for bad files)
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, DictConfig):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def _sections(node, source: str, keys: tuple[str, ...] = ("method", "train", "data")) -> list[tuple[object, str]]:
    part = {k: node[k] for k in keys if k in node}
    return [(part, source)] if part else []


def _suite_file_layers(suite: str, protocol: str | None, dataset: str | None = None) -> list[tuple[object, str]]:
    """``configs/suites/<suite>.yaml``: train and data settings every method shares on that suite.

    Layers: its top level, its ``protocols.<protocol>``, then that protocol's ``datasets.<dataset>``.
    """
    path = suite_preset_path(suite)
    if not path.is_file():
        return []
    preset = _load_yaml(path)
    stray = sorted(set(preset) - {"train", "data", "protocols"})
    if stray:
        raise ConfigError(f"{path}: unexpected top-level keys {stray}; a suite file holds train, data and protocols")
    layers = _sections(preset, str(path), ("train", "data"))
    if protocol:
        section = preset.get("protocols", {}).get(protocol, {})
        layers += _sections(section, f"{path} protocols.{protocol}", ("train", "data"))
        if dataset:
            layers += _sections(section.get("datasets", {}).get(dataset, {}),
                                f"{path} protocols.{protocol}.datasets.{dataset}", ("train", "data"))
    return layers


def _shots_section(section, shots: int | None, source: str) -> list[tuple[object, str]]:
    """A protocol section's ``shots.<K>`` settings (the official runs' epochs per shot count)."""
    table = section.get("shots", {}) if shots is not None else {}
    for key in table:
        if not str(key).isdigit():
            raise ConfigError(f"{source}: shots key {key!r} is not a shot count (expected e.g. 1, 2, 4, 8, 16)")
        if int(key) == shots:
            return _sections(table[key], f"{source}.shots.{shots}")
    return []


def _preset_layers(method: str, protocol: str | None, dataset: str | None,
                   shots: int | None = None) -> list[tuple[object, str]]:
    """The preset's layers for one run: top level, protocol, its shot count, the dataset's suites, the dataset."""
    path = preset_path(method)
    preset = _load_yaml(path) if path.is_file() else OmegaConf.create({})
    layers = _sections(preset, str(path))
    section = preset.get("protocols", {}).get(protocol, {}) if protocol else {}
    layers += _sections(section, f"{path} protocols.{protocol}")
    layers += _shots_section(section, shots, f"{path} protocols.{protocol}")
    for name in _dataset_suites(dataset):
        layers += _suite_file_layers(name, protocol, dataset)
        suite = preset.get("suites", {}).get(name, {})
        layers += _sections(suite, f"{path} suites.{name}")
        if protocol:
            layers += _sections(suite.get("protocols", {}).get(protocol, {}),
                                f"{path} suites.{name}.protocols.{protocol}")
    if dataset and section:
        layers += _sections(section.get("datasets", {}).get(dataset, {}),
                            f"{path} protocols.{protocol}.datasets.{dataset}")
    return layers


def _dataset_suites(dataset: str | None) -> tuple[str, ...]:
    if not dataset:
        return ()
    from alignednorm.data.catalog import get_dataset

    try:
        return get_dataset(dataset).suites
    except KeyError:
        return ()


def resolve_config(method: str, protocol: str | None = None, dataset: str | None = None,
                   user_yaml: str | Path | None = None, overrides: list[str] | None = None,
                   shots: int | None = None) -> DictConfig:
    """The merged config ``{method, train, data}`` for one run (``shots``: its K-shot sections), validated."""
    if protocol is not None and protocol not in RUN_KINDS:
        close = difflib.get_close_matches(protocol, RUN_KINDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown protocol {protocol!r}{hint} (known: {', '.join(PROTOCOLS)})")
    cfg = _schema(method)
    for part, source in _preset_layers(method, protocol, dataset, shots):
        cfg = _merge(cfg, part, source)
    if user_yaml is not None:
        cfg = _merge(cfg, _load_yaml(Path(user_yaml)), str(user_yaml))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.epochs=5")
        cfg = _merge(cfg, OmegaConf.from_dotlist([item]), f"--set {item}")
    build(method, cfg)  # run every dataclass's own checks now, before any work
    return cfg


def build(method: str, cfg: DictConfig):
    """Turn a resolved config into ``(method config, TrainConfig, DataConfig)`` objects."""
    method_cls = get_method_class(method).Config
    as_dict = OmegaConf.to_container(cfg, resolve=True)
    return (_instantiate(method_cls, as_dict["method"]), _instantiate(TrainConfig, as_dict["train"]),
            _instantiate(DataConfig, as_dict["data"]))


def _instantiate(cls, values: dict):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:  # a config merged over the schema never has any; a hand-built dict may
        raise ConfigError(f"unknown keys {unknown} for {cls.__qualname__} (valid: {', '.join(sorted(names))})")
    return cls(**values)


def load_run_config(method: str, path: str | Path) -> DictConfig:
    """A run's saved ``config.yaml`` merged over today's schema: unknown keys (a renamed field) are refused.

    Keys the saved file lacks (a field added since) take their defaults.
    """
    return run_config_from(method, _load_yaml(Path(path)), str(path))


def run_config_from(method: str, saved, source: str) -> DictConfig:
    """A saved ``{method, train, data}`` mapping merged strictly over the schema (see :func:`load_run_config`)."""
    saved = _moved_keys(saved)
    cfg = _merge(_schema(method), saved, source)
    stray = sorted(set(cfg) - {"method", "train", "data"})
    if stray:
        raise ConfigError(f"{source}: unexpected top-level keys {stray}; expected method, train and data")
    build(method, cfg)
    return cfg


def _moved_keys(saved):
    """Runs saved before ``train.num_workers`` became ``data.num_workers`` (a setting, never a result)."""
    saved = OmegaConf.create(saved) if not isinstance(saved, DictConfig) else saved.copy()
    train = saved.get("train")
    if isinstance(train, DictConfig) and "num_workers" in train:
        workers = train.pop("num_workers")
        if "data" not in saved:
            saved.data = {}
        saved.data.setdefault("num_workers", workers)
    return saved


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)
