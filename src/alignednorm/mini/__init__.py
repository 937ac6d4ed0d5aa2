"""The built-in mini benchmark: a procedural image world and a tiny CLIP pretrained on it.

Importing this package registers the mini datasets in the catalog (suite ``"mini"``; the four
shifted test sets also carry ``"mini_dg"``). :func:`generate_world` writes them in the CoOp layout;
:func:`mini_clip_path` is the shipped checkpoint (OpenAI format, float16 safetensors), made by
``python -m alignednorm.mini.pretrain``; ``alignednorm.mini.model.evaluate_zero_shot`` checks it.
"""

from __future__ import annotations

from pathlib import Path

from alignednorm.data.catalog import Suite, register_suite

from .world import MINI_DATASETS, MiniDataset, generate_world, get_mini

__all__ = ["MINI_DATASETS", "MiniDataset", "generate_world", "get_mini", "mini_clip_path"]

ASSETS = Path(__file__).resolve().parent / "assets"


def mini_clip_path() -> Path:
    """The packaged tiny-CLIP checkpoint (``assets/mini_clip.safetensors``; metadata in ``mini_clip.json``)."""
    return ASSETS / "mini_clip.safetensors"


def _register_suite() -> Suite:
    """The mini suite for every protocol: the broad object set plays ImageNet, its variants the shifts."""
    shifted = tuple(d.name for d in MINI_DATASETS if d.test_only)
    others = tuple(d.name for d in MINI_DATASETS if not d.test_only and d.name != "mini_objects")
    return register_suite(Suite("mini", base2new=("mini_objects", *others), source="mini_objects",
                                cross_targets=others, dg_targets=shifted))


MINI_SUITE = _register_suite()
