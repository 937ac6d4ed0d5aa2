"""The data path (issue #32): workers never change a number; planned augmentation equals torchvision's draws."""

import pytest
import torch
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, RandomSampler
from tqdm.auto import tqdm

from alignednorm.backbone.clip import ClipBackbone
from alignednorm.backbone.tiny import make_tiny_clip
from alignednorm.data import ImageListDataset, Item, TrainAugmentation, build_transform
from alignednorm.engine.batches import EpochBatches, default_workers, resolve_workers
from alignednorm.engine.trainer import TrainConfig, Trainer
from alignednorm.methods import create_method


def _image(path, width, height, shade):
    gen = torch.Generator().manual_seed(shade)
    pixels = (torch.rand(height, width, 3, generator=gen) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(path)
    return str(path)


@pytest.fixture
def images(tmp_path):
    # odd shapes included: very wide and very tall images reach torchvision's central fallback
    sizes = [(40, 30), (30, 40), (64, 64), (200, 12), (12, 200), (33, 57), (48, 36), (36, 48)]
    return [Item(_image(tmp_path / f"{k}.png", w, h, k), k % 2, "ab"[k % 2]) for k, (w, h) in enumerate(sizes)]


@pytest.mark.parametrize("crop, hflip, scale", [(True, True, (0.08, 1.0)), (True, False, (0.5, 1.0)),
                                                (False, True, (0.5, 1.0)), (False, False, (0.5, 1.0))])
def test_planned_augmentation_equals_torchvision(images, crop, hflip, scale):
    """Planned from a generator seeded like torch's global RNG: the unsplit transform's pixels, draw for draw."""
    reference = build_transform(16, train=True, crop_scale=scale, hflip=hflip, random_resized_crop=crop)
    augmentation = TrainAugmentation(16, crop_scale=scale, hflip=hflip, random_resized_crop=crop)
    data = ImageListDataset(images, augmentation)
    order = [k % len(images) for k in range(3 * len(images))]
    for seed in range(3):
        torch.manual_seed(seed)
        expected = [reference(Image.open(images[k].impath).convert("RGB")) for k in order]
        generator = torch.Generator().manual_seed(seed)
        got = [data[(k, data.plan(k, generator))][0] for k in order]
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
        torch.manual_seed(seed)  # called plainly it draws from torch's RNG, as torchvision
        assert all(torch.equal(augmentation(Image.open(images[k].impath).convert("RGB")), e)
                   for k, e in zip(order, expected))


@pytest.mark.parametrize("size, batch", [(10, 4), (3, 4), (16, 16), (17, 5)])
def test_epoch_order_is_that_of_earlier_versions(size, batch):
    """EpochBatches keeps the order the per-epoch DataLoader of earlier versions drew for a seed."""
    for seed, epoch in ((1, 0), (1, 3), (7, 2)):
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        old = BatchSampler(RandomSampler(range(size), generator=generator), batch, drop_last=size >= batch)
        # the old trainer iterated its loader through tqdm.auto, which makes one iterator more
        expected = list(tqdm(DataLoader(range(size), batch_sampler=old, generator=generator, collate_fn=lambda b: b),
                             disable=True))
        batches = EpochBatches(size, batch, seed)
        batches.set_epoch(epoch)
        assert list(batches) == expected and len(batches) == len(expected)


def test_default_workers():
    assert default_workers("cuda", cpus=16) == 8 and default_workers("cuda", cpus=4) == 3
    assert default_workers("cuda", cpus=1) == 0
    assert default_workers("cpu", cpus=2) == 0 and default_workers("cpu", cpus=8) == 2
    assert default_workers("cpu", cpus=64) == 4
    assert resolve_workers(3, "cpu") == 3 and resolve_workers(-1, "cpu") == default_workers("cpu")


def _train(images, workers: int, decoded: bool):
    torch.manual_seed(0)
    backbone = ClipBackbone(make_tiny_clip(seed=3, layers=2))
    method = create_method("coop", backbone, {"n_ctx": 2})
    method.set_classnames(["a", "b"])
    data = ImageListDataset(images, TrainAugmentation(backbone.image_size, crop_scale=(0.3, 1.0)))
    if decoded:
        assert data.preload(budget_mb=16, workers=workers) and data.decoded is not None
    trainer = Trainer(method, TrainConfig(epochs=2, batch_size=3, warmup_epochs=0, lr=0.05, optimizer="sgd",
                                          tensorboard=False), progress=False, workers=workers)
    stats = trainer.fit(data)
    return stats["loss"], method.learnable_state_dict()


def test_training_is_identical_for_any_worker_count_and_decoded_images(images):
    """0 or 2 workers, read every epoch or decoded once and kept: the same losses and learned values."""
    loss, state = _train(images, workers=0, decoded=False)
    for workers, decoded in ((2, False), (0, True), (2, True)):
        other_loss, other = _train(images, workers, decoded)
        assert other_loss == loss, (workers, decoded)
        assert all(torch.equal(state[k], other[k]) for k in state), (workers, decoded)


def test_preload_respects_its_budget(images):
    data = ImageListDataset(images, None)
    assert data.decoded_megabytes() == pytest.approx(sum(w * h * 3 for w, h in
                                                         (data.image_size(k) for k in range(len(data)))) / 2**20)
    assert not data.preload(budget_mb=0) and data.decoded is None
    assert not data.preload(budget_mb=data.decoded_megabytes() / 2) and data.decoded is None
    assert data.preload(budget_mb=1) and all(isinstance(image, Image.Image) for image in data.decoded)


def test_mini_world_run_is_identical_with_workers(tmp_path):
    """A base-to-new run on the mini world, trained and evaluated with 0 and with 2 loader workers."""
    from alignednorm.mini import generate_world, mini_clip_path
    from alignednorm.protocols import expand
    from alignednorm.protocols.runner import SweepRequest, run_job

    generate_world(tmp_path / "data", names=["mini_shapes"])
    metrics = {}
    for workers in (0, 2):
        request = SweepRequest("mmrlpp", str(tmp_path / "data"), str(mini_clip_path()), str(tmp_path / f"w{workers}"),
                               suite="mini", datasets=("mini_shapes",), seeds=(1,), device="cpu", progress=False,
                               sets=("train.epochs=2", "train.tensorboard=false", f"data.num_workers={workers}",
                                     "data.decoded_cache_mb=0"))
        (job,) = expand("base2new", request)
        result = run_job(job)["mini_shapes"]["eval"]
        metrics[workers] = {name: (r["accuracy"], r["per_class_accuracy"]) for name, r in result.items()}
    assert metrics[0] == metrics[2] and set(metrics[0]) == {"base", "new"}


def test_loader_settings_follow_the_device(images):
    """Pinned memory and workers kept across epochs on CUDA only (building a loader touches no GPU)."""
    from alignednorm.engine.batches import image_batches

    data = ImageListDataset(images, TrainAugmentation(16))
    for device, expected in (("cuda", True), ("cpu", False)):
        loader = image_batches(data, workers=2, device=device, batch_sampler=EpochBatches(len(data), 2, 1, data.plan),
                               persistent=True).loader
        assert loader.pin_memory is expected and loader.persistent_workers is expected and loader.num_workers == 2
    assert not image_batches(data, workers=0, device="cuda", batch_size=4, persistent=True).loader.persistent_workers
