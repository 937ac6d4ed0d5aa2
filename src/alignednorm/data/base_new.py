"""CoOp's base-to-new class split: the first half of the sorted labels is "base", the rest "new".

Applied after few-shot sampling, to the (few-shot) train list's label set, so a base-to-new run
trains on the base-class part of the all-class few-shot sample, as in CoOp and its successors.
"""

from __future__ import annotations

import dataclasses
import math

from alignednorm.errors import ConfigError

from .items import DatasetSplits, Item

SUBSETS = ("all", "base", "new")


def _check_subset(subset: str) -> None:
    if subset not in SUBSETS:
        raise ConfigError(f"subset {subset!r} is not one of {', '.join(SUBSETS)}")


def subset_labels(labels: set[int] | list[int], subset: str) -> list[int]:
    """The labels kept by ``subset``: base = the first ceil(n/2) sorted labels, new = the rest.

    Raises:
        ConfigError: when ``subset`` is not one of ``all``, ``base``, ``new``.
    """
    _check_subset(subset)
    ordered = sorted(set(labels))
    # With an odd class count the base half gets the extra class (e.g. Pets 19/18).
    half = math.ceil(len(ordered) / 2)
    if subset == "base":
        return ordered[:half]
    if subset == "new":
        return ordered[half:]
    return ordered


def _relabel(items: list[Item], new_label: dict[int, int]) -> list[Item]:
    return [dataclasses.replace(it, label=new_label[it.label]) for it in items if it.label in new_label]


def subsample_classes(splits: DatasetSplits, subset: str) -> DatasetSplits:
    """Keep the base or new classes of ``splits`` and relabel them 0..m-1 in label order.

    Args:
        splits: splits whose train list defines the label set (CoOp's ``subsample_classes``).
        subset: ``"all"`` (unchanged), ``"base"`` or ``"new"``.

    Returns:
        New splits: train, val and test filtered to the chosen classes and relabelled, with the
        matching slice of ``classnames``.
    """
    _check_subset(subset)
    if subset == "all":
        return splits
    kept = subset_labels({it.label for it in splits.train}, subset)
    new_label = {old: new for new, old in enumerate(kept)}
    return dataclasses.replace(
        splits,
        train=_relabel(splits.train, new_label),
        val=_relabel(splits.val, new_label),
        test=_relabel(splits.test, new_label),
        classnames=[splits.classnames[old] for old in kept],
    )
