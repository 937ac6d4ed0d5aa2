"""Few-shot sampling that picks exactly the items Dassl's sampler picks, plus a JSON cache.

Dassl (``DatasetBase.generate_fewshot_dataset``, used by CoOp, MaPLe, PromptSRC and MMRL) groups a
list by label in order of first appearance and draws ``random.sample(group, K)`` per label from
Python's global ``random``, seeded with the run seed just before: first K shots of the train list,
then ``min(K, 4)`` shots of the val list from the same stream. A private ``random.Random(seed)``
produces the same stream, so the published few-shot subsets are reproduced without touching global
state. Run ``python -m alignednorm.data.fewshot SPLIT_JSON --shots K --seed S`` to print a sample.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import random
import secrets
import sys
from collections.abc import Sequence

from alignednorm.errors import DataError

from .coop_layout import read_split_json
from .items import DatasetSplits, Item

logger = logging.getLogger(__name__)

_CACHE_FORMAT = "alignednorm-fewshot-v1"
# Dassl caps the few-shot validation set at 4 shots per class.
_MAX_VAL_SHOTS = 4


def sample_few_shot_indices(items: Sequence[Item], num_shots: int, rng: random.Random,
                            split: str = "train") -> list[int]:
    """Positions in ``items`` of Dassl's ``num_shots``-per-class sample.

    Args:
        items: the list to sample from; its order matters (it fixes the label order and what
            ``rng.sample`` picks).
        num_shots: K, the number of items kept per label.
        rng: the random stream; ``rng.sample`` is called once per label with at least K items.
        split: the split ``items`` come from, named in the warning about too-small classes.

    Returns:
        Indices into ``items``, grouped by label in first-occurrence order.
    """
    groups: dict[int, list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(item.label, []).append(index)
    chosen: list[int] = []
    short = []
    for label, group in groups.items():
        if len(group) >= num_shots:
            # Sampling positions consumes the stream exactly as sampling the items themselves.
            chosen += rng.sample(group, num_shots)
        else:
            short.append(f"class {label} ({items[group[0]].classname}) has {len(group)} images")
            chosen += group
    if short:  # one line, however many classes
        logger.warning("%s split: %s%s, fewer than %d shots: keeping all of them", split, "; ".join(short[:3]),
                       f" (and {len(short) - 3} more classes)" if len(short) > 3 else "", num_shots)
    return chosen


def sample_few_shot(items: Sequence[Item], num_shots: int, rng: random.Random) -> list[Item]:
    """Dassl's ``num_shots``-per-class sample of ``items`` (all items when ``num_shots < 1``)."""
    if num_shots < 1:
        return list(items)
    return [items[i] for i in sample_few_shot_indices(items, num_shots, rng)]


def few_shot_indices(splits: DatasetSplits, num_shots: int, seed: int) -> dict[str, list[int] | None]:
    """Indices into ``splits.train`` and ``splits.val`` of the few-shot subsets for ``seed``.

    ``val`` is None when the dataset's validation list is its test set (ImageNet), which Dassl
    leaves whole.
    """
    rng = random.Random(seed)
    train = sample_few_shot_indices(splits.train, num_shots, rng)
    if splits.val_is_test:
        return {"train": train, "val": None}
    val_shots = min(num_shots, _MAX_VAL_SHOTS)  # Dassl's cap
    return {"train": train, "val": sample_few_shot_indices(splits.val, val_shots, rng, split="validation")}


def few_shot_splits(splits: DatasetSplits, num_shots: int, seed: int,
                    cache_dir: str | os.PathLike | None = None) -> DatasetSplits:
    """The K-shot train and ``min(K, 4)``-shot val subsets Dassl draws for ``seed``; test is kept.

    Args:
        splits: the full (all-class) splits; base/new subsampling comes after this.
        num_shots: K; below 1 the splits are returned unchanged (Dassl's "use all data").
        seed: the run seed.
        cache_dir: where to keep ``<dataset>/shot_K-seed_S.json``; reused when it was made from
            the same dataset, shots, seed and full split. Never inside the dataset folder.

    Raises:
        DataError: when ``cache_dir`` lies inside the dataset folder.
    """
    if num_shots < 1:
        return splits
    path = _cache_path(splits, num_shots, seed, cache_dir) if cache_dir is not None else None
    if path is not None:
        cached = _read_cache(path, splits, num_shots, seed)
        if cached is not None:
            return cached
    indices = few_shot_indices(splits, num_shots, seed)
    train = [splits.train[i] for i in indices["train"]]
    val = splits.val if indices["val"] is None else [splits.val[i] for i in indices["val"]]
    result = dataclasses.replace(splits, train=train, val=val)
    if path is not None:
        _write_cache(path, result, splits, num_shots, seed)
    return result


def _cache_path(splits: DatasetSplits, num_shots: int, seed: int, cache_dir: str | os.PathLike) -> str:
    cache_dir = os.path.abspath(os.fspath(cache_dir))
    if splits.dataset_dir is not None:
        dataset_dir = os.path.abspath(splits.dataset_dir)
        if os.path.commonpath([cache_dir, dataset_dir]) == dataset_dir:
            raise DataError(f"few-shot cache folder {cache_dir} is inside the dataset folder {dataset_dir}; "
                            "expected a folder outside the data (e.g. the run or cache folder)")
    return os.path.join(cache_dir, splits.name, f"shot_{num_shots}-seed_{seed}.json")


