"""Capture conditions: how each downstream dataset's "camera" differs from the pretraining images.

Real CLIP is pretrained on web images and evaluated on datasets shot with their own cameras,
colours and quality (satellite false colour, scanned textures, ...); that gap is what few-shot
prompt learning closes. The tiny CLIP is pretrained on clean renders, and every mini dataset's
images pass through its own capture: a hue rotation (white-balance / false-colour error), lower
contrast with a colour cast, blur and sensor noise. Without it the pretraining images *are* the
downstream distribution and there is nothing left for a prompt to learn.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

# A cyclic rotation of the RGB channels: output R takes input B, G takes R, B takes G.
_ROTATION = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]], dtype=np.float32)


@dataclass(frozen=True)
class Capture:
    """One dataset's capture condition (the identity by default).

    Attributes:
        hue_rotation: blend weight of a cyclic RGB channel rotation (0 = none, 1 = R->G->B->R).
        contrast: pixels are pulled towards mid-grey by this factor (1 = unchanged).
        cast: RGB offset added after the contrast change (a colour cast).
        blur: Gaussian blur radius in pixels.
        noise: standard deviation of additive Gaussian sensor noise (0-255 scale).
    """

    hue_rotation: float = 0.0
    contrast: float = 1.0
    cast: tuple[float, float, float] = (0.0, 0.0, 0.0)
    blur: float = 0.0
    noise: float = 0.0

    @property
    def is_identity(self) -> bool:
        return self == Capture()

    def apply(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        """The captured image; ``rng`` (the image's own generator) draws the noise."""
        if self.is_identity:
            return image
        if self.blur:
            image = image.filter(ImageFilter.GaussianBlur(self.blur))
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
        if self.hue_rotation:
            mix = (1 - self.hue_rotation) * np.eye(3, dtype=np.float32) + self.hue_rotation * _ROTATION
            pixels = pixels @ mix.T
        pixels = (pixels - 127.5) * self.contrast + 127.5 + np.asarray(self.cast, dtype=np.float32)
        if self.noise:
            pixels = pixels + rng.normal(0.0, self.noise, pixels.shape)
        return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
