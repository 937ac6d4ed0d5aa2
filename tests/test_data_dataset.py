"""Transforms, the image-list dataset (real JPEG/PNG files, corrupt files) and class prompts."""

import pytest
import torch
from open_clip import OPENAI_DATASET_MEAN
from PIL import Image
from torchvision import transforms as T

from alignednorm.data import ImageListDataset, Item, build_transform, class_prompts
from alignednorm.data.dataset import SkippedImage
from alignednorm.data.transforms import ToNormalizedTensor
from alignednorm.engine.batches import collate_readable, image_batches
from alignednorm.errors import DataError


def write(path, size=(40, 30), color=(250, 10, 10)):
    Image.new("RGB", size, color).save(path)
    return str(path)


def test_transforms_output_shape_and_normalisation(tmp_path):
    image = Image.open(write(tmp_path / "a.png")).convert("RGB")
    test_tf, train_tf = build_transform(16, train=False), build_transform(16, train=True, crop_scale=(0.5, 1.0))
    out = test_tf(image)
    assert out.shape == (3, 16, 16)
    # A flat colour stays flat; check the red channel against CLIP's normalisation.
    assert torch.allclose(out[0], torch.full((16, 16), (250 / 255 - OPENAI_DATASET_MEAN[0]) / 0.26862954), atol=2e-2)
    assert train_tf(image).shape == (3, 16, 16)
    names = [type(t).__name__ for t in train_tf.transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert train_tf.transforms[0].scale == (0.5, 1.0)
    assert [type(t).__name__ for t in test_tf.transforms][:2] == ["Resize", "CenterCrop"]
    assert test_tf.transforms[0].interpolation.value == "bicubic"


def test_lean_to_tensor_and_normalise_equals_torchvision_bit_for_bit():
    pixels = torch.randint(0, 256, (37, 23, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    rgb, grey = Image.fromarray(pixels.numpy()), Image.fromarray(pixels[:, :, 0].numpy(), "L")  # grey: torchvision's
    for image, mean, std in ((rgb, (0.1, 0.5, 0.9), (0.2, 0.3, 0.05)), (grey, (0.4,), (0.3,))):
        got, expected = ToNormalizedTensor(mean, std)(image), T.Compose([T.ToTensor(), T.Normalize(mean, std)])(image)
        assert got.dtype == expected.dtype and torch.equal(got, expected)


def test_dataset_reads_jpeg_png_and_grey(tmp_path):
    grey = tmp_path / "g.jpg"
    Image.new("L", (20, 20), 128).save(grey)
    items = [Item(write(tmp_path / "a.jpg"), 0, "a"), Item(write(tmp_path / "b.png"), 1, "b"), Item(str(grey), 2, "c")]
    data = ImageListDataset(items, build_transform(8, train=False))
    assert len(data) == 3
    pairs = list(data)
    assert [label for _, label in pairs] == [0, 1, 2] and all(t.shape == (3, 8, 8) for t, _ in pairs)
    with pytest.raises(IndexError):
        data[3]
    image, label = ImageListDataset(items)[1]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and label == 1


@pytest.fixture
def with_corrupt(tmp_path):
    good = write(tmp_path / "good.jpg")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes((tmp_path / "good.jpg").read_bytes()[:60])
    (tmp_path / "text.png").write_text("not an image")
    return [Item(str(truncated), 0, "a"), Item(str(tmp_path / "text.png"), 1, "b"), Item(good, 2, "c")]


def test_corrupt_image_raises_naming_the_path(with_corrupt):
    data = ImageListDataset(with_corrupt, build_transform(8, train=False))
    with pytest.raises(DataError, match="cannot read image .*truncated.jpg"):
        data[0]
    with pytest.raises(DataError, match="cannot read image .*text.png"):
        data[1]


def test_skip_corrupt_drops_and_counts(with_corrupt):
    data = ImageListDataset(with_corrupt, build_transform(8, train=False), skip_corrupt=True)
    assert data[0] == SkippedImage(with_corrupt[0].impath) and isinstance(data[1], SkippedImage)
    assert data[2][1] == 2
    assert data.num_skipped == 2 and data.skipped == {with_corrupt[0].impath, with_corrupt[1].impath}
    batch, skipped = collate_readable([data[i] for i in range(3)])
    assert skipped == [with_corrupt[0].impath, with_corrupt[1].impath]
    assert batch[0].shape == (1, 3, 8, 8) and batch[1].tolist() == [2]
    assert collate_readable([data[0], data[1]])[0] is None


@pytest.mark.parametrize("workers", [0, 2])
def test_skipped_images_are_counted_whatever_the_workers(with_corrupt, workers):
    """A worker's copy of the dataset would keep its skips to itself: the loader brings them back."""
    data = ImageListDataset(with_corrupt * 2, build_transform(8, train=False), skip_corrupt=True)
    batches = list(image_batches(data, batch_size=2, workers=workers, device="cpu"))
    assert [None if b is None else b[1].tolist() for b in batches] == [None, [2], [2]]
    assert data.skipped == {with_corrupt[0].impath, with_corrupt[1].impath}


def test_class_prompts_replace_underscores():
    assert class_prompts(["Apply_Eye_Makeup", "tench"], "a photo of a person doing {}.") == [
        "a photo of a person doing Apply Eye Makeup.", "a photo of a person doing tench."]


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_image_in_a_worker_fails_in_one_line(with_corrupt, workers):
    """Without --skip-corrupt the error names the file in one line, whichever process read it."""
    data = ImageListDataset(with_corrupt, build_transform(8, train=False))
    with pytest.raises(DataError) as caught:
        list(image_batches(data, batch_size=3, workers=workers, device="cpu"))
    assert "truncated.jpg" in str(caught.value) and "\n" not in str(caught.value)
    assert str(caught.value).startswith("cannot read image")
    with pytest.raises(DataError) as caught:
        ImageListDataset(with_corrupt, None).preload(budget_mb=1, workers=workers)
    assert "truncated.jpg" in str(caught.value) and "\n" not in str(caught.value)