def _relpath(splits: DatasetSplits, impath: str) -> str:
    """``impath`` relative to the data root, so a cache survives moving the data folder."""
    return os.path.relpath(impath, splits.data_root) if splits.data_root else impath


def _abspath(splits: DatasetSplits, relpath: str) -> str:
    return os.path.normpath(os.path.join(splits.data_root, relpath)) if splits.data_root else relpath


def _fingerprint(splits: DatasetSplits) -> str:
    """A hash of the full train and val lists, so a cache made from another split is not reused."""
    digest = hashlib.sha256()
    for split in (splits.train, splits.val):
        for item in split:
            digest.update(f"{_relpath(splits, item.impath)}\t{item.label}\n".encode())
        digest.update(b"--\n")
    return digest.hexdigest()[:16]


def _cache_header(splits: DatasetSplits, num_shots: int, seed: int) -> dict:
    return {"format": _CACHE_FORMAT, "dataset": splits.name, "shots": num_shots, "seed": seed,
            "fingerprint": _fingerprint(splits)}


def _write_cache(path: str, result: DatasetSplits, full: DatasetSplits, num_shots: int, seed: int) -> None:
    """Write the chosen items atomically (temporary file + rename)."""
    payload = _cache_header(full, num_shots, seed)
    payload["train"] = [[_relpath(full, it.impath), it.label, it.classname] for it in result.train]
    payload["val"] = None if full.val_is_test else [[_relpath(full, it.impath), it.label, it.classname]
                                                    for it in result.val]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Named like engine.io's temp files (so its cleaner finds leftovers) and created with mode
    # 0666 less the umask, not mkstemp's 0600; engine.io itself would import torch here.
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _read_cache(path: str, full: DatasetSplits, num_shots: int, seed: int) -> DatasetSplits | None:
    """The cached subsets, or None (with a log line) when the cache is absent, stale or unreadable."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            payload = json.load(f)
        header = _cache_header(full, num_shots, seed)
        if any(payload.get(key) != value for key, value in header.items()):
            logger.info("few-shot cache %s was made from another split or setting; resampling", path)
            return None
        train = [Item(_abspath(full, p), int(label), name) for p, label, name in payload["train"]]
        val = full.val if payload["val"] is None else [Item(_abspath(full, p), int(label), name)
                                                       for p, label, name in payload["val"]]
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        logger.warning("few-shot cache %s is unreadable (%s); resampling", path, exc)
        return None
    logger.info("using few-shot cache %s", path)
    return dataclasses.replace(full, train=train, val=val)


def read_fewshot_index(path: str | os.PathLike) -> dict[str, list[tuple[str, int]]]:
    """Read a published few-shot index file (``{"train": {"data": [...]}, "val": {"data": [...]}}``).

    Returns:
        For ``train`` and ``val``, the ``(impath, label)`` pairs in file order; ``impath`` keeps the
        publisher's prefix, so compare by file name.

    Raises:
        DataError: when the file is missing or not in that format.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        return {split: [(d["impath"], int(d["label"])) for d in raw[split]["data"]] for split in ("train", "val")}
    except FileNotFoundError:
        raise DataError(f"few-shot index file {path} not found") from None
    except (ValueError, TypeError, KeyError) as exc:
        raise DataError(f"few-shot index file {path} is malformed ({exc!r}); expected "
                        '{"train": {"data": [{"impath", "label", "classname"}, ...]}, "val": {...}}') from None


def index_file_payload(splits: DatasetSplits, indices: dict[str, list[int] | None], image_dir: str) -> dict:
    """The published index-file format for ``indices``, with ``impath`` relative to ``image_dir``."""
    payload = {}
    for split in ("train", "val"):
        source, chosen = getattr(splits, split), indices[split]
        if chosen is None:
            continue
        data = [{"impath": os.path.relpath(source[i].impath, image_dir), "label": source[i].label,
                 "classname": source[i].classname} for i in chosen]
        payload[split] = {"data": data, "indices": chosen}
    return payload


def main(argv: Sequence[str] | None = None) -> int:
    """Print, as JSON, the few-shot items our sampler draws from a CoOp split file."""
    parser = argparse.ArgumentParser(prog="python -m alignednorm.data.fewshot", description=main.__doc__)
    parser.add_argument("split_json", help="a CoOp split_zhou_*.json file")
    parser.add_argument("--shots", type=int, required=True, help="K, shots per class (val uses min(K, 4))")
    parser.add_argument("--seed", type=int, required=True, help="the run seed")
    args = parser.parse_args(argv)
    # Paths are printed relative to the image root, so any folder serves as the root here.
    image_dir = os.path.dirname(os.path.abspath(args.split_json))
    try:
        splits = read_split_json(args.split_json, image_dir, check_files=False)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    payload = index_file_payload(splits, few_shot_indices(splits, args.shots, args.seed), image_dir)
    json.dump(payload, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
