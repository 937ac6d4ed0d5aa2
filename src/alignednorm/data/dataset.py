"""A torch ``Dataset`` over a list of :class:`Item` and the class-name prompts built from a template."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from alignednorm.engine.batches import SkippedImage
from alignednorm.errors import DataError

from .items import Item

logger = logging.getLogger(__name__)


# Modes whose samples are wider than 8 bits: Pillow's own convert("RGB") clips them at 255, so a
# 16-bit PNG would read as all white and a 0..1 float image as black.
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa")


def to_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    """Convert a PIL image of any mode to 8-bit RGB with its values scaled to 0..255.

    The rules, by mode:

    * ``I;16`` (and ``I;16B/L/N``): 16-bit samples, 0..65535 scaled to 0..255.
    * ``I`` (32-bit int, e.g. a 16-bit PGM): no declared depth, so the smallest standard one that
      holds every sample is used: 0..255 as they are, 0..65535 scaled like ``I;16``.
    * ``F`` (float): 0..1 scaled by 255 (the float image convention), else 0..255 as they are.
    * ``I``/``F`` samples outside those ranges (negative, above 65535 / 255, NaN) raise
      :class:`DataError`: any stretch would be a guess that changes what the model sees.
    * Alpha (``RGBA``, ``LA``, ``PA``, palette or colour-key transparency): composited over
      white, as a viewer shows it; the colour stored under a transparent pixel is arbitrary.
    * Everything else (``L``, ``1``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ...): Pillow's
      conversion. Embedded ICC profiles are not applied, as in the reference pipeline.

    Raises:
        DataError: naming ``name``, for ``I``/``F`` samples outside the ranges above.
    """
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        image = _scaled_to_8bit(image, name)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _scaled_to_8bit(image: Image.Image, name: str) -> Image.Image:
    """A grey ``L`` image from a 16-bit, 32-bit int or float one, by the rules of :func:`to_rgb`."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode in _SIXTEEN_BIT_MODES:
        scale = 255 / 65535
    else:
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if not (np.isfinite(low) and np.isfinite(high)):
            raise DataError(f"{name}: {image.mode} image with NaN or infinite samples; expected finite values")
        # (largest sample, scale) of each accepted range, narrowest first.
        ranges = ((1.0, 255.0), (255.0, 1.0)) if image.mode == "F" else ((255.0, 1.0), (65535.0, 255 / 65535))
        scale = next((factor for top, factor in ranges if high <= top), None)
        if low < 0 or scale is None:
            expected = "0..1 or 0..255" if image.mode == "F" else "0..255 (8-bit) or 0..65535 (16-bit)"
            raise DataError(f"{name}: {image.mode} image with samples from {low:g} to {high:g}; expected "
                            f"{expected}; convert it to an 8- or 16-bit image")
    return Image.fromarray(np.rint(values * scale).clip(0, 255).astype(np.uint8))


def load_rgb(path: str) -> Image.Image:
    """Open an image and decode it fully as 8-bit RGB (see :func:`to_rgb` for each mode).

    Decoding happens here, so a truncated file fails here and not later.
    """
    with Image.open(path) as image:
        return to_rgb(image, str(path))


