"""Renderers of the mini world: one function per dataset family, each ``(rng, *factors) -> PIL image``.

All randomness comes from the ``numpy.random.Generator`` passed in, so an image is a pure function
of its seed. The class factors (shape, colour, texture, ...) decide what is drawn; everything else
(position, size, rotation, background, clutter, colour jitter) is nuisance.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .draw import (
    HI,
    PALETTE,
    SIZE,
    SS,
    background,
    clutter,
    contrasting_background,
    ellipse,
    finish,
    jitter,
    line,
    luminance,
    mask,
    paint,
    placement,
    poly,
    random_colour,
    rotated,
)
from .icons import SHAPES, glyph

_MID = SIZE / 2


def render_shape(rng: np.random.Generator, shape: str, colour: str) -> Image.Image:
    """A coloured geometric shape (the "shapes" dataset)."""
    ink = jitter(rng, PALETTE[colour])
    canvas = contrasting_background(rng, ink, 0.2)
    clutter(canvas, rng, int(rng.integers(0, 2)))
    cx, cy, scale, angle = placement(rng, (7.5, 11.0), angle=30.0)
    return finish(paint(canvas, mask(SHAPES[shape], cx, cy, scale, angle), ink))


def render_glyph(rng: np.random.Generator, letter: str) -> Image.Image:
    """An upper-case letter drawn with a stroke font (the "glyphs" dataset)."""
    ink = random_colour(rng)
    canvas = contrasting_background(rng, ink)
    clutter(canvas, rng, int(rng.integers(0, 2)))
    cx, cy, scale, angle = placement(rng, (10.0, 13.0), spread=1.5, angle=10.0)
    parts = glyph(letter, float(rng.uniform(0.17, 0.27)))
    return finish(paint(canvas, mask(parts, cx, cy, scale, angle), ink))


def render_count(rng: np.random.Generator, count: int, shape: str) -> Image.Image:
    """``count`` copies of one small shape in distinct cells of a jittered 3 x 3 grid (the "counts" dataset)."""
    ink = random_colour(rng)
    canvas = contrasting_background(rng, ink)
    radius, cell = float(rng.uniform(2.8, 3.4)), float(rng.uniform(8.8, 9.6))
    origin = _MID - cell + rng.uniform(-1.5, 1.5, 2)  # centre of the top-left cell
    slack = max(0.0, (cell - 2 * radius - 1.0) / 2)  # jitter that keeps neighbours apart
    for index in rng.choice(9, count, replace=False):
        cx, cy = origin + cell * np.array([index % 3, index // 3]) + rng.uniform(-slack, slack, 2)
        paint(canvas, mask(SHAPES[shape], float(cx), float(cy), radius, float(rng.uniform(-30, 30))), ink)
    return finish(canvas)


def render_relation(rng: np.random.Generator, first: str, relation: str, second: str) -> Image.Image:
    """Two shapes of random kinds, coloured ``first`` above / left of coloured ``second`` (the "relations" dataset)."""
    canvas = background(rng, 0.1, 0.95)
    gap, side = float(rng.uniform(11.0, 16.0)), float(rng.uniform(-4.0, 4.0))
    ox, oy = _MID + rng.normal(0.0, 2.0, 2)
    offsets = [(-gap / 2, side / 2), (gap / 2, -side / 2)]  # (along, across) the relation axis
    for (along, across), colour in zip(offsets, (first, second)):
        cx, cy = (ox + along, oy + across) if relation == "left of" else (ox + across, oy + along)
        shape = SHAPES[("circle", "square", "triangle", "cross")[int(rng.integers(0, 4))]]
        scale = float(rng.uniform(4.0, 5.2))
        paint(canvas, mask(shape, float(cx), float(cy), scale, float(rng.uniform(-20, 20))),
              jitter(rng, PALETTE[colour]))
    return finish(canvas)


def smooth_noise(rng: np.random.Generator, cells: int) -> np.ndarray:
    """Smooth random field in [0, 1] on the supersampled canvas, with about ``cells`` blobs across."""
    low = Image.fromarray((rng.uniform(0, 255, (cells, cells))).astype(np.uint8))
    return np.asarray(low.resize((HI, HI), Image.BICUBIC), dtype=np.float32) / 255.0


def _texture_cover(name: str, rng: np.random.Generator) -> np.ndarray:
    """Coverage in [0, 1] of the foreground colour for one texture class."""
    p = float(rng.uniform(4.5, 7.0))
    u, v = rotated(float(rng.uniform(-8, 8)), *rng.uniform(0, 50, 2))
    cu, cv = u - u.mean(), v - v.mean()
    frac = lambda a: a - np.floor(a)
    near = lambda a: np.abs(frac(a) - 0.5)  # 0 on grid lines, 0.5 between
    tri = lambda a: 2 * np.abs(frac(a) - 0.5)
    r = lambda: np.hypot(cu, cv)
    theta = lambda: np.arctan2(cv, cu)
    covers = {
        "horizontal stripes": lambda: frac(v / p) < 0.5,
        "vertical stripes": lambda: frac(u / p) < 0.5,
        "diagonal stripes": lambda: frac((u + v) / (p * 1.41)) < 0.5,
        "checkerboard": lambda: (np.floor(u / p) + np.floor(v / p)) % 2 == 0,
        "polka dots": lambda: np.hypot(near(u / p), near(v / p)) > 0.5 - 0.3,
        "grid": lambda: np.minimum(near(u / p), near(v / p)) > 0.5 - 0.11,
        "zigzag": lambda: frac((v + tri(u / p) * p * 0.7) / p) < 0.5,
        "wavy": lambda: frac((v + np.sin(2 * np.pi * u / (1.6 * p)) * p * 0.35) / p) < 0.5,
        "crosshatched": lambda: np.minimum(near((u + v) / p), near((u - v) / p)) > 0.5 - 0.1,
        "concentric rings": lambda: frac(r() / p) < 0.5,
        "bricks": lambda: _bricks(u, v, p),
        "speckled": lambda: np.repeat(np.repeat(rng.uniform(0, 1, (SIZE, SIZE)) < 0.18, SS, 0), SS, 1),
        "triangles": lambda: frac(u / p) + frac(v / p) < 1.0,
        "diamonds": lambda: (np.floor((u + v) / p) + np.floor((u - v) / p)) % 2 == 0,
        "plaid": lambda: 0.5 * (frac(u / p / 1.5) < 0.35) + 0.5 * (frac(v / p / 1.5) < 0.35),
        "dashes": lambda: (frac(v / p) < 0.3) & (frac(u / p / 1.3 + np.floor(v / p) * 0.5) < 0.6),
        "blotches": lambda: smooth_noise(rng, 5) > 0.55,
        "gradient": lambda: np.clip((u - u.min()) / (u.max() - u.min()), 0, 1),
        "fish scales": lambda: _scales(u, v, p),
        "spiral": lambda: frac(r() / p + theta() / (2 * np.pi)) < 0.5,
        "starburst": lambda: frac(theta() * 6 / np.pi) < 0.5,
        "small crosses": lambda: (np.minimum(near(u / p), near(v / p)) > 0.5 - 0.1)
        & (np.maximum(near(u / p), near(v / p)) > 0.28),
        "plain": lambda: np.zeros_like(u),
        "woven": lambda: _woven(u, v, p),
    }
    return covers[name]().astype(np.float32)


def _bricks(u: np.ndarray, v: np.ndarray, p: float) -> np.ndarray:
    row = np.floor(v / p)
    mortar_h = np.abs(v / p - np.round(v / p)) < 0.12
    x = u / (2 * p) + 0.5 * (row % 2)
    return ~(mortar_h | (np.abs(x - np.round(x)) < 0.06))


def _scales(u: np.ndarray, v: np.ndarray, p: float) -> np.ndarray:
    row = np.floor(v / p)
    x = u / p + 0.5 * (row % 2)
    d = np.hypot(x - np.round(x), v / p - row - 1.0)
    return (d < 0.62) & (d > 0.42)


def _woven(u: np.ndarray, v: np.ndarray, p: float) -> np.ndarray:
    cell = (np.floor(u / (1.5 * p)) + np.floor(v / (1.5 * p))) % 2 == 0
    stripes_h, stripes_v = (v / p * 2.4) % 1 < 0.5, (u / p * 2.4) % 1 < 0.5
    return np.where(cell, stripes_h, stripes_v)


def render_texture(rng: np.random.Generator, name: str) -> Image.Image:
    """A full-frame texture in two random colours (the "textures" dataset)."""
    fg = random_colour(rng)
    bg = random_colour(rng, (0.0, 0.9), (0.1, 1.0))
    while abs(luminance(fg) - luminance(bg)) < 0.25:
        bg = random_colour(rng, (0.0, 0.9), (0.1, 1.0))
    canvas = np.broadcast_to(bg, (HI, HI, 3)).copy()
    if name == "gradient":  # a ramp from bg to fg rather than a pattern of fg on bg
        return finish(paint(canvas, _texture_cover(name, rng) * 0.999, fg))
    return finish(paint(canvas, _texture_cover(name, rng), fg), rng, 0.02)


TERRAINS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {  # base, detail colour
    "forest": ((35, 95, 40), (20, 60, 25)),
    "desert": ((215, 185, 125), (190, 150, 95)),
    "snowfield": ((232, 238, 248), (200, 212, 230)),
    "meadow": ((125, 195, 75), (175, 210, 90)),
    "wetland": ((105, 115, 60), (45, 70, 75)),
}


def _terrain(rng: np.random.Generator, terrain: str) -> np.ndarray:
    base, detail = (jitter(rng, c, 12.0) for c in TERRAINS[terrain])
    canvas = np.broadcast_to(base, (HI, HI, 3)).copy()
    if terrain == "forest":
        crowns = [ellipse(*rng.uniform(-1.1, 1.1, 2), *(rng.uniform(0.07, 0.14),) * 2) for _ in range(45)]
        paint(canvas, mask(crowns, _MID, _MID, _MID), detail)
    elif terrain == "desert":
        u, v = rotated(float(rng.uniform(0, 180)))
        paint(canvas, 0.6 * (np.sin(2 * np.pi * (v + 2 * np.sin(u / 4)) / 6.0) > 0.3), detail)
    elif terrain == "wetland":
        paint(canvas, (smooth_noise(rng, 6) > 0.6).astype(np.float32), detail)
    else:
        paint(canvas, 0.5 * (smooth_noise(rng, 10) > 0.55), detail)
    return canvas


def _feature(canvas: np.ndarray, rng: np.random.Generator, feature: str) -> None:
    a = float(rng.uniform(0, 180))
    if feature == "river":
        t = np.linspace(-1.3, 1.3, 14)
        wiggle = rng.uniform(0.15, 0.3) * np.sin(t * rng.uniform(2.0, 3.5) + rng.uniform(0, 6))
        pts = [(float(x), float(y)) for x, y in zip(t, wiggle)]
        cover = mask([line(*pts, width=float(rng.uniform(0.16, 0.22)))], _MID, _MID, _MID, a)
        paint(canvas, cover, jitter(rng, (45, 90, 175), 12.0))
    elif feature == "highway":
        off = float(rng.uniform(-0.3, 0.3))
        paint(canvas, mask([line((-1.5, off), (1.5, off), width=0.2)], _MID, _MID, _MID, a), jitter(rng, (125,) * 3))
        dashes = [line((x, off), (x + 0.12, off), width=0.04) for x in np.arange(-1.5, 1.5, 0.25)]
        paint(canvas, mask(dashes, _MID, _MID, _MID, a), np.full(3, 0.95, np.float32))
    elif feature == "lake":
        cx, cy = rng.uniform(-0.3, 0.3, 2)
        blobs = [ellipse(cx + dx, cy + dy, *rng.uniform(0.25, 0.42, 2)) for dx, dy in rng.normal(0, 0.15, (3, 2))]
        paint(canvas, mask(blobs, _MID, _MID, _MID, a), jitter(rng, (40, 80, 160), 12.0))
    elif feature == "village":
        centre = rng.uniform(-0.3, 0.3, 2)
        for dx, dy in rng.normal(0.0, 0.32, (int(rng.integers(5, 9)), 2)):
            x, y, h = centre[0] + dx, centre[1] + dy, 0.09
            roof = [(180, 60, 45), (120, 80, 60), (150, 150, 155)][int(rng.integers(0, 3))]
            paint(canvas, mask([poly((x - h, y - h), (x + h, y - h), (x + h, y + h), (x - h, y + h))],
                                _MID, _MID, _MID, a), jitter(rng, roof, 15.0))


def render_satellite(rng: np.random.Generator, terrain: str, feature: str) -> Image.Image:
    """A top-down landscape: a terrain with an optional feature (the "satellite" dataset)."""
    canvas = _terrain(rng, terrain)
    _feature(canvas, rng, feature)
    return finish(canvas, rng, 0.02)
