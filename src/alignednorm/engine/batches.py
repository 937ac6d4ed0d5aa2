"""Batching shared by training and evaluation: worker processes, skipped images, seeded epochs.

Numbers never depend on how many worker processes load the images:

* the sample order of epoch ``e`` is drawn from a generator seeded by ``(seed, e)`` and the random
  augmentation of every sample is *planned* in the main process, in sample order, from a second
  generator seeded by ``(seed, e)`` (:class:`EpochBatches`); workers only decode and apply the plan,
  so 0, 2 or 8 workers give the same pixels in the same order;
* a dataset returns :class:`SkippedImage` for an unreadable image; :class:`Batches` drops it from
  its batch and records the path in the main process's ``dataset.skipped`` (a worker's own copy of
  the dataset would lose it).

The seeds and draws are those of the single-process loader of earlier versions, so a seed's runs keep
their numbers (for methods whose steps draw nothing from torch's global RNG; those now get their own
stream, no longer interleaved with the augmentation's).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from alignednorm.engine.cpus import usable_cpus
from alignednorm.errors import AlignedNormError

# Dassl's DATALOADER.NUM_WORKERS in the official configs (CoOp, CoCoOp, MaPLe, PromptSRC, MMRL++: 8).
OFFICIAL_WORKERS = 8


class SkippedImage(NamedTuple):
    """What a dataset returns for an image it could not read (under ``skip_corrupt``)."""

    path: str


def collate_readable(samples):
    """``(default_collate of the readable samples or None, [paths of the skipped ones])``."""
    skipped = [s.path for s in samples if isinstance(s, SkippedImage)]
    kept = [s for s in samples if s is not None and not isinstance(s, SkippedImage)]
    return (default_collate(kept) if kept else None), skipped


def default_workers(device: torch.device | str, cpus: int | None = None) -> int:
    """Loader worker processes when ``data.num_workers`` is ``-1`` (automatic).

    On a GPU the model waits on decoding: the official 8 workers, fewer when fewer CPUs are free
    (one stays with the training process). On a CPU the model and the workers share the cores, and
    ``alignednorm bench --data`` shows a worker paying off only where cores are to spare: one worker per
    four CPUs, at most 4 (none on a 2-core laptop).
    """
    cpus = usable_cpus() if cpus is None else cpus
    if torch.device(device).type == "cuda":
        return max(0, min(OFFICIAL_WORKERS, cpus - 1))
    return min(4, cpus // 4)


def resolve_workers(setting: int, device: torch.device | str) -> int:
    """``data.num_workers``: ``-1`` is :func:`default_workers`, any other value as given."""
    return default_workers(device) if setting < 0 else setting


class EpochBatches(Sampler):
    """The batches of one epoch, seeded by ``(seed, epoch)``; each index paired with its augmentation plan.

    Args:
        size: samples in the dataset.
        batch_size: samples per batch; the last, smaller batch is dropped when there is a full one
            (as Dassl: never an empty epoch).
        seed: the run's seed.
        plan: ``plan(index, generator) -> plan`` draws a sample's random augmentation; the batches
            then hold ``(index, plan)`` pairs. ``None`` yields plain indices (the dataset draws its
            own augmentation, from torch's global RNG, in whichever process loads it).
    """

    def __init__(self, size: int, batch_size: int, seed: int, plan: Callable | None = None):
        self.size, self.batch_size, self.seed, self.plan = size, batch_size, seed, plan
        self.drop_last = size >= batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> list[int]:
        """This epoch's sample order."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        # Earlier versions drew two loader worker seeds from this generator before the order (tqdm.auto
        # made a second loader iterator): kept, so a seed's order is unchanged.
        for _ in range(2):
            torch.empty((), dtype=torch.int64).random_(generator=generator)
        return torch.randperm(self.size, generator=generator).tolist()

    def augmentation_generator(self) -> torch.Generator:
        """The generator of this epoch's augmentation plans (the trainer seeds torch's RNG the same way)."""
        return torch.Generator().manual_seed(self.seed * 1_000 + self.epoch)

    def __iter__(self):
        order, draws = self.order(), self.augmentation_generator()
        for k in range(len(self)):
            batch = order[k * self.batch_size:(k + 1) * self.batch_size]
            yield batch if self.plan is None else [(i, self.plan(i, draws)) for i in batch]

    def __len__(self) -> int:
        full, rest = divmod(self.size, self.batch_size)
        return full if self.drop_last or not rest else full + 1


class Batches:
    """Iterate a loader built by :func:`image_batches`: ``(images, labels)`` per batch, ``None`` when all were skipped.

    Skipped images' paths are added to ``dataset.skipped`` here, in the main process.
    """

    def __init__(self, loader: DataLoader):
        self.loader = loader

    @property
    def dataset(self) -> Dataset:
        return self.loader.dataset

    @property
    def batch_size(self) -> int | None:
        return self.loader.batch_size or getattr(self.loader.batch_sampler, "batch_size", None)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next pass draws (a training loader's :class:`EpochBatches`)."""
        self.loader.batch_sampler.set_epoch(epoch)

    def __iter__(self):
        record = getattr(self.loader.dataset, "skipped", None)
        with worker_errors_in_one_line():
            for batch, skipped in self.loader:
                if skipped and record is not None:
                    record.update(skipped)
                yield batch


@contextlib.contextmanager
def worker_errors_in_one_line():
    """A project error raised in a loader worker comes back as its own one line, not the worker's traceback.

    (torch re-raises it in this process with "Caught X in DataLoader worker process N" and the
    worker's traceback as its message.)
    """
    try:
        yield
    except AlignedNormError as exc:
        text = str(exc)
        if "Original Traceback" not in text:
            raise
        last = re.compile(rf"^(?:[\w.]+\.)?{type(exc).__name__}: (.+)$")  # the traceback's last line
        original = next((m.group(1) for m in map(last.match, reversed(text.splitlines())) if m), None)
        if original is None:
            raise
        raise type(exc)(original) from None


def image_batches(dataset: Dataset, *, workers: int, device: torch.device | str, batch_size: int | None = None,
                  batch_sampler=None, persistent: bool = False) -> Batches:
    """A loader over ``dataset`` (in order, or by ``batch_sampler``) with ``workers`` processes.

    On CUDA the batches come in pinned memory, and with ``persistent`` the workers stay alive across
    the loader's passes (one training loader for every epoch). Worker seeds come from a fixed
    generator, so building a loader never draws from torch's global RNG.
    """
    cuda = torch.device(device).type == "cuda"
    return Batches(DataLoader(
        dataset, batch_size=batch_size if batch_sampler is None else 1, shuffle=False,
        batch_sampler=batch_sampler, num_workers=workers, collate_fn=collate_readable,
        pin_memory=cuda, persistent_workers=persistent and cuda and workers > 0,
        generator=torch.Generator().manual_seed(0)))
