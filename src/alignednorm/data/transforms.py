"""Image transforms of the CoOp-family methods (Dassl's ``random_resized_crop`` + flip, CLIP normalisation)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torchvision import transforms as T
from torchvision.transforms import functional as TF

_BICUBIC = T.InterpolationMode.BICUBIC


def build_transform(
    image_size: int,
    train: bool,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    hflip: bool = True,
    mean: Sequence[float] = OPENAI_DATASET_MEAN,
    std: Sequence[float] = OPENAI_DATASET_STD,
    random_resized_crop: bool = True,
) -> T.Compose:
    """The train or test transform of a PIL RGB image into a normalised ``(3, S, S)`` tensor.

    Args:
        image_size: S, the output side.
        train: random-resized crop (bicubic) + horizontal flip when True; otherwise resize of the
            shorter side to S (bicubic) + center crop.
        crop_scale: area range of the random-resized crop (train only).
        hflip: random horizontal flips (train only); off for data where left/right carries the label.
        mean: per-channel mean for normalisation (CLIP's by default).
        std: per-channel std for normalisation (CLIP's by default).
        random_resized_crop: the random-resized crop of training images; False resizes them to
            ``(S, S)`` instead (bicubic), Dassl's train transform when ``INPUT.TRANSFORMS`` has no
            crop (``['normalize']``: with ``hflip=False`` no augmentation at all).
    """
    bicubic = T.InterpolationMode.BICUBIC
    if train:
        # Dassl skips the plain resize when a random crop is used, so the crop works on the original.
        geometry = [T.RandomResizedCrop(image_size, scale=tuple(crop_scale), interpolation=bicubic)
                    if random_resized_crop else T.Resize((image_size, image_size), interpolation=bicubic)]
        geometry += [T.RandomHorizontalFlip()] if hflip else []
    else:
        geometry = [T.Resize(image_size, interpolation=bicubic), T.CenterCrop(image_size)]
    return T.Compose([*geometry, T.ToTensor(), T.Normalize(mean=tuple(mean), std=tuple(std))])


class ToNormalizedTensor:
    """``ToTensor`` then ``Normalize``, as the same tensor operations without their per-call set-up.

    torchvision's pair builds the mean and std tensors and checks the std on every image: half the time
    of a small image's augmentation. RGB images take the lean path (bitwise equal, tested); other modes, and
    a default dtype other than float32, the pair.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.reference = T.Compose([T.ToTensor(), T.Normalize(mean=tuple(mean), std=tuple(std))])

    def __call__(self, image) -> torch.Tensor:
        if getattr(image, "mode", None) != "RGB" or torch.get_default_dtype() != torch.float32:
            return self.reference(image)
        pixels = torch.from_numpy(np.array(image, np.uint8, copy=True)).permute(2, 0, 1).contiguous()
        return pixels.to(torch.float32).div(255).sub_(self.mean).div_(self.std)


class CropPlan(NamedTuple):
    """One training image's drawn augmentation: the crop box (torchvision's ``i, j, h, w``) and the flip."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


def plan_resized_crop(width: int, height: int, scale: Sequence[float], ratio: Sequence[float],
                      generator: torch.Generator | None) -> tuple[int, int, int, int]:
    """``RandomResizedCrop.get_params`` drawing from ``generator``: the same draws, in the same order."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        w = round(math.sqrt(target_area * aspect_ratio))
        h = round(math.sqrt(target_area / aspect_ratio))
        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, size=(1,), generator=generator).item()
            j = torch.randint(0, width - w + 1, size=(1,), generator=generator).item()
            return i, j, h, w
    in_ratio = width / height  # ten misses: torchvision's central fallback
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class TrainAugmentation:
    """:func:`build_transform`'s training transform, split into a draw and its application.

    ``plan(width, height, generator)`` draws what ``build_transform(train=True)`` draws from torch's
    global RNG (crop box, then flip), from ``generator`` instead; ``augment(image, plan)`` applies it.
    The main process plans every sample in order and any worker applies the plan, so the pixels do
    not depend on the number of workers; with the same generator state they equal the unsplit
    transform's (``tests/test_loading.py``).
    """

    def __init__(self, image_size: int, crop_scale: Sequence[float] = (0.08, 1.0), hflip: bool = True,
                 random_resized_crop: bool = True, mean: Sequence[float] = OPENAI_DATASET_MEAN,
                 std: Sequence[float] = OPENAI_DATASET_STD):
        self.image_size, self.crop_scale, self.hflip = image_size, tuple(crop_scale), hflip
        self.random_resized_crop = random_resized_crop
        self.ratio = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's default, as Dassl uses it
        self.resize = None if random_resized_crop else T.Resize((image_size, image_size), interpolation=_BICUBIC)
        self.finish = ToNormalizedTensor(mean, std)

    def plan(self, width: int, height: int, generator: torch.Generator | None) -> CropPlan | None:
        if not (self.random_resized_crop or self.hflip):
            return None  # nothing random: Dassl's ['normalize']
        box = plan_resized_crop(width, height, self.crop_scale, self.ratio, generator) \
            if self.random_resized_crop else (0, 0, height, width)
        flip = bool(torch.rand(1, generator=generator) < 0.5) if self.hflip else False
        return CropPlan(*box, flip)

    def __call__(self, image) -> torch.Tensor:
        """Draw from torch's global RNG and apply: exactly ``build_transform(train=True)``."""
        return self.augment(image, self.plan(*image.size, generator=None))

    def augment(self, image, plan: CropPlan | None) -> torch.Tensor:
        if self.resize is not None:
            image = self.resize(image)
        elif plan is not None:
            image = TF.resized_crop(image, plan.top, plan.left, plan.height, plan.width,
                                    [self.image_size, self.image_size], _BICUBIC, antialias=True)
        if plan is not None and plan.flip:
            image = TF.hflip(image)
        return self.finish(image)
