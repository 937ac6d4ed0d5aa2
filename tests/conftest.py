"""Shared fixtures: tiny CLIPs and the location of ../shared."""

from pathlib import Path

import pytest
import torch

from alignednorm.backbone.clip import ClipBackbone
from alignednorm.backbone.tiny import make_tiny_clip

SHARED = Path(__file__).resolve().parents[2] / "shared"

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} (the project's shared/ folder beside the repo) is not present")
    return SHARED


@pytest.fixture(scope="session")
def tiny_clip():
    return make_tiny_clip(seed=0, layers=3, width=64)


@pytest.fixture(scope="session")
def tiny_backbone(tiny_clip) -> ClipBackbone:
    return ClipBackbone(tiny_clip)


# --- data fixtures ---
# Tiny datasets in the real DATA_ROOT layouts (real image files, real split files), built per test
# in tmp_path so tests may break them. Each fixture returns a SimpleNamespace with `root` (the
# data root), `spec` (a catalog spec with the class count of the tiny data) and layout details.

import dataclasses
import json
from types import SimpleNamespace

from PIL import Image

from alignednorm.data.catalog import get_dataset


def write_image(path: Path, shade: int = 0) -> Path:
    """Write a real 8x8 image; the suffix (.jpg/.png/.JPEG) picks the format."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (shade % 256, 40, 200)).save(path)
    return path


def self_parity_fixture(fixture: Path, manifest: dict, method, prompts: list[str], images, labels) -> dict:
    """Complete a held-back-like fixture with our own outputs and run parity on it; returns those outputs.

    For the tests that change a shared fixture's settings: the fixture folder holds the manifest and CLIP;
    this writes the method's start values, the inputs and the outputs computed from them, so parity
    checks that every setting is read from the manifest (not the official numbers).
    """
    from safetensors.torch import save_file

    from alignednorm.compat.parity import compute_outputs, run_parity

    save_file({"prompt_learner.ctx": method.context.ctx.detach().clone()}, str(fixture / "learnable.safetensors"))
    save_file({"images": images, "labels": labels, "tokenized_prompts": method.backbone.tokenize(prompts)},
              str(fixture / "inputs.safetensors"))
    ours = compute_outputs(fixture, manifest)
    save_file({k: v.detach().clone().contiguous() for k, v in ours.items() if not k.startswith("tokens.")},
              str(fixture / "outputs.safetensors"))
    report = run_parity(fixture)
    assert report["ok"] and report["failed"] == []
    return ours


@pytest.fixture
def data_root(tmp_path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    return root


@pytest.fixture
def json_dataset(data_root) -> SimpleNamespace:
    """An OxfordPets-style split_json dataset: 5 classes, train grouped but not in label order."""
    spec = dataclasses.replace(get_dataset("oxford_pets"), num_classes=5)
    image_dir = data_root / spec.folder / spec.image_root
    names = ["abyssinian", "american_bulldog", "beagle", "boxer", "chihuahua"]
    train_sizes = {2: 6, 0: 5, 1: 4, 4: 3, 3: 2}  # label -> count, in file order
    split = {"train": [], "val": [], "test": []}
    for label, count in train_sizes.items():
        split["train"] += [[f"{names[label]}_{i}.jpg", label, names[label]] for i in range(count)]
    for label in range(5):
        split["val"] += [[f"{names[label]}_val{i}.png", label, names[label]] for i in range(2)]
        split["test"] += [[f"sub/{names[label]}_test{i}.jpg", label, names[label]] for i in range(2)]
    for i, (relpath, _, _) in enumerate(split["train"] + split["val"] + split["test"]):
        write_image(image_dir / relpath, i)
    split_path = data_root / spec.folder / spec.split_file
    split_path.write_text(json.dumps(split, indent=4))
    return SimpleNamespace(root=data_root, spec=spec, split=split, split_path=split_path, image_dir=image_dir,
                           names=names)


@pytest.fixture
def imagenet_dataset(data_root) -> SimpleNamespace:
    """An ImageNet-style folder: 3 wnid classes (classnames.txt lists one more), train + val."""
    spec = dataclasses.replace(get_dataset("imagenet"), num_classes=3)
    folder = data_root / spec.folder
    names = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark", "n09999999": "unused"}
    folder.mkdir()
    (folder / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in names.items()))
    wnids = ["n01484850", "n01440764", "n01443537"]  # created out of order on purpose
    for k, wnid in enumerate(wnids):
        for i in range(k + 2):
            write_image(folder / "images" / "train" / wnid / f"{wnid}_{i:04d}.JPEG", i)
        write_image(folder / "images" / "val" / wnid / f"ILSVRC2012_val_{k:08d}.JPEG", k)
    (folder / "images" / "train" / wnids[0] / ".DS_Store").write_text("hidden")
    return SimpleNamespace(root=data_root, spec=spec, folder=folder, names=names)


@pytest.fixture
def aircraft_dataset(data_root) -> SimpleNamespace:
    """An FGVC-Aircraft folder: variants.txt + images_variant_{train,val,test}.txt + images/<id>.jpg."""
    spec = dataclasses.replace(get_dataset("fgvc_aircraft"), num_classes=3)
    folder = data_root / spec.folder
    variants = ["707-320", "A300B4", "F/A-18"]
    folder.mkdir()
    (folder / "variants.txt").write_text("\n".join(variants) + "\n")
    image_id = 1000000
    for split, per_class in (("train", 3), ("val", 1), ("test", 2)):
        lines = []
        for variant in variants:
            for _ in range(per_class):
                image_id += 1
                write_image(folder / "images" / f"{image_id}.jpg", image_id)
                lines.append(f"{image_id} {variant}")
        (folder / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
    return SimpleNamespace(root=data_root, spec=spec, folder=folder, variants=variants)


@pytest.fixture
def variant_datasets(data_root) -> SimpleNamespace:
    """ImageNet-A (wnid folders + README.txt) and ImageNetV2 (folders 0..2) test-only datasets."""
    lines = "n01440764 tench\nn01443537 goldfish\nn01484850 great white shark\n"
    spec_a = dataclasses.replace(get_dataset("imagenet_a"), num_classes=2)
    image_dir_a = data_root / spec_a.folder / spec_a.image_root
    for wnid, count in (("n01484850", 2), ("n01443537", 3)):
        for i in range(count):
            write_image(image_dir_a / wnid / f"{i}.jpg", i)
    (image_dir_a / "README.txt").write_text("ImageNet-A readme")
    (data_root / spec_a.folder / "classnames.txt").write_text(lines)
    spec_v2 = dataclasses.replace(get_dataset("imagenetv2"), num_classes=3)
    image_dir_v2 = data_root / spec_v2.folder / spec_v2.image_root
    for label in range(3):
        write_image(image_dir_v2 / str(label) / f"img{label}.jpeg", label)
    (data_root / spec_v2.folder / "classnames.txt").write_text(lines)
    return SimpleNamespace(root=data_root, a=spec_a, v2=spec_v2, image_dir_a=image_dir_a)


@pytest.fixture(scope="session")
def tensorboard_scalars():
    """Read a TensorBoard folder as ``{tag: [(step, value), ...]}`` (purged steps already dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def read(folder: Path) -> dict[str, list[tuple[int, float]]]:
        events = EventAccumulator(str(folder))
        events.Reload()
        return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}

    return read


@pytest.fixture(autouse=True)
def _restore_progress_logger():
    """CLI commands route ``alignednorm.progress`` to stderr outside a terminal: undo it after each test."""
    import logging

    logger = logging.getLogger("alignednorm.progress")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    yield
    logger.handlers[:], logger.propagate, logger.level = saved[0], saved[1], saved[2]
