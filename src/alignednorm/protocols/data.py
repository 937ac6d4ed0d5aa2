"""The protocol floor's data: what a run trains on, the label spaces, and evaluation on a test split.

A protocol prepares the training data of a run (Dassl's few-shot sampling, CoOp's base/new
selection, the dataset's template and class descriptions, augmented training images, the
validation callback) as a :class:`~alignednorm.engine.run.TrainingData` for the engine, which knows
no dataset; after training it evaluates the trained method here (:func:`evaluate_split`).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from alignednorm import data as D
from alignednorm.backbone.clip import ClipBackbone
from alignednorm.engine.batches import Batches, image_batches, resolve_workers
from alignednorm.engine.evaluate import evaluate
from alignednorm.engine.feature_cache import cached_image_features
from alignednorm.engine.run import TrainingData
from alignednorm.methods import Method
from alignednorm.prompts.label_space import LabelSpace, read_descriptions

log = logging.getLogger(__name__)


def load_split(dataset: str, data_root: str, shots: int, seed: int, train_subset: str,
               cache_dir: str) -> D.DatasetSplits:
    """The training dataset's splits after Dassl's few-shot sampling (``shots`` > 0) and CoOp's base/new selection."""
    splits = D.load_splits(dataset, data_root)
    if shots > 0:
        splits = D.few_shot_splits(splits, shots, seed, cache_dir=cache_dir)
    return D.subsample_classes(splits, train_subset)


def dataset_label_space(dataset: str, classnames, descriptions: str = "") -> LabelSpace:
    """The label space of ``classnames`` phrased with ``dataset``'s template (and descriptions, when given).

    ``descriptions`` is ``data.descriptions``: a CuPL-style JSON file, or a folder of ``<dataset>.json``.
    """
    template = (D.get_dataset(dataset).template,)
    if not descriptions:
        return LabelSpace(tuple(classnames), template)
    path = Path(descriptions)
    path = path / f"{dataset}.json" if path.is_dir() else path
    return LabelSpace(tuple(classnames), template, read_descriptions(path), str(path))


def eval_loader(items, backbone: ClipBackbone, data_cfg) -> Batches:
    """Un-augmented batches of ``items`` at the backbone's input size, in order, with ``data.num_workers``."""
    transform = D.build_transform(backbone.image_size, train=False)
    device = next(backbone.parameters()).device
    return image_batches(D.ImageListDataset(items, transform, skip_corrupt=data_cfg.skip_corrupt),
                         batch_size=data_cfg.eval_batch_size, workers=resolve_workers(data_cfg.num_workers, device),
                         device=device)


def training_images(items, backbone: ClipBackbone, data_cfg) -> D.ImageListDataset:
    """The augmented training images, decoded once and kept when they fit in ``data.decoded_cache_mb``."""
    augmentation = D.TrainAugmentation(backbone.image_size, crop_scale=tuple(data_cfg.crop_scale),
                                       hflip=data_cfg.hflip, random_resized_crop=data_cfg.random_resized_crop)
    images = D.ImageListDataset(items, augmentation, skip_corrupt=data_cfg.skip_corrupt)
    workers = resolve_workers(data_cfg.num_workers, next(backbone.parameters()).device)
    if images.preload(data_cfg.decoded_cache_mb, workers):
        log.info("%d training images decoded once and kept in memory", len(images))
    return images


def training_data(split: D.DatasetSplits, dataset: str, backbone: ClipBackbone, data_cfg) -> TrainingData:
    """What the engine trains on: ``split``'s classes, augmented training images, validation and solver batches."""

    def loader(items):
        return eval_loader(items, backbone, data_cfg) if items else None

    return TrainingData(
        classnames=list(split.classnames), template=D.get_dataset(dataset).template,
        label_space=dataset_label_space(dataset, split.classnames, data_cfg.descriptions),
        train=training_images(split.train, backbone, data_cfg),
        validate=validator(split, dataset, data_cfg) if split.val else None,
        solver_batches=lambda: (loader(split.train), loader(split.val)))


def validator(split: D.DatasetSplits, dataset: str, data_cfg):
    """``validate(method) -> accuracy`` on the training classes' validation images (the seen rule)."""
    val = dataclasses.replace(split, test=split.val)

    def validate(method: Method) -> float:
        with torch.no_grad():
            return evaluate_split(method, val, dataset, "seen", data_cfg, progress=False)["accuracy"]

    return validate


def evaluate_split(method: Method, split: D.DatasetSplits, dataset: str, rule: str, data_cfg,
                   progress: bool = True, feature_cache: str | Path | None = None) -> dict:
    """Accuracy on ``split.test`` over its classes, with the inference rule ``rule`` (seen / unseen / any).

    Unreadable images skipped under ``data.skip_corrupt`` are counted in ``skipped_images``. With
    ``feature_cache``, a method that sees images only through frozen features
    (``MethodTraits.frozen_image_features``) classifies features kept there (``engine.feature_cache``).
    """
    method.check_classnames(split.classnames, rule)
    method.set_label_space(dataset_label_space(dataset, split.classnames, data_cfg.descriptions))
    loader = eval_loader(split.test, method.backbone, data_cfg)
    cached = cached_image_features(method.backbone, loader, feature_cache) \
        if feature_cache is not None and method.traits.frozen_image_features else None
    if cached is None:
        result = evaluate(method, loader, rule=rule, progress=progress, desc=f"eval {dataset}/{rule}")
        skipped = loader.dataset.num_skipped
    else:
        result, skipped = _evaluate_features(method, rule, *cached, data_cfg.eval_batch_size)
    result.update(num_classes=len(split.classnames), skipped_images=skipped)
    if skipped:
        log.warning("%s/%s: skipped %d unreadable images: %s", dataset, rule, skipped,
                    sorted(loader.dataset.skipped)[:5])
    return result


def _evaluate_features(method: Method, rule: str, features, labels, info: dict, batch_size: int) -> tuple[dict, int]:
    """:func:`evaluate` over cached image features; the cost is the image tower's when it ran now."""
    batches = list(zip(features.split(batch_size), labels.split(batch_size)))
    result = evaluate(method, batches, rule=rule, progress=False,
                      predict=lambda f: method.logits_from_image_features(f, rule))
    result.update(seconds_per_batch=info["seconds_per_batch"], batch_size=batch_size,
                  image_features="reused from cache" if info["reused"] else "computed and cached")
    return result, info["skipped_images"]
