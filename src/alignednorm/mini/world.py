"""The mini world: seven procedural datasets and four shifted test sets, written in the CoOp layout.

The datasets mirror the paper's suite in miniature: ``mini_objects`` (104 classes) plays ImageNet,
with ``mini_objects_v2`` / ``_sketch`` / ``_a`` / ``_r`` as its resampled, outline-only, hard and
restyled variants; the other six cover shapes x colours, textures, glyphs, counts, spatial relations
and top-down "satellite" scenes. Importing this module registers them all in the dataset catalog.

:func:`generate_world` writes ``<root>/mini/<folder>/images/<class>/<file>.png`` plus
``split_mini_<folder>.json`` (CoOp format), deterministically from a seed.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from alignednorm.data.catalog import DatasetSpec, register_dataset

from .capture import Capture
from .icons import ICONS, LETTERS
from .objects import MARKINGS, render_object
from .scenes import (
    TERRAINS,
    render_count,
    render_glyph,
    render_relation,
    render_satellite,
    render_shape,
    render_texture,
)

__all__ = ["MINI_DATASETS", "WORLD_VERSION", "MiniDataset", "generate_world", "get_mini", "render_image"]

log = logging.getLogger(__name__)

WORLD_VERSION = 4
"""Bumped whenever the renderers change, so stale worlds on disk are regenerated."""
_STAMP = ".complete.json"
_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class MiniDataset:
    """One dataset of the mini world.

    Attributes:
        name: catalog name (``"mini_shapes"``).
        folder: folder under ``<root>/mini``.
        dassl_name: CamelCase name.
        template: the prompt template of the reference methods.
        classes: ``(classname, render factors)`` in label order (sorted by classname, as folders are).
        render: ``render(rng, *factors) -> PIL image``.
        counts: images per class in train / val / test.
        test_only: True for the shifted variants (their split JSON repeats test as train, val is empty).
        capture: the dataset's capture condition, applied to its images but never to pretraining
            images (:mod:`alignednorm.mini.capture`).
    """

    name: str
    folder: str
    dassl_name: str
    template: str
    classes: tuple[tuple[str, tuple], ...]
    render: Callable[..., Image.Image]
    counts: tuple[int, int, int] = (20, 4, 25)
    test_only: bool = False
    capture: Capture = field(default_factory=Capture)

    @property
    def classnames(self) -> list[str]:
        return [c for c, _ in self.classes]

    def spec(self) -> DatasetSpec:
        """The catalog entry of this dataset."""
        suites = ("mini", "mini_dg") if self.test_only else ("mini",)
        return DatasetSpec(self.name, self.dassl_name, f"mini/{self.folder}", "images", reader="split_json",
                           split_file=f"split_mini_{self.folder}.json", template=self.template,
                           num_classes=len(self.classes), test_only=self.test_only, suites=suites,
                           obtain=_OBTAIN)


_OBTAIN = "Render it with `alignednorm mini generate --data-root {root}` (datasets already there are kept)"


def _sorted(classes: list[tuple[str, tuple]]) -> tuple[tuple[str, tuple], ...]:
    return tuple(sorted(classes))


_NUMBERS = ("one", "two", "three", "four", "five")
_COUNTED = {"circle": ("dot", "dots"), "square": ("square", "squares"), "triangle": ("triangle", "triangles"),
            "cross": ("cross", "crosses")}
_PAIRED = ("red", "green", "blue", "yellow")
_TEXTURES = ("horizontal stripes", "vertical stripes", "diagonal stripes", "checkerboard", "polka dots", "grid",
             "zigzag", "wavy", "crosshatched", "concentric rings", "bricks", "speckled", "triangles", "diamonds",
             "plaid", "dashes", "blotches", "gradient", "fish scales", "spiral", "starburst", "small crosses",
             "plain", "woven")
_FEATURES = ("", "river", "highway", "lake", "village")


def _objects(suffix: str, dassl: str, style: str, counts: tuple[int, int, int]) -> MiniDataset:
    classes = [(kind if m == "plain" else f"{m} {kind}", (kind, m, style)) for kind in ICONS for m in MARKINGS]
    return MiniDataset(f"mini_objects{suffix}", f"objects{suffix}", f"MiniObjects{dassl}", "a photo of a {}.",
                       _sorted(classes), render_object, counts, test_only=bool(suffix), capture=CAPTURES["objects"])


# Each dataset's camera (see capture.py): mild for the broad set (ImageNet is close to web photos; its
# variants share its camera and add their own style), false colour for the top-down scenes, scanned-paper
# casts for textures and glyphs, white-balance errors where colour names the class.
CAPTURES = {
    "objects": Capture(contrast=0.85, cast=(12, 6, -6), blur=0.4, noise=6),
    "shapes": Capture(hue_rotation=0.3, contrast=0.8),
    "textures": Capture(contrast=0.7, cast=(40, 30, 10), blur=0.6, noise=10),
    "glyphs": Capture(contrast=0.65, cast=(70, 45, 10), blur=0.8, noise=14),
    "counts": Capture(contrast=0.8, cast=(25, 25, 25), blur=0.5, noise=12),
    "relations": Capture(hue_rotation=0.3, noise=8),
    "satellite": Capture(hue_rotation=0.6, contrast=0.9),
}
_VARIANT_COUNTS = (0, 0, 15)
MINI_DATASETS: tuple[MiniDataset, ...] = (
    _objects("", "", "photo", (20, 4, 20)),
    MiniDataset("mini_shapes", "shapes", "MiniShapes", "a drawing of a {}.",
                _sorted([(f"{c} {s}", (s, c)) for s in ("circle", "square", "triangle", "star", "cross", "hexagon")
                         for c in ("red", "green", "blue", "yellow")]), render_shape, capture=CAPTURES["shapes"]),
    MiniDataset("mini_textures", "textures", "MiniTextures", "{} texture.",
                _sorted([(t, (t,)) for t in _TEXTURES]), render_texture, capture=CAPTURES["textures"]),
    MiniDataset("mini_glyphs", "glyphs", "MiniGlyphs", "a photo of the {}, a character.",
                _sorted([(f"letter {a}", (a,)) for a in LETTERS]), render_glyph, capture=CAPTURES["glyphs"]),
    MiniDataset("mini_counts", "counts", "MiniCounts", "a photo of {}.",
                _sorted([(f"{w} {_COUNTED[s][n > 1]}", (n, s)) for n, w in enumerate(_NUMBERS, 1) for s in _COUNTED]),
                render_count, capture=CAPTURES["counts"]),
    MiniDataset("mini_relations", "relations", "MiniRelations", "a scene with a {}.",
                _sorted([(f"{a} shape {r} a {b} shape", (a, r, b)) for a in _PAIRED for b in _PAIRED if a != b
                         for r in ("above", "left of")]), render_relation, capture=CAPTURES["relations"]),
    MiniDataset("mini_satellite", "satellite", "MiniSatellite", "a centered satellite photo of {}.",
                _sorted([(f"{t} with a {f}" if f else t, (t, f)) for t in TERRAINS for f in _FEATURES]),
                render_satellite, capture=CAPTURES["satellite"]),
    _objects("_v2", "V2", "shifted", _VARIANT_COUNTS),
    _objects("_sketch", "Sketch", "sketch", _VARIANT_COUNTS),
    _objects("_a", "A", "occluded", _VARIANT_COUNTS),
    _objects("_r", "R", "restyled", _VARIANT_COUNTS),
)

for _dataset in MINI_DATASETS:
    register_dataset(_dataset.spec())


def get_mini(name: str) -> MiniDataset:
    """Look a mini dataset up by catalog name."""
    for dataset in MINI_DATASETS:
        if dataset.name == name:
            return dataset
    raise KeyError(f"unknown mini dataset {name!r} (known: {', '.join(d.name for d in MINI_DATASETS)})")


def image_rng(seed: int, dataset: MiniDataset, label: int, split: str, index: int) -> np.random.Generator:
    """The generator of one image: a pure function of (seed, dataset, label, split, index)."""
    return np.random.default_rng([seed, zlib.crc32(dataset.name.encode()), label, _SPLITS.index(split), index])


def render_image(dataset: MiniDataset, label: int, rng: np.random.Generator) -> Image.Image:
    """Render one image of class ``label`` of ``dataset``, as its capture condition sees it."""
    return dataset.capture.apply(dataset.render(rng, *dataset.classes[label][1]), rng)


def _class_folder(classname: str) -> str:
    return classname.replace(" ", "_")


def _write_json(path: Path, obj: object, indent: int | None = 4) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=indent) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _stamp(dataset: MiniDataset, seed: int) -> dict:
    return {"version": WORLD_VERSION, "seed": seed, "counts": list(dataset.counts), "classes": dataset.classnames}


def _generate_dataset(dataset: MiniDataset, folder: Path, seed: int) -> dict[str, list]:
    """Render every image of ``dataset`` into ``folder/images``; return the split lists."""
    lists: dict[str, list] = {split: [] for split in _SPLITS}
    counts = dict(zip(_SPLITS, dataset.counts))
    if dataset.test_only:  # CoOp's variant datasets use the test images as train too (never trained on)
        counts = {"test": dataset.counts[2]}
    for label, (classname, _) in enumerate(dataset.classes):
        class_folder = _class_folder(classname)
        (folder / "images" / class_folder).mkdir(parents=True, exist_ok=True)
        for split, count in counts.items():
            for i in range(count):
                rel = f"{class_folder}/{split}_{i:03d}.png"
                render_image(dataset, label, image_rng(seed, dataset, label, split, i)).save(folder / "images" / rel)
                lists[split].append([rel, label, classname])
    if dataset.test_only:
        lists["train"] = list(lists["test"])
    return lists


def is_complete(root: str | os.PathLike, dataset: MiniDataset, seed: int = 0) -> bool:
    """Whether ``dataset`` was fully generated under ``root`` with this seed and world version."""
    stamp = Path(root) / "mini" / dataset.folder / _STAMP
    try:
        return json.loads(stamp.read_text(encoding="utf-8")) == _stamp(dataset, seed)
    except (OSError, ValueError):
        return False


def _write_dataset(root: str, name: str, seed: int) -> None:
    dataset = get_mini(name)
    folder = Path(root) / "mini" / dataset.folder
    start = time.perf_counter()
    if folder.exists():
        shutil.rmtree(folder)
    lists = _generate_dataset(dataset, folder, seed)
    _write_json(folder / dataset.spec().split_file, lists)
    _write_json(folder / _STAMP, _stamp(dataset, seed), indent=None)
    log.info("mini world: wrote %s (%d images) in %.1f s", dataset.name,
             sum(len(v) for k, v in lists.items() if k != "train" or not dataset.test_only),
             time.perf_counter() - start)


def generate_world(root: str | os.PathLike, seed: int = 0, overwrite: bool = False,
                   names: list[str] | None = None, processes: int = 1) -> Path:
    """Write the mini datasets under ``root/mini`` in the CoOp layout (idempotent).

    A dataset whose stamp file matches (seed, world version, counts, classes) is skipped; anything
    else is deleted and rendered again. The stamp is written last, so an interrupted run is redone.

    Args:
        root: the data root (``DATA_ROOT``); the world goes into ``root/mini``.
        seed: world seed; the same seed gives the same pixels.
        overwrite: regenerate even complete datasets.
        names: only these catalog names (default: all of :data:`MINI_DATASETS`).
        processes: render this many datasets at once, in separate processes (the same files).

    Returns:
        The folder ``root/mini``.
    """
    base = Path(root) / "mini"
    todo = [d.name for d in ((get_mini(n) for n in names) if names else MINI_DATASETS)
            if overwrite or not is_complete(root, d, seed)]
    if processes > 1 and len(todo) > 1:  # datasets are independent: each is rendered from its own seed
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(processes, len(todo)), mp_context=context) as pool:
            list(pool.map(_write_dataset, [str(root)] * len(todo), todo, [seed] * len(todo)))
    else:
        for name in todo:
            _write_dataset(str(root), name, seed)
    return base
