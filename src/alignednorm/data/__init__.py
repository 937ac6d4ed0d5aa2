"""Datasets in the CoOp/Dassl layout: the catalog, split readers, few-shot sampling, base/new split.

Names are imported on first use, so importing ``alignednorm.data`` (or running
``python -m alignednorm.data.fewshot``) does not load torch unless a transform or the torch
``Dataset`` is asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base_new import subsample_classes, subset_labels
    from .catalog import DatasetSpec, get_dataset, list_datasets, register_dataset
    from .check import DatasetCheck, check_data_root, format_check
    from .coop_layout import expected_layout, load_splits, read_split_json, resolve_data_root, resolve_spec
    from .dataset import ImageListDataset, class_prompts
    from .fewshot import few_shot_indices, few_shot_splits, read_fewshot_index, sample_few_shot, sample_few_shot_indices
    from .items import DatasetSplits, Item
    from .transforms import TrainAugmentation, build_transform

__all__ = [
    "DatasetCheck", "DatasetSpec", "DatasetSplits", "ImageListDataset", "Item", "TrainAugmentation",
    "build_transform", "check_data_root", "class_prompts", "expected_layout", "few_shot_indices", "few_shot_splits",
    "format_check", "get_dataset", "list_datasets", "load_splits", "read_fewshot_index", "read_split_json",
    "register_dataset", "resolve_data_root", "resolve_spec", "sample_few_shot", "sample_few_shot_indices",
    "subsample_classes", "subset_labels",
]

_MODULE_OF = {
    "DatasetCheck": "check", "check_data_root": "check", "format_check": "check",
    "DatasetSpec": "catalog", "get_dataset": "catalog", "list_datasets": "catalog", "register_dataset": "catalog",
    "DatasetSplits": "items", "Item": "items",
    "expected_layout": "coop_layout", "load_splits": "coop_layout", "read_split_json": "coop_layout",
    "resolve_data_root": "coop_layout", "resolve_spec": "coop_layout",
    "few_shot_indices": "fewshot", "few_shot_splits": "fewshot", "read_fewshot_index": "fewshot",
    "sample_few_shot": "fewshot", "sample_few_shot_indices": "fewshot",
    "subsample_classes": "base_new", "subset_labels": "base_new",
    "build_transform": "transforms", "TrainAugmentation": "transforms",
    "ImageListDataset": "dataset", "class_prompts": "dataset",
}


def __getattr__(name: str):
    # Import the defining module on first access (PEP 562) and cache the name here.
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
