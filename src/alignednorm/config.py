"""Run configuration: dataclass schemas merged with OmegaConf in a documented order.

Precedence, later wins: schema defaults ← method preset (``configs/methods/<method>.yaml``) ←
the preset's protocol section ← its ``shots.<K>`` section (epochs per shot count) ← the dataset's
suite file (``configs/suites/<suite>.yaml``: ``train`` and ``data`` shared by every method, then its ``protocols.<protocol>``, then that protocol's
``datasets.<dataset>``) ← the preset's section for
that suite (``suites.mini``, then ``suites.mini.protocols.<protocol>``) ← its per-dataset section
for that protocol ← the user's YAML ← ``--set key=value`` options. Unknown keys and wrong types raise :class:`ConfigError` naming
the key, the file it came from and the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from alignednorm.engine.trainer import TrainConfig
from alignednorm.errors import ConfigError
from alignednorm.methods import get_method_class

PROTOCOLS = ("base2new", "crossdataset", "domaingen", "fewshot")
# What a run may be resolved for: a protocol's presets, or a plain evaluation (no protocol section).
RUN_KINDS = (*PROTOCOLS, "eval")


@dataclass
class DataConfig:
    """How images are read and augmented.

    Attributes:
        crop_scale: RandomResizedCrop scale range for training images.
        hflip: random horizontal flips of training images.
        random_resized_crop: random-resized crops of training images (Dassl's ``random_resized_crop``);
            false resizes them to the input size instead, so with ``hflip: false`` training images
            are not augmented (Dassl's ``INPUT.TRANSFORMS ['normalize']``).
        eval_batch_size: images per evaluation batch.
        skip_corrupt: skip unreadable images (and count them) instead of failing.
        descriptions: CuPL-style class descriptions (``{"class": ["sentence", ...]}``): a JSON file,
            or a folder holding ``<dataset>.json`` per dataset; "" for none (methods that use
            descriptions then fall back to the templates, and the run records it).
    """

    crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])
    hflip: bool = True
    random_resized_crop: bool = True
    eval_batch_size: int = 100
    skip_corrupt: bool = False
    descriptions: str = ""


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
            layers += _sections(suite.get("protocols", {}).get(protocol, {}), f"{path} suites.{name}.protocols.{protocol}")
    if dataset and section:
        layers += _sections(section.get("datasets", {}).get(dataset, {}), f"{path} protocols.{protocol}.datasets.{dataset}")
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
    cfg = _merge(_schema(method), saved, source)
    stray = sorted(set(cfg) - {"method", "train", "data"})
    if stray:
        raise ConfigError(f"{source}: unexpected top-level keys {stray}; expected method, train and data")
    build(method, cfg)
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)
