"""Batching shared by training and evaluation loaders: a dataset may yield ``None`` for an unreadable sample."""

from __future__ import annotations

from torch.utils.data import default_collate


def skip_none_collate(batch):
    """``default_collate`` without the ``None`` entries of skipped samples; ``None`` if nothing is left."""
    batch = [sample for sample in batch if sample is not None]
    return default_collate(batch) if batch else None
