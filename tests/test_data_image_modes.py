"""``load_rgb`` on real files of every PIL mode: values scaled to 8 bits, alpha over white."""

import numpy as np
import pytest
from PIL import Image

from alignednorm.data import ImageListDataset, Item
from alignednorm.data.dataset import SkippedImage, load_rgb, to_rgb
from alignednorm.errors import DataError


def _grey_row(image: Image.Image) -> list[int]:
    """The first row of an RGB image whose three channels must be equal."""
    rgb = np.asarray(image)
    assert image.mode == "RGB" and (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    return rgb[0, :, 0].tolist()


def _saved(tmp_path, name: str, image: Image.Image, mode: str | None = None):
    path = tmp_path / name
    image.save(path)
    if mode is not None:
        with Image.open(path) as reopened:
            assert reopened.mode == mode, f"{name} reopens as {reopened.mode}, the test expects {mode}"
    return path


def test_16_bit_png_is_scaled_not_white(tmp_path):
    values = np.array([[0, 257 * 10, 32768, 65535]], dtype=np.uint16)
    path = _saved(tmp_path, "a16.png", Image.fromarray(values), mode="I;16")
    assert _grey_row(load_rgb(str(path))) == [0, 10, 128, 255]


def test_16_bit_tiff_and_pgm(tmp_path):
    values = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    tiff = _saved(tmp_path, "a16.tif", Image.fromarray(values), mode="I;16")
    assert _grey_row(load_rgb(str(tiff))) == [0, 100, 255]
    pgm = _saved(tmp_path, "a16.pgm", Image.fromarray(values), mode="I")  # Pillow reads 16-bit PGM as I
    assert _grey_row(load_rgb(str(pgm))) == [0, 100, 255]
    big_endian = Image.frombytes("I;16B", (3, 1), values.astype(">u2").tobytes())
    assert _grey_row(to_rgb(big_endian)) == [0, 100, 255]


def test_32_bit_int_uses_the_smallest_depth_that_holds_it(tmp_path):
    eight = _saved(tmp_path, "i8.tif", Image.fromarray(np.array([[0, 7, 200, 255]], dtype=np.int32)), mode="I")
    assert _grey_row(load_rgb(str(eight))) == [0, 7, 200, 255]
    sixteen = _saved(tmp_path, "i16.tif", Image.fromarray(np.array([[0, 256, 65535]], dtype=np.int32)), mode="I")
    assert _grey_row(load_rgb(str(sixteen))) == [0, 1, 255]
    for name, row in (("neg.tif", [-5, 10]), ("wide.tif", [0, 70000])):
        path = _saved(tmp_path, name, Image.fromarray(np.array([row], dtype=np.int32)), mode="I")
        with pytest.raises(DataError,
                           match=rf"{name}: I image with samples from {row[0]} to {row[1]}; expected 0\.\.255"):
            load_rgb(str(path))


def test_float_images(tmp_path):
    unit = _saved(tmp_path, "unit.tif", Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)), mode="F")
    assert _grey_row(load_rgb(str(unit))) == [0, 128, 255]
    byte = _saved(tmp_path, "byte.tif", Image.fromarray(np.array([[0.0, 2.0, 254.6]], dtype=np.float32)), mode="F")
    assert _grey_row(load_rgb(str(byte))) == [0, 2, 255]
    for name, row, problem in (("big.tif", [0.0, 300.0], "samples from 0 to 300"),
                               ("neg.tif", [-0.5, 0.5], "samples from -0.5 to 0.5"),
                               ("nan.tif", [np.nan, 0.5], "NaN or infinite")):
        path = _saved(tmp_path, name, Image.fromarray(np.array([row], dtype=np.float32)), mode="F")
        with pytest.raises(DataError, match=f"{name}: F image with {problem}"):
            load_rgb(str(path))


@pytest.mark.parametrize("suffix", [".tif", ".jpg"])
def test_cmyk(tmp_path, suffix):
    image = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # no cyan, full magenta and yellow: red
    path = _saved(tmp_path, f"red{suffix}", image, mode="CMYK")
    pixel = np.asarray(load_rgb(str(path)))[4, 4].astype(int)
    assert np.abs(pixel - [255, 0, 0]).max() <= (0 if suffix == ".tif" else 3)


def _palette_image() -> Image.Image:
    image = Image.new("P", (3, 1))
    image.putpalette([10, 20, 30, 200, 100, 50, 0, 0, 0] + [0] * (256 * 3 - 9))
    image.putdata([0, 1, 2])
    return image


def test_palette_without_and_with_transparency(tmp_path):
    plain = _saved(tmp_path, "p.png", _palette_image(), mode="P")
    assert np.asarray(load_rgb(str(plain)))[0].tolist() == [[10, 20, 30], [200, 100, 50], [0, 0, 0]]
    image = _palette_image()
    image.info["transparency"] = 2  # index 2 (black) is see-through
    keyed = _saved(tmp_path, "pt.png", image, mode="P")
    assert np.asarray(load_rgb(str(keyed)))[0].tolist() == [[10, 20, 30], [200, 100, 50], [255, 255, 255]]
    image = _palette_image()
    image.info["transparency"] = bytes([255, 0, 255])  # per-entry alpha: index 1 transparent
    per_entry = _saved(tmp_path, "pa.png", image, mode="P")
    assert np.asarray(load_rgb(str(per_entry)))[0].tolist() == [[10, 20, 30], [255, 255, 255], [0, 0, 0]]


def test_alpha_is_composited_over_white(tmp_path):
    la = Image.new("LA", (3, 1))
    la.putdata([(100, 255), (100, 0), (0, 128)])
    assert _grey_row(load_rgb(str(_saved(tmp_path, "la.png", la, mode="LA")))) == [100, 255, 127]
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(200, 10, 20, 255), (0, 0, 0, 0), (0, 0, 0, 128)])
    rows = np.asarray(load_rgb(str(_saved(tmp_path, "rgba.png", rgba, mode="RGBA"))))[0].tolist()
    assert rows == [[200, 10, 20], [255, 255, 255], [127, 127, 127]]
    keyed = Image.new("RGB", (2, 1))
    keyed.putdata([(1, 2, 3), (9, 9, 9)])
    keyed.info["transparency"] = (1, 2, 3)  # a PNG colour key (tRNS) for RGB
    rows = np.asarray(load_rgb(str(_saved(tmp_path, "key.png", keyed, mode="RGB"))))[0].tolist()
    assert rows == [[255, 255, 255], [9, 9, 9]]


def test_grey_and_bilevel(tmp_path):
    assert _grey_row(load_rgb(str(_saved(tmp_path, "l.png", Image.new("L", (2, 1), 77), mode="L")))) == [77, 77]
    assert _grey_row(load_rgb(str(_saved(tmp_path, "b.png", Image.new("1", (2, 1), 1), mode="1")))) == [255, 255]


def test_dataset_names_an_image_out_of_range(tmp_path):
    path = _saved(tmp_path, "big.tif", Image.fromarray(np.array([[0.0, 300.0]], dtype=np.float32)), mode="F")
    data = ImageListDataset([Item(str(path), 0, "a")])
    with pytest.raises(DataError, match=r"big.tif: F image with samples .*pass --skip-corrupt"):
        data[0]
    skipping = ImageListDataset([Item(str(path), 0, "a")], skip_corrupt=True)
    assert isinstance(skipping[0], SkippedImage) and skipping.skipped == {str(path)}
