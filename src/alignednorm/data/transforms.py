"""Image transforms of the CoOp-family methods (Dassl's ``random_resized_crop`` + flip, CLIP normalisation)."""

from __future__ import annotations

from collections.abc import Sequence

from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torchvision import transforms as T


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
