"""The datasets alignednorm knows, as one table.

Each entry says where a dataset lives under ``DATA_ROOT`` in the CoOp/Dassl layout, how its
split is read, and which prompt template the reference methods use for it. Extra datasets
(the built-in mini benchmark, a user's own) register through :func:`register_dataset`; the
mini benchmark's are found on the first lookup, without importing ``alignednorm.mini`` first.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset lives and how it is read.

    Attributes:
        name: registry key used on the command line, e.g. ``"oxford_pets"``.
        dassl_name: the Dassl class name (``"OxfordPets"``), used for templates and presets.
        folder: folder under ``DATA_ROOT``.
        image_root: folder, relative to ``folder``, that split paths are relative to.
        reader: how the split is read: ``"split_json"`` (CoOp ``split_zhou_*.json``),
            ``"imagenet"``, ``"fgvc_aircraft"``, ``"imagenet_variant"`` (test-only folders).
        split_file: split JSON relative to ``folder`` (``"split_json"`` reader only).
        template: the single prompt template of the reference methods, with ``{}``.
        num_classes: expected number of classes (for ``datasets check``).
        test_only: True for datasets that only have a test set (ImageNet variants).
        suites: names of the benchmark suites the dataset belongs to.
        obtain: how to get the files, said when the dataset's folder is missing (``{root}``: the data root).
    """

    name: str
    dassl_name: str
    folder: str
    image_root: str
    reader: str = "split_json"
    split_file: str | None = None
    template: str = "a photo of a {}."
    num_classes: int | None = None
    test_only: bool = False
    suites: tuple[str, ...] = field(default_factory=tuple)
    obtain: str = ""


_REGISTRY: dict[str, DatasetSpec] = {}

# Packages whose import registers more datasets and suites. They are imported on the first lookup
# that needs them, not here: they import this module, so importing them here would be a cycle.
_PROVIDERS = ("alignednorm.mini",)
_providers_loaded = False


def _load_providers() -> None:
    global _providers_loaded
    if _providers_loaded:
        return
    _providers_loaded = True  # first, so a provider that looks names up while importing does not recurse
    for module in _PROVIDERS:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # a provider that is there but broken must not pass silently
                raise


def register_dataset(spec: DatasetSpec, replace: bool = False) -> DatasetSpec:
    """Add ``spec`` to the catalog; a name may be registered once unless ``replace`` (a re-created dataset)."""
    if spec.name in _REGISTRY and _REGISTRY[spec.name] != spec and not replace:
        raise ValueError(f"dataset {spec.name!r} is already registered with a different spec")
    _REGISTRY[spec.name] = spec
    return spec


