"""Drawing primitives of the mini world: a supersampled float canvas, masks from unit-space parts.

Everything is composed at ``SS`` times the output resolution in numpy (values in [0, 1]) and
box-filtered down at the end, which gives anti-aliased edges for free. Shapes are described once
in a unit square ([-1, 1]^2, y down) as *parts* and placed with a similarity transform, so every
shape can be moved, scaled and rotated the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 32
"""Side of the rendered images in pixels."""
SS = 4
"""Supersampling factor: drawing happens on a ``SIZE * SS`` canvas."""
HI = SIZE * SS
_AXIS = (np.arange(HI, dtype=np.float32) + 0.5) / SS
_X, _Y = np.meshgrid(_AXIS, _AXIS)  # pixel-centre coordinates of the canvas, in output pixels

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (240, 135, 20),
    "yellow": (235, 215, 35),
    "green": (40, 165, 60),
    "blue": (40, 80, 215),
    "purple": (135, 55, 195),
    "pink": (240, 120, 180),
    "cyan": (40, 195, 210),
    "brown": (125, 80, 40),
}


@dataclass(frozen=True)
class Part:
    """One piece of a shape in unit coordinates.

    Attributes:
        points: polygon vertices, or polyline points when ``width`` > 0.
        width: stroke width in unit coordinates (0 = filled polygon).
        erase: cut the part out of the mask instead of adding it.
    """

    points: tuple[tuple[float, float], ...]
    width: float = 0.0
    erase: bool = False


def poly(*points: tuple[float, float], erase: bool = False) -> Part:
    """A filled polygon."""
    return Part(tuple(points), 0.0, erase)


def line(*points: tuple[float, float], width: float = 0.15, erase: bool = False) -> Part:
    """A polyline of the given width."""
    return Part(tuple(points), width, erase)


def ellipse(cx: float, cy: float, rx: float, ry: float, start: float = 0.0, end: float = 360.0,
            erase: bool = False, n: int = 28) -> Part:
    """An ellipse (or, with ``start``/``end`` in degrees, a closed sector of it) as a polygon."""
    steps = np.linspace(math.radians(start), math.radians(end), n)
    pts = [(cx + rx * math.cos(a), cy + ry * math.sin(a)) for a in steps]
    if end - start < 360.0:
        pts.append((cx, cy))
    return Part(tuple(pts), 0.0, erase)


def regular(n: int, r: float = 1.0, rotation: float = -90.0, inner: float | None = None) -> Part:
    """A regular polygon, or a star when ``inner`` (radius of the inner vertices) is given."""
    count = n * 2 if inner else n
    pts = []
    for i in range(count):
        a = math.radians(rotation + 360.0 * i / count)
        rad = inner if inner and i % 2 else r
        pts.append((rad * math.cos(a), rad * math.sin(a)))
    return Part(tuple(pts))


def mask(parts: list[Part], cx: float, cy: float, scale: float, angle: float = 0.0) -> np.ndarray:
    """Rasterise ``parts`` placed at (cx, cy) (output pixels) with ``scale`` px per unit.

    Returns:
        (HI, HI) float32 coverage in [0, 1] on the supersampled canvas.
    """
    img = Image.new("L", (HI, HI), 0)
    draw = ImageDraw.Draw(img)
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    k = scale * SS
    for part in parts:
        pts = [((cx * SS + k * (c * x - s * y)), (cy * SS + k * (s * x + c * y))) for x, y in part.points]
        fill = 0 if part.erase else 255
        if part.width > 0:
            draw.line(pts, fill=fill, width=max(1, round(part.width * k)), joint="curve")
        else:
            draw.polygon(pts, fill=fill)
    return np.asarray(img, dtype=np.float32) / 255.0


def outline(cover: np.ndarray, width: int = 2) -> np.ndarray:
    """The rim of a coverage mask, ``width`` output pixels thick (for sketch renderings)."""
    img = Image.fromarray((cover * 255).astype(np.uint8))
    k = 2 * max(1, round(width * SS / 2)) + 1
    inner = np.asarray(img.filter(ImageFilter.MinFilter(k)), dtype=np.float32) / 255.0
    return np.clip(cover - inner, 0.0, 1.0)


def jitter(rng: np.random.Generator, rgb: tuple[int, int, int], amount: float = 22.0) -> np.ndarray:
    """A colour with per-channel Gaussian jitter, as floats in [0, 1]."""
    return np.clip((np.asarray(rgb, np.float32) + rng.normal(0.0, amount, 3)) / 255.0, 0.0, 1.0)


def random_colour(rng: np.random.Generator, saturation: tuple[float, float] = (0.55, 1.0),
                  value: tuple[float, float] = (0.45, 1.0)) -> np.ndarray:
    """A random colour from HSV ranges, as floats in [0, 1]."""
    h, s, v = rng.uniform(0, 1), rng.uniform(*saturation), rng.uniform(*value)
    i, f = int(h * 6) % 6, h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.asarray([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i], np.float32)


def background(rng: np.random.Generator, lo: float = 0.2, hi: float = 0.9, noise: float = 0.03) -> np.ndarray:
    """A low-saturation background with a soft gradient and pixel noise.

    Returns:
        (HI, HI, 3) float32 canvas.
    """
    base = rng.uniform(lo, hi) + rng.normal(0.0, 0.04, 3).astype(np.float32)
    ramp = np.linspace(-1.0, 1.0, SIZE, dtype=np.float32)
    a = rng.uniform(0, 2 * math.pi)
    grad = (math.cos(a) * ramp[None, :] + math.sin(a) * ramp[:, None]) * np.float32(rng.uniform(0.0, 0.08))
    small = base[None, None, :] + grad[:, :, None] + rng.normal(0.0, noise, (SIZE, SIZE, 1)).astype(np.float32)
    return np.repeat(np.repeat(np.clip(small, 0.0, 1.0, dtype=np.float32), SS, 0), SS, 1)


def paint(canvas: np.ndarray, cover: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Paint ``colour`` over ``canvas`` with coverage ``cover``, in place; returns the canvas."""
    box = bbox(cover)
    if box is not None:  # only touch the bounding box of the coverage: most shapes are small
        sub = canvas[box]
        sub += cover[box][:, :, None] * (np.asarray(colour, np.float32) - sub)
    return canvas


