"""Renderer of the broad "objects" dataset (the mini ImageNet) and its four shifted test sets.

A class is an icon with a surface marking ("striped fish"); colour, pose, background and clutter
are nuisance. Test styles mirror the ImageNet variants: ``shifted`` (V2: same recipe, fresh
samples, slightly wider nuisance), ``sketch`` (outline and marking lines only), ``occluded``
(A: smaller, low-contrast, cluttered and partly covered) and ``restyled`` (R: cartoon, pixel-art
or negative renderings). ``wide`` and ``hard`` are the styles mixed into pretraining (web data has
odd images too); they are not the test sets' recipes.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .draw import (
    HI,
    SIZE,
    background,
    bbox,
    clutter,
    contrasting_background,
    finish,
    line,
    luminance,
    mask,
    outline,
    paint,
    placement,
    random_colour,
    rotated,
)
from .icons import ICONS

MARKINGS = ("plain", "striped", "spotted", "checkered")
STYLES = ("photo", "wide", "shifted", "sketch", "hard", "occluded", "restyled")


def marked(rng: np.random.Generator, cover: np.ndarray, marking: str, thin: bool = False) -> np.ndarray:
    """``cover`` times the pattern of a surface marking (computed on the cover's bounding box only)."""
    p, angle, ox, oy = rng.uniform(4.2, 5.2), rng.uniform(0, 180), *rng.uniform(0, 10, 2)
    out = np.zeros_like(cover)
    box = bbox(cover)
    if box is None or marking == "plain":
        return out
    u, v = rotated(float(angle), float(ox), float(oy), box)
    fu, fv = u / p - np.floor(u / p), v / p - np.floor(v / p)
    if marking == "striped":
        pattern = fv < (0.25 if thin else 0.45)
    elif marking == "spotted":
        pattern = np.hypot(fu - 0.5, fv - 0.5) < (0.2 if thin else 0.3)
    else:  # checkered
        pattern = (np.minimum(fu, fv) < 0.22) if thin else ((np.floor(u / p) + np.floor(v / p)) % 2 == 0)
    out[box] = cover[box] * pattern
    return out


def _mark_colour(fill: np.ndarray) -> np.ndarray:
    return fill * 0.3 if luminance(fill) > 0.45 else fill * 0.35 + 0.6


# clutter strokes [low, high), scale range (px per unit), centre spread (px), max rotation (deg), contrast gap
_PHOTO = {
    "photo": ((0, 1), (10.5, 13.0), 1.5, 12.0, 0.25),
    "wide": ((1, 4), (8.5, 12.0), 2.5, 30.0, 0.25),
    "shifted": ((0, 2), (9.5, 12.5), 2.0, 20.0, 0.2),
}


def _photo(rng: np.random.Generator, kind: str, marking: str, style: str = "photo") -> np.ndarray:
    (low, high), scales, spread, angle, gap = _PHOTO[style]
    fill = random_colour(rng)
    canvas = contrasting_background(rng, fill, gap)
    clutter(canvas, rng, int(rng.integers(low, high)) if high - low > 1 else low)
    cx, cy, scale, angle = placement(rng, scales, spread, angle)
    cover = mask(ICONS[kind], cx, cy, scale, angle)
    paint(canvas, cover, fill)
    return paint(canvas, marked(rng, cover, marking), _mark_colour(fill))


def _sketch(rng: np.random.Generator, kind: str, marking: str) -> np.ndarray:
    canvas = background(rng, 0.88, 1.0, noise=0.015)
    cx, cy, scale, angle = placement(rng, (10.0, 13.0), 2.0, 20.0)
    cover = mask(ICONS[kind], cx, cy, scale, angle)
    ink = np.clip(np.full(3, rng.uniform(0.0, 0.25), np.float32) + rng.normal(0, 0.03, 3), 0, 1).astype(np.float32)
    strokes = np.maximum(outline(cover, 1), marked(rng, cover, marking, thin=True))
    return paint(canvas, strokes, ink)


def _hard(rng: np.random.Generator, kind: str, marking: str) -> np.ndarray:
    fill = random_colour(rng)
    lum = luminance(fill)
    canvas = background(rng, max(0.05, lum - 0.2), min(0.95, lum + 0.2))
    clutter(canvas, rng, int(rng.integers(4, 8)), width=1.3)
    cx, cy, scale, angle = placement(rng, (6.5, 9.0), 4.0, 45.0)
    cover = mask(ICONS[kind], cx, cy, scale, angle)
    paint(canvas, cover, fill)
    paint(canvas, marked(rng, cover, marking), _mark_colour(fill))
    bar = [line(tuple(rng.uniform(-1, 1, 2)), tuple(rng.uniform(-1, 1, 2)), width=0.18)]
    return paint(canvas, mask(bar, SIZE / 2, SIZE / 2, SIZE / 2), random_colour(rng, (0.0, 1.0), (0.1, 1.0)))


def _occluded(rng: np.random.Generator, kind: str, marking: str) -> np.ndarray:
    fill = random_colour(rng)
    canvas = contrasting_background(rng, fill, 0.12)
    clutter(canvas, rng, int(rng.integers(2, 5)))
    cx, cy, scale, angle = placement(rng, (9.0, 12.0), 2.5, 25.0)
    cover = mask(ICONS[kind], cx, cy, scale, angle)
    paint(canvas, cover, fill)
    paint(canvas, marked(rng, cover, marking), _mark_colour(fill))
    bar = [line(tuple(rng.uniform(-1, 1, 2)), tuple(rng.uniform(-1, 1, 2)), width=0.14)]
    return paint(canvas, mask(bar, SIZE / 2, SIZE / 2, SIZE / 2), random_colour(rng, (0.0, 1.0), (0.1, 1.0)))


def _restyled(rng: np.random.Generator, kind: str, marking: str) -> np.ndarray:
    style = int(rng.integers(0, 3))
    if style == 0:  # cartoon: saturated backdrop, flat fill, thick dark outline
        canvas = np.broadcast_to(random_colour(rng, (0.3, 0.7), (0.6, 1.0)), (HI, HI, 3)).copy()
        cx, cy, scale, angle = placement(rng, (10.0, 13.0), 2.0, 20.0)
        cover = mask(ICONS[kind], cx, cy, scale, angle)
        fill = random_colour(rng, (0.8, 1.0), (0.8, 1.0))
        paint(canvas, cover, fill)
        paint(canvas, marked(rng, cover, marking), _mark_colour(fill))
        return paint(canvas, outline(cover, 2), np.zeros(3, np.float32))
    canvas = _photo(rng, kind, marking)
    if style == 1:  # negative
        return 1.0 - canvas
    small = finish(canvas).resize((13, 13), Image.BILINEAR).resize((HI, HI), Image.NEAREST)  # pixel art
    return np.asarray(small, dtype=np.float32) / 255.0


def render_object(rng: np.random.Generator, kind: str, marking: str, style: str = "photo") -> Image.Image:
    """An icon with a surface marking, rendered in one of :data:`STYLES`."""
    if style in _PHOTO:
        canvas = _photo(rng, kind, marking, style)
    elif style == "sketch":
        canvas = _sketch(rng, kind, marking)
    elif style == "hard":
        canvas = _hard(rng, kind, marking)
    elif style == "occluded":
        canvas = _occluded(rng, kind, marking)
    elif style == "restyled":
        canvas = _restyled(rng, kind, marking)
    else:
        raise ValueError(f"unknown object style {style!r}; expected one of {', '.join(STYLES)}")
    return finish(np.clip(canvas, 0.0, 1.0))