def get_dataset(name: str) -> DatasetSpec:
    """Look a dataset up by name (case-insensitive, Dassl class names accepted too)."""
    key = name.lower()
    for load in (False, True):  # the built-in table first, so paper runs never import the providers
        if load:
            _load_providers()
        for spec in _REGISTRY.values():
            if key in (spec.name, spec.dassl_name.lower()):
                return spec
    close = difflib.get_close_matches(key, list(_REGISTRY), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise KeyError(f"unknown dataset {name!r}{hint} (known: {', '.join(sorted(_REGISTRY))})")


def list_datasets(suite: str | None = None) -> list[str]:
    """Names of the registered datasets, optionally only those of one suite, in table order."""
    _load_providers()
    return [s.name for s in _REGISTRY.values() if suite is None or suite in s.suites]


_PAPER = ("paper",)
_B2N = ("paper", "base2new", "fewshot")
for _spec in (
    DatasetSpec("imagenet", "ImageNet", "imagenet", "images", reader="imagenet", num_classes=1000, suites=_B2N),
    DatasetSpec("caltech101", "Caltech101", "caltech-101", "101_ObjectCategories",
                split_file="split_zhou_Caltech101.json", num_classes=100, suites=_B2N),
    DatasetSpec("oxford_pets", "OxfordPets", "oxford_pets", "images", split_file="split_zhou_OxfordPets.json",
                template="a photo of a {}, a type of pet.", num_classes=37, suites=_B2N),
    DatasetSpec("stanford_cars", "StanfordCars", "stanford_cars", ".", split_file="split_zhou_StanfordCars.json",
                num_classes=196, suites=_B2N),
    DatasetSpec("oxford_flowers", "OxfordFlowers", "oxford_flowers", "jpg",
                split_file="split_zhou_OxfordFlowers.json", template="a photo of a {}, a type of flower.",
                num_classes=102, suites=_B2N),
    DatasetSpec("food101", "Food101", "food-101", "images", split_file="split_zhou_Food101.json",
                template="a photo of {}, a type of food.", num_classes=101, suites=_B2N),
    DatasetSpec("fgvc_aircraft", "FGVCAircraft", "fgvc_aircraft", "images", reader="fgvc_aircraft",
                template="a photo of a {}, a type of aircraft.", num_classes=100, suites=_B2N),
    DatasetSpec("sun397", "SUN397", "sun397", "SUN397", split_file="split_zhou_SUN397.json",
                num_classes=397, suites=_B2N),
    DatasetSpec("dtd", "DescribableTextures", "dtd", "images", split_file="split_zhou_DescribableTextures.json",
                template="{} texture.", num_classes=47, suites=_B2N),
    DatasetSpec("eurosat", "EuroSAT", "eurosat", "2750", split_file="split_zhou_EuroSAT.json",
                template="a centered satellite photo of {}.", num_classes=10, suites=_B2N),
    DatasetSpec("ucf101", "UCF101", "ucf101", "UCF-101-midframes", split_file="split_zhou_UCF101.json",
                template="a photo of a person doing {}.", num_classes=101, suites=_B2N),
    DatasetSpec("imagenetv2", "ImageNetV2", "imagenetv2", "imagenetv2-matched-frequency-format-val",
                reader="imagenet_variant", num_classes=1000, test_only=True, suites=_PAPER),
    DatasetSpec("imagenet_sketch", "ImageNetSketch", "imagenet-sketch", "images", reader="imagenet_variant",
                num_classes=1000, test_only=True, suites=_PAPER),
    DatasetSpec("imagenet_a", "ImageNetA", "imagenet-adversarial", "imagenet-a", reader="imagenet_variant",
                num_classes=200, test_only=True, suites=_PAPER),
    DatasetSpec("imagenet_r", "ImageNetR", "imagenet-rendition", "imagenet-r", reader="imagenet_variant",
                num_classes=200, test_only=True, suites=_PAPER),
):
    register_dataset(_spec)


@dataclass(frozen=True)
class Suite:
    """A benchmark suite: which datasets each protocol uses.

    Attributes:
        name: suite name (``paper``, ``mini``).
        base2new: datasets of the base-to-new and few-shot tables.
        source: the dataset cross-dataset and domain-generalisation models train on (ImageNet's role).
        cross_targets: the cross-dataset targets.
        dg_targets: the domain-generalisation targets (shifted versions of ``source``).
    """

    name: str
    base2new: tuple[str, ...]
    source: str
    cross_targets: tuple[str, ...]
    dg_targets: tuple[str, ...]


_SUITES: dict[str, Suite] = {}


def register_suite(suite: Suite) -> Suite:
    _SUITES[suite.name] = suite
    return suite


def get_suite(name: str) -> Suite:
    if name not in _SUITES:
        _load_providers()
    if name not in _SUITES:
        raise KeyError(f"unknown suite {name!r} (known: {', '.join(sorted(_SUITES))})")
    return _SUITES[name]


def list_suites() -> list[str]:
    _load_providers()
    return sorted(_SUITES)


register_suite(Suite(
    "paper",
    base2new=("imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft",
              "sun397", "dtd", "eurosat", "ucf101"),
    source="imagenet",
    cross_targets=("caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft",
                   "sun397", "dtd", "eurosat", "ucf101"),
    dg_targets=("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"),
))
