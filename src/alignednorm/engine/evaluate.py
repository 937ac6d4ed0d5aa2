"""Top-1 accuracy (overall and per class) of a method's inference rule on a data loader."""

from __future__ import annotations

import time

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from alignednorm.methods.base import Method


@torch.no_grad()
def evaluate(method: Method, loader: DataLoader, rule: str = "any", progress: bool = True,
             desc: str = "eval", predict=None) -> dict:
    """Run ``method.predict`` with inference ``rule`` over ``loader``.

    ``predict(inputs) -> logits`` replaces ``method.predict(images, rule)``, e.g. to classify
    batches of cached image features.

    Returns:
        ``{"accuracy": %, "num_samples": N, "per_class_accuracy": [% per label], "macro_accuracy": %}``.
    """
    method.eval()
    device = next(method.backbone.parameters()).device
    num_classes = len(method.classnames)
    correct = torch.zeros(num_classes, dtype=torch.long)
    total = torch.zeros(num_classes, dtype=torch.long)
    seconds, batches = 0.0, 0
    for batch in tqdm(loader, desc=desc, disable=None if progress else True, leave=False):
        if batch is None:  # every image of the batch was unreadable and skipped
            continue
        images, labels = batch
        start = time.perf_counter()
        logits = method.predict(images.to(device), rule=rule) if predict is None else predict(images.to(device))
        seconds, batches = seconds + time.perf_counter() - start, batches + 1
        hits = (logits.argmax(dim=-1).cpu() == labels).long()
        total += torch.bincount(labels, minlength=num_classes)
        correct += torch.bincount(labels, weights=hits, minlength=num_classes).long()
    seen = total > 0
    per_class = torch.where(seen, 100.0 * correct / total.clamp(min=1), torch.nan)
    n = int(total.sum())
    return {
        "accuracy": 100.0 * int(correct.sum()) / max(n, 1),
        "num_samples": n,
        "macro_accuracy": float(per_class[seen].mean()) if seen.any() else float("nan"),
        "per_class_accuracy": [None if torch.isnan(a) else round(float(a), 4) for a in per_class],
        "seconds_per_batch": seconds / max(batches, 1),
        "batch_size": getattr(loader, "batch_size", None),
    }
