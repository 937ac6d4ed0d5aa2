"""A torch ``Dataset`` over a list of :class:`Item` and the class-name prompts built from a template."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from PIL import Image
from torch.utils.data import Dataset, default_collate

from alignednorm.errors import DataError

from .items import Item

logger = logging.getLogger(__name__)


def load_rgb(path: str) -> Image.Image:
    """Open an image and decode it fully as RGB, so a truncated file fails here and not later."""
    with Image.open(path) as image:
        return image.convert("RGB")


class ImageListDataset(Dataset):
    """Images of ``items`` as ``(transform(image), label)`` pairs.

    Args:
        items: the images and labels.
        transform: applied to the RGB PIL image; None returns the image itself.
        skip_corrupt: when False, an unreadable image raises a :class:`DataError` naming it; when
            True, the next readable item is returned instead and the bad path is added to
            ``skipped``. With a multi-worker ``DataLoader`` each worker keeps its own ``skipped``.
    """

    def __init__(self, items: Sequence[Item], transform: Callable | None = None, skip_corrupt: bool = False):
        self.items = list(items)
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self.skipped: set[str] = set()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        if not -len(self.items) <= index < len(self.items):
            # Plain iteration over a Dataset stops at IndexError, so never wrap an out-of-range index.
            raise IndexError(f"index {index} out of range for {len(self.items)} images")
        item = self.items[index]
        try:
            image = load_rgb(item.impath)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            if not self.skip_corrupt:
                raise DataError(f"cannot read image {item.impath} ({exc}); expected a readable image file, "
                                "or pass --skip-corrupt to skip unreadable images and count them") from None
            logger.warning("skipping unreadable image %s (%s)", item.impath, exc)
            self.skipped.add(item.impath)
            return None  # dropped by skip_none_collate, so accuracies count only readable images
        return (self.transform(image) if self.transform is not None else image), item.label

    @property
    def num_skipped(self) -> int:
        """How many distinct images were found unreadable and skipped so far."""
        return len(self.skipped)


def skip_none_collate(batch):
    """``default_collate`` without the ``None`` entries of skipped images; ``None`` if nothing is left."""
    batch = [sample for sample in batch if sample is not None]
    return default_collate(batch) if batch else None


def class_prompts(classnames: Sequence[str], template: str) -> list[str]:
    """One prompt per class: ``template`` (with ``{}``) filled with the name, underscores as spaces."""
    return [template.format(name.replace("_", " ")) for name in classnames]
