"""Use a trained prompt: ``alignednorm.load(run_dir).predict(images, classes)``.

A run folder holds everything needed: ``run.json`` (method, backbone file and SHA-256, class
names, template), ``config.yaml`` and ``learnable.safetensors``. The inference rule follows the
classes asked about: ``seen`` when they are all among the training classes (MMRL++: fused logits),
``unseen`` otherwise (MMRL++: the class branch, as its official code does for new classes);
unified methods use one rule for both.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from PIL import Image

from alignednorm import data as D
from alignednorm.data.dataset import load_rgb, to_rgb
from alignednorm.engine.run import TrainedRun, load_run
from alignednorm.errors import ConfigError, DataError
from alignednorm.methods import check_rule
from alignednorm.prompts.label_space import LabelSpace

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class Predictor:
    """A trained method ready to classify images among any class names."""

    def __init__(self, trained: TrainedRun):
        self.method = trained.method.eval()
        self.info = trained.info
        self.transform = D.build_transform(self.method.backbone.image_size, train=False)

    @property
    def classnames(self) -> list[str]:
        return self.info["classnames"]

    def rule_for(self, classes: list[str]) -> str:
        """``seen`` when every class was trained on (or nothing was trained), else ``unseen``."""
        trained = self.method.trained_classnames
        return "seen" if trained is None or set(classes) <= set(trained) else "unseen"

    @torch.no_grad()
    def predict(self, images, classes: list[str] | None = None, topk: int | None = None, template: str | None = None,
                rule: str | None = None) -> list[list[tuple[str, float]]]:
        """Top-``k`` ``(class name, probability)`` per image.

        Args:
            images: image paths, a folder, PIL images, or a ``(B, 3, H, W)`` normalised tensor.
            classes: class names to choose from (default: the run's training classes).
            topk: how many labels per image (default: 5, or all classes when fewer; at least 1; more than
                the classes is clamped, with a warning).
            template: prompt template (default: the run's).
            rule: inference rule ``seen`` / ``unseen`` / ``any``; default: chosen from ``classes`` (see module).
        """
        classes = self.classnames if classes is None else list(classes)
        if not classes:
            raise ConfigError("no class names given; pass at least one class (or none at all for the run's own)")
        topk = min(5, len(classes)) if topk is None else topk
        if not isinstance(topk, int) or topk < 1:
            raise ConfigError(f"topk = {topk!r}; expected an integer >= 1")
        if topk > len(classes):
            log.warning("topk = %d is more than the %d classes; showing all %d", topk, len(classes), len(classes))
        space = LabelSpace(tuple(classes), (template or self.info["template"],))
        rule = check_rule(rule or self.rule_for(classes))
        self.method.check_classnames(classes, rule)
        self.method.set_label_space(space)
        batch = images if isinstance(images, torch.Tensor) else torch.stack([self.transform(i) for i in _open(images)])
        device = next(self.method.backbone.parameters()).device
        probs = self.method.predict(batch.to(device), rule=rule).softmax(dim=-1)
        values, indices = probs.topk(min(topk, len(classes)), dim=-1)
        return [[(classes[i], float(v)) for v, i in zip(row_v, row_i)] for row_v, row_i in zip(values, indices)]


def image_paths(inputs) -> list[Path]:
    """Expand folders into their image files (sorted); keep files as given."""
    paths = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            paths.append(path)
        else:
            raise DataError(f"image {path} does not exist")
    if not paths:
        raise DataError(f"no images found in {[str(i) for i in inputs]}")
    return paths


def _open(images) -> list[Image.Image]:
    if isinstance(images, (str, Path)):
        images = [images]
    if all(isinstance(i, Image.Image) for i in images):
        return [to_rgb(i, f"image {k}") for k, i in enumerate(images)]
    return [open_image(p) for p in image_paths(images)]


def open_image(path: str | Path) -> Image.Image:
    """An image file as RGB, or a one-line :class:`DataError` naming it (not an image, truncated, ...)."""
    try:
        return load_rgb(str(path))
    except DataError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from None


def open_images(paths: list[Path]) -> tuple[list[Path], list[Image.Image], dict[Path, str]]:
    """The readable images of ``paths`` and, for the others, why they were skipped."""
    kept, images, skipped = [], [], {}
    for path in paths:
        try:
            images.append(open_image(path))
            kept.append(path)
        except DataError as exc:
            skipped[path] = str(exc)
    return kept, images, skipped


def load(run_dir: str | Path, clip: str | Path | None = None, device: str | torch.device = "cpu") -> Predictor:
    """Rebuild the method of a finished run folder.

    Args:
        run_dir: a run folder written by ``alignednorm train`` / ``run``.
        clip: the backbone checkpoint, when it moved since training (its SHA-256 must match).
        device: where to run.
    """
    return Predictor(load_run(run_dir, clip=clip, device=device))
