"""Frozen-CLIP image features of a list of images, computed once and kept on disk.

Zero-shot CLIP and the linear probe see images only through the frozen image tower, and the
protocols evaluate them on the same test images again and again (five shot counts × three seeds
in the few-shot protocol, the base and all-class evaluations, every cross-dataset sweep). Their
features are written to ``<cache>/<key>.safetensors``, where the key covers everything the
features depend on: the backbone file's SHA-256 and open_clip name, the evaluation transform,
whether unreadable images are skipped, and every image's path, size and modification time. Any
change gives another key, so a stale file is never read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch
from torch import Tensor

from alignednorm.engine.io import file_sha256, load_tensors, save_tensors

log = logging.getLogger(__name__)


def backbone_fingerprint(backbone) -> str | None:
    """The weights file's SHA-256 and the module structure (activations, sizes), or None for in-memory weights."""
    source = backbone.source
    if not source or not os.path.isfile(source):
        return None
    structure = hashlib.sha256(repr(backbone.model).encode()).hexdigest()
    return f"{file_sha256(source)}:{structure}"


def cache_key(fingerprint: str, transform: str, skip_corrupt: bool, items) -> str:
    """A hex digest of everything the features of ``items`` depend on."""
    digest = hashlib.sha256(json.dumps([fingerprint, transform, skip_corrupt]).encode())
    for item in items:
        stat = os.stat(item.impath)
        digest.update(f"\n{item.impath}\t{stat.st_size}\t{stat.st_mtime_ns}\t{item.label}".encode())
    return digest.hexdigest()[:32]


@torch.no_grad()
def encode_loader(backbone, loader) -> tuple[Tensor, Tensor, float | None]:
    """Image features ``(N, E)`` and labels of every batch of ``loader``, and seconds per batch."""
    device = next(backbone.parameters()).device
    features, labels, seconds = [], [], []
    for batch in loader:
        if batch is None:  # every image of the batch was unreadable and skipped
            continue
        images, y = batch
        start = time.perf_counter()
        features.append(backbone.encode_image(images.to(device)).features.float().cpu())
        seconds.append(time.perf_counter() - start)
        labels.append(y)
    if not features:
        return torch.zeros(0, backbone.embed_dim), torch.zeros(0, dtype=torch.long), None
    return torch.cat(features), torch.cat(labels), sum(seconds) / len(seconds)


def cached_image_features(backbone, loader, cache_dir: str | Path) -> tuple[Tensor, Tensor, dict] | None:
    """``(features, labels, info)`` of ``loader``'s images, from ``cache_dir`` when computed before.

    ``info`` says whether the file was reused, how many images were skipped as unreadable and,
    when computed now, the seconds per batch of the image tower. None when the backbone has no
    weights file to identify it by (nothing is cached then).
    """
    fingerprint = backbone_fingerprint(backbone)
    if fingerprint is None:
        return None
    dataset = loader.dataset
    key = cache_key(fingerprint, repr(dataset.transform), dataset.skip_corrupt, dataset.items)
    path = Path(cache_dir) / f"{key}.safetensors"
    if path.is_file():
        stored = load_tensors(path)
        return stored["features"], stored["labels"], {"reused": True, "skipped_images": int(stored["skipped"]),
                                                      "seconds_per_batch": None, "file": str(path)}
    features, labels, seconds = encode_loader(backbone, loader)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(path, {"features": features, "labels": labels, "skipped": torch.tensor(dataset.num_skipped)})
    log.info("cached %d image features in %s", len(labels), path)
    return features, labels, {"reused": False, "skipped_images": dataset.num_skipped, "seconds_per_batch": seconds,
                              "file": str(path)}