class ImageListDataset(Dataset):
    """Images of ``items`` as ``(transform(image), label)`` pairs.

    Args:
        items: the images and labels.
        transform: applied to the RGB PIL image; None returns the image itself. A transform with
            ``plan``/``augment`` (:class:`~alignednorm.data.transforms.TrainAugmentation`) is applied with
            the plan that comes with the index: ``dataset[(index, plan)]`` (see :meth:`plan`).
        skip_corrupt: when False, an unreadable image raises a :class:`DataError` naming it; when
            True, a :class:`SkippedImage` is returned instead, which the loaders drop from the batch and
            count in ``skipped`` (``engine.batches``).
    """

    def __init__(self, items: Sequence[Item], transform: Callable | None = None, skip_corrupt: bool = False):
        self.items = list(items)
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self.skipped: set[str] = set()
        self.decoded: list[Image.Image | None] | None = None  # see preload()
        self._sizes: dict[int, tuple[int, int] | None] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index):
        index, plan = index if isinstance(index, tuple) else (index, None)
        if not -len(self.items) <= index < len(self.items):
            # Plain iteration over a Dataset stops at IndexError, so never wrap an out-of-range index.
            raise IndexError(f"index {index} out of range for {len(self.items)} images")
        image = self._image(index)
        if isinstance(image, SkippedImage):
            return image
        if self.transform is None:
            return image, self.items[index].label
        out = self.transform.augment(image, plan) if plan is not None else self.transform(image)
        return out, self.items[index].label

    def _image(self, index: int):
        if self.decoded is not None:
            image = self.decoded[index]
            return SkippedImage(self.items[index].impath) if image is None else image
        item = self.items[index]
        try:
            return load_rgb(item.impath)
        except (OSError, ValueError, Image.DecompressionBombError, DataError) as exc:
            if not self.skip_corrupt:
                # to_rgb's own errors already name the file and what was expected.
                problem = str(exc) if isinstance(exc, DataError) else f"cannot read image {item.impath} ({exc})"
                raise DataError(f"{problem}; expected a readable image file, "
                                "or pass --skip-corrupt to skip unreadable images and count them") from None
            logger.warning("skipping unreadable image %s (%s)", item.impath, exc)
            self.skipped.add(item.impath)
            return SkippedImage(item.impath)  # dropped by the loaders, so accuracies count only readable images

    def image_size(self, index: int) -> tuple[int, int] | None:
        """``(width, height)`` of an image (its header is read once), None when unreadable."""
        if index not in self._sizes:
            if self.decoded is not None:
                image = self.decoded[index]
                self._sizes[index] = None if image is None else image.size
            else:
                try:
                    with Image.open(self.items[index].impath) as image:
                        self._sizes[index] = image.size
                except (OSError, ValueError, Image.DecompressionBombError):
                    self._sizes[index] = None
        return self._sizes[index]

    def plan(self, index: int, generator):
        """The random augmentation of one sample drawn from ``generator``; the loader passes ``(index, plan)``.

        Only for a transform with ``plan``; an unreadable image draws nothing (it is skipped when read).
        """
        size = self.image_size(index)
        return None if size is None else self.transform.plan(*size, generator)

    @property
    def plannable(self) -> bool:
        return hasattr(self.transform, "plan")

    def decoded_megabytes(self) -> float:
        """Memory the decoded RGB images would take (from their headers)."""
        sizes = [self.image_size(i) for i in range(len(self))]
        return sum(w * h * 3 for w, h in filter(None, sizes)) / 2**20

    def preload(self, budget_mb: float, workers: int = 0) -> bool:
        """Decode every image once and keep it in memory when they fit in ``budget_mb``; returns whether it did.

        The transform then works on the kept pixels: the same images, so the same numbers, without a
        decode per epoch. Unreadable images are found (and skipped or refused) here.
        """
        if self.decoded is not None:
            return True
        if budget_mb <= 0 or self.decoded_megabytes() > budget_mb:
            return False
        raw = ImageListDataset(self.items, None, self.skip_corrupt)
        if workers:
            from torch.utils.data import DataLoader  # the decode itself in parallel; the order is kept

            from alignednorm.engine.batches import worker_errors_in_one_line

            with worker_errors_in_one_line():
                loaded = list(DataLoader(raw, batch_size=None, num_workers=workers))
        else:
            loaded = [raw[i] for i in range(len(raw))]
        self.decoded = [None if isinstance(x, SkippedImage) else x[0] for x in loaded]
        self.skipped.update(x.path for x in loaded if isinstance(x, SkippedImage))
        self._sizes.clear()
        return True

    @property
    def num_skipped(self) -> int:
        """How many distinct images were found unreadable and skipped so far."""
        return len(self.skipped)


def class_prompts(classnames: Sequence[str], template: str) -> list[str]:
    """One prompt per class: ``template`` (with ``{}``) filled with the name, underscores as spaces."""
    return [template.format(name.replace("_", " ")) for name in classnames]
