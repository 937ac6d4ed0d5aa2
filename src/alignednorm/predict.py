"""Use a trained prompt: ``alignednorm.load(run_dir).predict(images, classes)``.

A run folder holds everything needed: ``run.json`` (method, backbone file and SHA-256, class
names, template), ``config.yaml`` and ``learnable.safetensors``. Predictions use the unified
rule (fused logits for every image), since at prediction time nobody knows which classes are
"base".
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf
from PIL import Image

from alignednorm import data as D
from alignednorm.backbone.clip import ClipBackbone
from alignednorm.config import build
from alignednorm.engine.io import load_tensors
from alignednorm.engine.run import file_sha256
from alignednorm.errors import CheckpointError, DataError
from alignednorm.methods import Method, create_method

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class Predictor:
    """A trained method ready to classify images among any class names."""

    def __init__(self, method: Method, info: dict):
        self.method = method.eval()
        self.info = info
        self.transform = D.build_transform(method.backbone.image_size, train=False)
        if hasattr(method.config, "inference"):
            method.config.inference = "unified"

    @property
    def classnames(self) -> list[str]:
        return self.info["classnames"]

    @torch.no_grad()
    def predict(self, images, classes: list[str] | None = None, topk: int = 5,
                template: str | None = None) -> list[list[tuple[str, float]]]:
        """Top-``k`` ``(class name, probability)`` per image.

        Args:
            images: image paths, a folder, PIL images, or a ``(B, 3, H, W)`` normalised tensor.
            classes: class names to choose from (default: the run's training classes).
            topk: how many labels per image.
            template: prompt template (default: the run's).
        """
        classes = list(classes or self.classnames)
        self.method.check_classnames(classes, "all")
        self.method.set_classnames(classes, template or self.info["template"])
        batch = images if isinstance(images, torch.Tensor) else torch.stack([self.transform(i) for i in _open(images)])
        device = next(self.method.backbone.parameters()).device
        probs = self.method.predict(batch.to(device), subset="all").softmax(dim=-1)
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
        return [i.convert("RGB") for i in images]
    return [D.dataset.load_rgb(str(p)) for p in image_paths(images)]


def load(run_dir: str | Path, clip: str | Path | None = None, device: str | torch.device = "cpu") -> Predictor:
    """Rebuild the method of a finished run folder.

    Args:
        run_dir: a run folder written by ``alignednorm train`` / ``run``.
        clip: the backbone checkpoint, when it moved since training (its SHA-256 must match).
        device: where to run.
    """
    run_dir = Path(run_dir)
    info_path = run_dir / "run.json"
    if not info_path.is_file():
        raise CheckpointError(f"{run_dir} is not a run folder: {info_path.name} is missing")
    info = json.loads(info_path.read_text())
    clip_path = Path(clip or info["clip"])
    if not clip_path.is_file():
        raise CheckpointError(f"backbone {clip_path} (recorded in {info_path}) does not exist; pass clip=... / --clip")
    if file_sha256(clip_path) != info["clip_sha256"]:
        raise CheckpointError(f"backbone {clip_path} is not the one the run was trained with "
                              f"(SHA-256 differs from {info_path})")
    method_cfg, _, _ = build(info["method"], OmegaConf.load(run_dir / "config.yaml"))
    method = create_method(info["method"], ClipBackbone.from_file(clip_path, info.get("clip_model")), method_cfg)
    if method.learnable_parameters():
        method.load_learnable_state_dict(load_tensors(run_dir / "learnable.safetensors"),
                                         source=str(run_dir / "learnable.safetensors"))
        method.set_trained_classnames(info["classnames"], run_dir)
    return Predictor(method.to(device), info)
