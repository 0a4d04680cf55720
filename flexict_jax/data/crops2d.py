"""Multi-crop geometry for stage 1: torchvision-style RandomResizedCrop (bicubic, antialiased) + horizontal flip.

Pure numpy. A crop box is whole pixels, as in torchvision, so the resize is two matrix products with the torch
`F.interpolate(bicubic, antialias=True)` matrices of `flexict_jax.resize` built for the box size.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from flexict_jax import resize
from flexict_jax.errors import ConfigError

# torchvision's RandomResizedCrop tries this many (scale, ratio) draws before its centre-crop fallback.
_CROP_ATTEMPTS = 10


def sample_crop_box(rng: np.random.Generator, height: int, width: int, scale: tuple[float, float],
                    ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """(top, left, h, w) with torchvision `RandomResizedCrop.get_params` semantics.

    Area ~ U(scale)·H·W and log-aspect (w/h) ~ U(log ratio); the box is rounded to whole pixels and must fit.
    After ten misses, the largest centred box whose aspect lies in `ratio` is used.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(_CROP_ATTEMPTS):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@functools.lru_cache(maxsize=1024)
def _bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    # Building a matrix costs ~1-3 ms (a Python loop over output rows), far more than applying it, and only a
    # few hundred (in, out) pairs occur per crop size; cached per process (<100 MB at the recipe sizes).
    matrix = resize.resize_matrix(in_size, out_size, "cubic", antialias=True).astype(np.float32)
    matrix.flags.writeable = False
    return matrix


def resized_crop(image: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """float32 [size, size]: `image[box]` resized like torch bicubic with antialias (torchvision's default)."""
    top, left, h, w = box
    crop = image[top:top + h, left:left + w].astype(np.float32, copy=False)
    return _bicubic_matrix(h, size) @ crop @ _bicubic_matrix(w, size).T


def resize_crops(crops: np.ndarray, size: int) -> np.ndarray:
    """float32 [..., size, size]: crops [..., h, w] resized like torch bicubic with antialias.

    Stage 1.1 derives its global crop from the Gram-size crop this way, as torchvision's `Resize` does
    upstream (docs/recipe.md §6); crops already at `size` are returned as they are.
    """
    height, width = crops.shape[-2:]
    if height == width == size:
        return crops
    return _bicubic_matrix(height, size) @ crops @ _bicubic_matrix(width, size).T


@dataclasses.dataclass(frozen=True)
class MultiCrop:
    """`n_crops` independent RandomResizedCrop(size, scale, ratio) + horizontal flip(hflip_prob) of one slice."""

    n_crops: int
    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_prob: float = 0.5

    def __post_init__(self):
        if self.n_crops < 1 or self.size < 1:
            raise ValueError(f"crop count and size must be positive, got n_crops={self.n_crops}, size={self.size}")
        if not 0.0 < self.scale[0] <= self.scale[1] <= 1.0:
            raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if not 0.0 < self.ratio[0] <= self.ratio[1]:
            raise ConfigError(f"data.crop_ratio must satisfy 0 < min <= max, got {self.ratio}")
        if not 0.0 <= self.hflip_prob <= 1.0:
            raise ConfigError(f"data.hflip_prob must be in [0, 1], got {self.hflip_prob}")

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """float32 [n_crops, size, size] from a 2-D float image."""
        crops = np.empty((self.n_crops, self.size, self.size), dtype=np.float32)
        for k in range(self.n_crops):
            box = sample_crop_box(rng, image.shape[0], image.shape[1], self.scale, self.ratio)
            crop = resized_crop(image, box, self.size)
            crops[k] = crop[:, ::-1] if rng.random() < self.hflip_prob else crop
        return crops