def clutter(canvas: np.ndarray, rng: np.random.Generator, count: int, width: float = 1.0) -> np.ndarray:
    """Draw ``count`` random thin strokes or small blobs (nuisance) onto the canvas."""
    for _ in range(count):
        if rng.uniform() < 0.6:
            pts = [tuple(rng.uniform(-1.2, 1.2, 2)) for _ in range(rng.integers(2, 4))]
            parts = [line(*pts, width=width / (SIZE / 2))]
        else:
            parts = [ellipse(*rng.uniform(-1, 1, 2), *rng.uniform(0.04, 0.12, 2))]
        paint(canvas, mask(parts, SIZE / 2, SIZE / 2, SIZE / 2), random_colour(rng, (0.0, 0.8), (0.2, 1.0)))
    return canvas


def luminance(rgb: np.ndarray) -> float:
    """Perceived brightness of an RGB colour in [0, 1]."""
    return float(rgb @ np.asarray([0.299, 0.587, 0.114], np.float32))


def contrasting_background(rng: np.random.Generator, ink: np.ndarray, gap: float = 0.3) -> np.ndarray:
    """A background whose grey level is at least ``gap`` away from the luminance of ``ink``."""
    lum = luminance(ink)
    ranges = [(lo, hi) for lo, hi in ((0.08, lum - gap), (lum + gap, 0.95)) if hi - lo > 0.05] or [(0.08, 0.95)]
    lo, hi = ranges[int(rng.integers(len(ranges)))]
    return background(rng, lo, hi)


def placement(rng: np.random.Generator, scale: tuple[float, float], spread: float = 2.5,
               angle: float = 20.0) -> tuple[float, float, float, float]:
    """Random centre (output px), scale (px per unit) and rotation (degrees)."""
    cx, cy = np.clip(SIZE / 2 + rng.normal(0.0, spread, 2), 9.0, SIZE - 9.0)
    return float(cx), float(cy), float(rng.uniform(*scale)), float(rng.uniform(-angle, angle))


def rotated(angle: float, ox: float = 0.0, oy: float = 0.0,
            box: tuple[slice, slice] = (slice(None), slice(None))) -> tuple[np.ndarray, np.ndarray]:
    """Canvas coordinates (output px) rotated by ``angle`` degrees and shifted: (u, v), each (HI, HI) or ``box``."""
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    x, y = _X[box], _Y[box]
    return c * x + s * y + ox, -s * x + c * y + oy


def bbox(cover: np.ndarray) -> tuple[slice, slice] | None:
    """The bounding box of the non-zero part of a coverage mask, or None when it is empty."""
    rows, cols = np.flatnonzero(cover.any(1)), np.flatnonzero(cover.any(0))
    if not rows.size:
        return None
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def finish(canvas: np.ndarray, rng: np.random.Generator | None = None, noise: float = 0.0) -> Image.Image:
    """Box-filter the supersampled canvas down to a ``SIZE`` x ``SIZE`` RGB image, optionally adding pixel noise."""
    small = canvas.reshape(SIZE, SS, SIZE, SS, 3).sum(1).sum(2) / (SS * SS)  # (SIZE, SIZE, 3)
    if rng is not None and noise > 0:
        small += rng.normal(0.0, noise, small.shape)
    return Image.fromarray(np.clip(small * 255.0 + 0.5, 0, 255).astype(np.uint8), "RGB")
