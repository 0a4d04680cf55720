"""3-D multi-crop views for stages 2-3 (docs/recipe.md §7, §8): virtual padding, crop boxes, region reads, trilinear
resize and RandAxisFlip. Pure numpy.

Geometry. A volume (z, y, x) is clamped, z-scored with its own statistics and padded to at least `pad_to` voxels
per axis with its minimum, centred (MONAI SpatialPad: floor(d/2) before, the rest after). The padding is never
built: crop boxes live in padded coordinates, only their intersection with the volume is read, and the rest is
filled with the minimum. A box of e voxels per axis is resized to `size` with torch's trilinear operator
(align_corners=False, `flexict_jax.resize`), one axis at a time.

Intensity augmentation. Upstream runs the MONAI intensity transforms on the whole padded volume before cropping
(docs/recipe.md §7). Here one `IntensityDraw` per example is applied to each crop's region instead:
  * smoothing and low resolution are banded [n, n] matrices per padded axis (`IntensityDraw.axis_matrix`); the
    rows of a crop box use only the columns of their band, so reading the box grown by that band (a few voxels)
    gives exactly upstream's voxels;
  * the intensity scale is exact;
  * noise is drawn on each crop's region: every crop sees i.i.d. noise of the example's σ, but overlapping crops
    do not share it as crops cut from one noisy volume would;
  * the gamma contrast uses the min and max of the whole volume (from its statistics, times the scale) rather
    than those of the augmented volume, which noise widens by a few σ and smoothing narrows slightly.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from flexict_jax import resize
from flexict_jax.data.intensity import IntensityDraw, add_noise, adjust_contrast, apply_separable, z_score
from flexict_jax.data.volume_source import Volume

CROP_MODES = ("random", "center")


class Box(NamedTuple):
    """A crop box in padded coordinates (z, y, x)."""

    start: tuple[int, int, int]
    size: tuple[int, int, int]


def padding(shape: Sequence[int], pad_to: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(padded shape, voxels padded before the volume) per axis: at least `pad_to`, the volume centred."""
    padded = tuple(max(int(n), pad_to) for n in shape)
    return padded, tuple((p - int(n)) // 2 for p, n in zip(padded, shape))


def random_box(rng: np.random.Generator, padded_shape: Sequence[int], extent: tuple[int, int]) -> Box:
    """MONAI RandSpatialCrop(random_size): size per axis uniform in [extent] (at most the axis), random place."""
    size = tuple(min(int(rng.integers(extent[0], extent[1] + 1)), n) for n in padded_shape)
    start = tuple(int(rng.integers(0, n - s + 1)) for n, s in zip(padded_shape, size))
    return Box(start, size)


def center_box(padded_shape: Sequence[int], size: int) -> Box:
    """MONAI CenterSpatialCrop(size): the box centred at n // 2 on each axis (the whole axis if shorter)."""
    sizes = tuple(min(size, n) for n in padded_shape)
    return Box(tuple(n // 2 - s // 2 for n, s in zip(padded_shape, sizes)), sizes)


@functools.lru_cache(maxsize=512)
def _trilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    # torch F.interpolate(mode="trilinear", align_corners=False) along one axis; only ~100 (in, out) pairs occur
    # per crop size, so they are cached per process.
    matrix = resize.resize_matrix(in_size, out_size, "linear", antialias=False).astype(np.float32)
    matrix.flags.writeable = False
    return matrix


class PaddedVolume:
    """A volume as the crops see it: clamped, z-scored, padded to >= `pad_to` and augmented -- all virtually.

    `crop(box, size)` reads only the voxels that box needs (see the module docstring).
    """

    def __init__(self, volume: Volume, window: tuple[float, float], pad_to: int,
                 augment: IntensityDraw | None = None, noise_rng: np.random.Generator | None = None):
        self.volume = volume
        self.window = window
        self.shape, self.before = padding(volume.shape, pad_to)
        self.augment = augment or IntensityDraw()
        if self.augment.noise_std is not None and noise_rng is None:
            raise ValueError("an intensity draw with noise needs a noise_rng")
        self.noise_rng = noise_rng
        # The z-scored minimum is the padding value; with the maximum it is the range the gamma contrast keeps.
        self.value_range = tuple(float(z_score(np.float64(v), window, volume.stats))
                                 for v in (volume.stats.min, volume.stats.max))
        self._axis_matrices = [self.augment.axis_matrix(axis, n) for axis, n in enumerate(self.shape)]

    def read(self, start: Sequence[int], stop: Sequence[int]) -> np.ndarray:
        """float32 z-scored voxels [start, stop) in padded coordinates; only the in-volume part is read."""
        out = np.full(tuple(b - a for a, b in zip(start, stop)), self.value_range[0], dtype=np.float32)
        inner_start = [max(a - p, 0) for a, p in zip(start, self.before)]
        inner_stop = [min(b - p, n) for b, p, n in zip(stop, self.before, self.volume.shape)]
        if all(a < b for a, b in zip(inner_start, inner_stop)):
            hu = self.volume.read(tuple(inner_start), tuple(inner_stop))
            out[tuple(slice(a + p - s, b + p - s) for a, b, p, s in zip(inner_start, inner_stop, self.before, start))] \
                = z_score(hu, self.window, self.volume.stats)
        return out

    def crop(self, box: Box, size: int) -> np.ndarray:
        """float32 [size, size, size]: `box` of the augmented padded volume, trilinear-resized to size³."""
        resizes, bands, read_start, read_stop = [], [], [], []
        for start, extent, matrix in zip(box.start, box.size, self._axis_matrices):
            resizes.append(_trilinear_matrix(extent, size))
            if matrix is None:
                bands.append(None)
                read_start.append(start)
                read_stop.append(start + extent)
            else:
                rows = matrix[start:start + extent]
                columns = np.flatnonzero(rows.any(axis=0))
                lo, hi = int(columns[0]), int(columns[-1]) + 1
                bands.append(rows[:, lo:hi].astype(np.float32))
                read_start.append(lo)
                read_stop.append(hi)
        region = self.read(read_start, read_stop)
        augment, scale = self.augment, np.float32(self.augment.scale)
        if augment.noise_std is not None:
            region = add_noise(region, self.noise_rng, augment.noise_std)
        if augment.contrast_gamma is None:  # all linear: one matrix per axis
            return apply_separable(region, [r if b is None else r @ b for r, b in zip(resizes, bands)]) * scale
        # The gamma is not linear, so it goes between the spatial transforms and the resize, as upstream.
        region = apply_separable(region, bands) * scale
        lo, hi = self.value_range
        region = adjust_contrast(region, augment.contrast_gamma, (lo * float(scale), hi * float(scale)))
        return apply_separable(region, resizes)


@dataclasses.dataclass(frozen=True)
class VolumeCrops:
    """`n_crops` crops of one padded volume, each resized to size³, some with RandAxisFlip (docs/recipe.md §7, §8).

    mode "random": box size per axis uniform in `extent`, drawn independently per axis, at a random place (inside
    `region` when one is given, else anywhere in the padded volume); "center": the centred size³ box (stage 3),
    `extent` and `region` unused. Crops listed in `flip_crops` (None: all) are
    flipped along one random axis with probability `flip_prob` (MONAI RandAxisFlip).
    """

    n_crops: int
    size: int
    extent: tuple[int, int]
    mode: str = "random"
    flip_prob: float = 0.5
    flip_crops: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.n_crops < 1 or self.size < 1:
            raise ValueError(f"crop count and size must be positive, got n_crops={self.n_crops}, size={self.size}")
        if self.mode not in CROP_MODES:
            raise ValueError(f"crop mode must be one of {CROP_MODES}, got {self.mode!r}")
        if not (all(float(e).is_integer() for e in self.extent) and 1 <= self.extent[0] <= self.extent[1]):
            raise ValueError(f"crop extent must be whole voxels with 1 <= min <= max, got {self.extent}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"flip probability must be in [0, 1], got {self.flip_prob}")
        if self.flip_crops is not None and any(not 0 <= k < self.n_crops for k in self.flip_crops):
            raise ValueError(f"flipped crops {self.flip_crops} must be indices in [0, {self.n_crops})")

    def __call__(self, volume: PaddedVolume, rng: np.random.Generator, region: Box | None = None) -> np.ndarray:
        """float32 [n_crops, size, size, size], axes (z, y, x)."""
        extent = (int(self.extent[0]), int(self.extent[1]))
        region = region or Box((0, 0, 0), tuple(volume.shape))
        crops = np.empty((self.n_crops,) + (self.size,) * 3, dtype=np.float32)
        for k in range(self.n_crops):
            if self.mode == "center":
                box = center_box(volume.shape, self.size)
            else:
                inner = random_box(rng, region.size, extent)
                box = Box(tuple(a + b for a, b in zip(region.start, inner.start)), inner.size)
            crop = volume.crop(box, self.size)
            if (self.flip_crops is None or k in self.flip_crops) and rng.random() < self.flip_prob:
                crop = np.flip(crop, axis=int(rng.integers(3)))
            crops[k] = crop
        return crops
