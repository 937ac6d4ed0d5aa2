"""Few-shot sampling: parity with Dassl's sampler and with every published index file, and the cache."""

import json
import logging
import random
import shutil
import subprocess
import sys
from collections import defaultdict
from functools import cache
from pathlib import Path

import pytest

from alignednorm.data import (
    DatasetSplits,
    Item,
    few_shot_indices,
    few_shot_splits,
    get_dataset,
    load_splits,
    read_fewshot_index,
    read_split_json,
    sample_few_shot,
    sample_few_shot_indices,
)
from alignednorm.errors import DataError

COOP_SPLITS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "coop_splits"
INDEX_FILES = sorted(COOP_SPLITS.glob("fewshot_indices/*/shot_*-seed_*.json"))
INDEX_PARAMS = [pytest.param(p, id=f"{p.parent.name}/{p.stem}") for p in INDEX_FILES] or [
    pytest.param(None, marks=pytest.mark.skip(reason=f"{COOP_SPLITS} (shared/ beside the repo) is absent"))
]


@cache
def published_split(dataset: str) -> DatasetSplits:
    """The published split of ``dataset``, read without images under a stand-in image folder."""
    spec = get_dataset(dataset)
    return read_split_json(COOP_SPLITS / "splits" / spec.split_file, f"/data/{spec.folder}/{spec.image_root}",
                           check_files=False)


def shot_and_seed(path: Path) -> tuple[int, int]:
    shot, seed = path.stem.split("-")
    return int(shot.removeprefix("shot_")), int(seed.removeprefix("seed_"))


@pytest.mark.parametrize("index_file", INDEX_PARAMS)
def test_sampler_matches_published_index_file(index_file):
    splits = published_split(index_file.parent.name)
    shots, seed = shot_and_seed(index_file)
    ours = few_shot_splits(splits, shots, seed)
    published = read_fewshot_index(index_file)
    spec = get_dataset(index_file.parent.name)
    image_root = f"/data/{spec.folder}/{spec.image_root}/"
    for split in ("train", "val"):
        chosen = getattr(ours, split)
        assert len(chosen) == len(published[split])
        for item, (impath, label) in zip(chosen, published[split]):
            # The publisher's prefix differs; the path below the image root and the label must agree.
            assert impath.endswith("/" + item.impath.removeprefix(image_root)) and item.label == label
    raw = json.loads(index_file.read_text())
    if "indices" in raw["train"]:
        assert few_shot_indices(splits, shots, seed) == {"train": raw["train"]["indices"], "val": raw["val"]["indices"]}


def dassl_fewshot(items: list[Item], num_shots: int) -> list[Item]:
    """Dassl's procedure, restated: group by label (first occurrence), global ``random.sample`` per label."""
    tracker = defaultdict(list)
    for item in items:
        tracker[item.label].append(item)
    out = []
    for group in tracker.values():
        out.extend(random.sample(group, num_shots) if len(group) >= num_shots else group)
    return out


@pytest.fixture
def global_random():
    # Dassl's procedure uses the global stream; leave it as it was for other tests.
    state = random.getstate()
    yield random
    random.setstate(state)


def generated_split(seed: int = 123) -> DatasetSplits:
    """7 classes with 1..30 items, shuffled so labels are not grouped (like StanfordCars' test list)."""
    rng = random.Random(seed)
    sizes = {3: 30, 0: 17, 6: 9, 1: 4, 5: 2, 2: 1, 4: 12}
    def make(split):
        items = [Item(f"/d/{split}/{label}_{i}.jpg", label, f"c{label}")
                 for label, n in sizes.items() for i in range(n if split == "train" else max(1, n // 3))]
        rng.shuffle(items)
        return items
    train, val = make("train"), make("val")
    return DatasetSplits(train, val, list(val), [f"c{k}" for k in range(7)])


@pytest.mark.parametrize("shots", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 42])
def test_matches_dassl_global_random_procedure(shots, seed, global_random):
    splits = generated_split()
    global_random.seed(seed)
    expected_train = dassl_fewshot(splits.train, shots)
    expected_val = dassl_fewshot(splits.val, min(shots, 4))
    ours = few_shot_splits(splits, shots, seed)
    assert ours.train == expected_train and ours.val == expected_val and ours.test == splits.test


def test_hand_checked_sample(caplog):
    # Labels in first-occurrence order: 1 (positions 0, 2, 4), 0 (1, 3), 2 (5, only one item).
    items = [Item(f"/x/{i}.jpg", label, f"c{label}") for i, label in enumerate([1, 0, 1, 0, 1, 2])]
    # random.Random(0).sample([0, 2, 4], 2) == [2, 4], then .sample([1, 3], 2) == [1, 3].
    with caplog.at_level(logging.WARNING):
        assert sample_few_shot_indices(items, 2, random.Random(0)) == [2, 4, 1, 3, 5]
    assert "train split: class 2 (c2) has 1 images, fewer than 2 shots" in caplog.text
    assert sample_few_shot(items, 0, random.Random(0)) == items


def test_small_class_consumes_no_randomness():
    big = [Item(f"/a/{i}", 0, "a") for i in range(5)]
    small = [Item("/b/0", 1, "b")]
    assert sample_few_shot(small + big, 3, random.Random(7))[1:] == sample_few_shot(big, 3, random.Random(7))


def test_published_sampler_command(tmp_path):
    index_file = COOP_SPLITS / "fewshot_indices/eurosat/shot_4-seed_1.json"
    if not index_file.is_file():
        pytest.skip(f"{index_file} is absent")
    split_json = COOP_SPLITS / "splits/split_zhou_EuroSAT.json"
    command = [sys.executable, "-m", "alignednorm.data.fewshot", str(split_json), "--shots", "4", "--seed", "1"]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    ours, published = json.loads(done.stdout), json.loads(index_file.read_text())
    for split in ("train", "val"):
        assert ours[split]["indices"] == published[split]["indices"]
        for mine, theirs in zip(ours[split]["data"], published[split]["data"], strict=True):
            assert theirs["impath"] == "./data/eurosat/2750/" + mine["impath"]
            assert (mine["label"], mine["classname"]) == (theirs["label"], theirs["classname"])
    failed = subprocess.run(command[:3] + [str(tmp_path / "nope.json"), "--shots", "1", "--seed", "1"],
                            capture_output=True, text=True, check=False)
    assert failed.returncode == 2 and "nope.json not found" in failed.stderr


def test_read_fewshot_index_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_fewshot_index(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"train": []}')
    with pytest.raises(DataError, match="bad.json is malformed"):
        read_fewshot_index(tmp_path / "bad.json")


# --- the cache ---

def test_cache_written_relative_to_data_root_and_reused(json_dataset, tmp_path):
    cache = tmp_path / "cache"
    splits = load_splits(json_dataset.spec, json_dataset.root)
    first = few_shot_splits(splits, 2, 1, cache_dir=cache)
    path = cache / "oxford_pets" / "shot_2-seed_1.json"
    payload = json.loads(path.read_text())
    assert (payload["dataset"], payload["shots"], payload["seed"]) == ("oxford_pets", 2, 1)
    assert payload["train"][0][0].startswith("oxford_pets/images/")
    assert len(first.train) == 10 and len(first.val) == 10
    # A matching cache is read, not resampled: swap in other valid items and see them come back.
    payload["train"] = [["oxford_pets/images/beagle_5.jpg", 2, "beagle"]]
    path.write_text(json.dumps(payload))
    reused = few_shot_splits(splits, 2, 1, cache_dir=cache)
    assert reused.train == [Item(str(json_dataset.image_dir / "beagle_5.jpg"), 2, "beagle")]
    assert reused.val == first.val and reused.test == splits.test


def test_cache_survives_moving_the_data_root(json_dataset, tmp_path):
    cache = tmp_path / "cache"
    first = few_shot_splits(load_splits(json_dataset.spec, json_dataset.root), 4, 3, cache_dir=cache)
    moved = tmp_path / "moved"
    shutil.move(json_dataset.root, moved)
    again = few_shot_splits(load_splits(json_dataset.spec, moved), 4, 3, cache_dir=cache)
    assert [it.impath.replace(str(moved), str(json_dataset.root)) for it in again.train] == [
        it.impath for it in first.train]


def test_stale_or_garbled_cache_is_resampled(json_dataset, tmp_path):
    cache = tmp_path / "cache"
    splits = load_splits(json_dataset.spec, json_dataset.root)
    expected = few_shot_splits(splits, 2, 5)
    path = cache / "oxford_pets" / "shot_2-seed_5.json"
    path.parent.mkdir(parents=True)
    path.write_text("{garbled")
    assert few_shot_splits(splits, 2, 5, cache_dir=cache).train == expected.train
    fingerprint = json.loads(path.read_text())["fingerprint"]
    # A different full split (one image fewer) must not reuse the cache made from the old one.
    smaller = DatasetSplits(splits.train[1:], splits.val, splits.test, splits.classnames, name=splits.name,
                            data_root=splits.data_root, dataset_dir=splits.dataset_dir)
    assert few_shot_splits(smaller, 2, 5, cache_dir=cache).train == few_shot_splits(smaller, 2, 5).train
    assert json.loads(path.read_text())["fingerprint"] != fingerprint


def test_cache_refused_inside_dataset_folder(json_dataset):
    splits = load_splits(json_dataset.spec, json_dataset.root)
    with pytest.raises(DataError, match="is inside the dataset folder"):
        few_shot_splits(splits, 1, 1, cache_dir=json_dataset.root / "oxford_pets" / "split_fewshot")


def test_imagenet_keeps_val_as_test(imagenet_dataset, tmp_path):
    splits = load_splits(imagenet_dataset.spec, imagenet_dataset.root)
    few = few_shot_splits(splits, 2, 1, cache_dir=tmp_path / "cache")
    assert len(few.train) == 6 and few.val == few.test == splits.test
    assert few_shot_splits(splits, 2, 1, cache_dir=tmp_path / "cache") == few
    assert few_shot_splits(splits, -1, 1) is splits
