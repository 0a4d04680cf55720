"""Intensity: HU window + z-score, and the MONAI intensity augmentations of stages 1-3 (docs/recipe.md §5, §7).

Pure numpy/scipy on float32 arrays of any rank: 2-D slices (stage 1) and 3-D volumes (stages 2-3). Each
transform reproduces the MONAI class upstream uses (`dinov3/data/augmentations.py`, `SimpleDataAugmentationDINO`
and `RandomCropDINO3D`), with parameters drawn from the `np.random.Generator` passed in instead of MONAI's
process-global RandomState (docs/recipe.md §13 #7).

The two spatial transforms (Gaussian smoothing, simulated low resolution) are separable linear maps, so each
also exists as one [n, n] matrix per axis (`IntensityDraw.axis_matrix`). The 3-D pipeline uses those to apply
the augmentation to just the region of the volume that a crop needs (flexict_jax.data.crops3d).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import scipy.ndimage
import scipy.sparse
import scipy.special

from flexict_jax import resize
from flexict_jax.errors import ConfigError

# Below this standard deviation an image counts as flat and is only mean-centred.
_FLAT_STD = 1e-6


@dataclasses.dataclass(frozen=True)
class HuStats:
    """Statistics of the window-clipped HU of a whole slice or volume: what its z-score uses."""

    mean: float
    std: float  # unbiased (ddof=1)
    min: float
    max: float


def hu_stats(hu: np.ndarray, window: tuple[float, float] = (-1000.0, 1000.0)) -> HuStats:
    """Mean, unbiased std, min and max of `hu` clamped to `window`."""
    x = np.clip(np.asarray(hu, dtype=np.float64), window[0], window[1])
    std = float(x.std(ddof=1)) if x.size > 1 else 0.0
    return HuStats(mean=float(x.mean()), std=std, min=float(x.min()), max=float(x.max()))


def z_score(hu: np.ndarray, window: tuple[float, float], stats: HuStats) -> np.ndarray:
    """float32: `hu` clamped to `window`, then z-scored with `stats` (those of the whole slice or volume).

    A flat image (std < 1e-6) is only mean-centred.
    """
    # float32 is exact for HU and keeps a 160³ region read cheap.
    x = np.clip(np.asarray(hu, dtype=np.float32), window[0], window[1]) - np.float32(stats.mean)
    return x if stats.std < _FLAT_STD else x / np.float32(stats.std)


def normalize_hu(hu: np.ndarray, window: tuple[float, float] = (-1000.0, 1000.0)) -> np.ndarray:
    """float32: HU clamped to `window`, then z-scored with the image's own unbiased std (docs/recipe.md §5).

    Upstream calls this `zero_to_one`, but it is a z-score; a flat image (std < 1e-6) is only mean-centred.
    """
    return z_score(hu, window, hu_stats(hu, window))


def apply_separable(array: np.ndarray, matrices: Sequence[np.ndarray | None]) -> np.ndarray:
    """Applies matrices[a] ([out, in]) along axis a of `array`; None leaves that axis unchanged.

    Every matrix used here (linear resize, smoothing, low resolution) is banded, so it goes in as a sparse
    matrix. Axis 0 is one product over the contiguous array; each other axis is moved to the front for its
    product, slab by slab along axis 0 for large arrays so that those transposes stay in cache (measured on one
    core: 120³ -> 160³ trilinear in ~15 ms, against ~70 ms with dense whole-array products).
    """
    sparse = [None if m is None else scipy.sparse.csr_array(m) for m in matrices]
    return np.ascontiguousarray(_apply_sparse(np.ascontiguousarray(array), sparse))


# Elements above which `apply_separable` goes slab by slab (a 64³ float32 block is 1 MiB, about an L2 cache).
_SLAB_THRESHOLD = 64 ** 3


def _apply_sparse(array: np.ndarray, matrices: list) -> np.ndarray:
    first, rest = matrices[0], matrices[1:]
    if first is not None:
        array = (first @ array.reshape(array.shape[0], -1)).reshape((first.shape[0],) + array.shape[1:])
    if array.ndim > 2 and array.size > _SLAB_THRESHOLD:
        first_slab = _apply_sparse(array[0], rest)
        out = np.empty((array.shape[0],) + first_slab.shape, dtype=first_slab.dtype)
        out[0] = first_slab
        for i in range(1, array.shape[0]):
            out[i] = _apply_sparse(array[i], rest)
        return out
    for axis, matrix in enumerate(rest, start=1):
        if matrix is not None:
            moved = np.ascontiguousarray(np.moveaxis(array, axis, 0))
            product = matrix @ moved.reshape(moved.shape[0], -1)
            array = np.moveaxis(product.reshape((matrix.shape[0],) + moved.shape[1:]), 0, axis)
    return array


def add_noise(image: np.ndarray, rng: np.random.Generator, std: float) -> np.ndarray:
    """image + N(0, std²) noise, independent per pixel/voxel."""
    return image + rng.normal(0.0, std, size=image.shape).astype(np.float32)


def gaussian_noise(image: np.ndarray, rng: np.random.Generator, max_std: float) -> np.ndarray:
    """MONAI RandGaussianNoise(mean=0, std=max_std, sample_std=True): the std itself is U(0, max_std)."""
    return add_noise(image, rng, rng.uniform(0.0, max_std))


def _erf_kernel(sigma: float) -> np.ndarray:
    # MONAI `gaussian_1d(approx="erf", truncated=4)`: the Gaussian integrated over each unit pixel, not
    # renormalised; radius int(max(4σ, 0.5) + 0.5).
    radius = int(max(sigma * 4.0, 0.5) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    t = 1.0 / (math.sqrt(2.0) * sigma)
    return np.maximum(0.5 * (scipy.special.erf(t * (x + 0.5)) - scipy.special.erf(t * (x - 0.5))), 0.0)


def gaussian_smooth(image: np.ndarray, sigma: Sequence[float]) -> np.ndarray:
    """MONAI GaussianSmooth(sigma=(σ per axis), approx="erf"): separable, zero padding outside the image."""
    out = image.astype(np.float32)
    for axis, s in enumerate(sigma):
        out = scipy.ndimage.correlate1d(out, _erf_kernel(float(s)).astype(np.float32), axis=axis,
                                        mode="constant", cval=0.0)
    return out


def smoothing_matrix(size: int, sigma: float) -> np.ndarray:
    """[size, size] float64: `gaussian_smooth` along one axis of length `size` (the band of `_erf_kernel`)."""
    kernel = _erf_kernel(sigma)
    radius = len(kernel) // 2
    offsets = np.arange(size)[None, :] - np.arange(size)[:, None] + radius
    inside = (offsets >= 0) & (offsets < len(kernel))
    return np.where(inside, kernel[np.clip(offsets, 0, len(kernel) - 1)], 0.0)


def scale_intensity(image: np.ndarray, factor: float) -> np.ndarray:
    """MONAI ScaleIntensity(factor): x·(1 + factor)."""
    return (image * np.float32(1.0 + factor)).astype(np.float32)


def _nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    # torch F.interpolate(mode="nearest") (legacy, not "nearest-exact"): source index floor(dst·in/out), with
    # the scale and the product in float32 as torch computes them (float64 picks other pixels, e.g. 60 -> 44).
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(src, in_size - 1)


def _low_size(size: int, zoom: float) -> int:
    return max(int(np.round(size * zoom)), 1)


def simulate_low_resolution(image: np.ndarray, zoom: float) -> np.ndarray:
    """MONAI RandSimulateLowResolution body: resize to round(shape·zoom) with nearest, back with (tri)linear.

    Upstream keeps MONAI's default `upsample_mode="trilinear"` (bilinear for 2-D input); no antialiasing on
    either step, align_corners=False.
    """
    image = image.astype(np.float32, copy=False)
    low = image[np.ix_(*(_nearest_indices(n, _low_size(n, zoom)) for n in image.shape))]
    return apply_separable(low, [resize.resize_matrix(m, n, "linear", antialias=False).astype(np.float32)
                                 for m, n in zip(low.shape, image.shape)])


def lowres_matrix(size: int, zoom: float) -> np.ndarray:
    """[size, size] float64: `simulate_low_resolution` along one axis of length `size`."""
    low = _low_size(size, zoom)
    nearest = np.zeros((low, size))
    nearest[np.arange(low), _nearest_indices(size, low)] = 1.0
    return resize.resize_matrix(low, size, "linear", antialias=False) @ nearest


def adjust_contrast(image: np.ndarray, gamma: float, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """MONAI AdjustContrast(gamma): ((x - min) / (range + 1e-7))^γ · range + min, so min and max stay put.

    value_range: (min, max) of the whole image when `image` is only a region of it (the 3-D pipeline); values
    below that min (e.g. from noise) are held at it rather than raised to a fractional power.
    """
    lo, hi = (float(image.min()), float(image.max())) if value_range is None else value_range
    span = hi - lo
    out = (np.maximum(image - lo, 0.0) / (span + 1e-7)) ** gamma * span + lo
    return out.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class IntensityDraw:
    """The random choices of one `IntensityAugment` application; None means that transform does not fire."""

    noise_std: float | None = None
    smooth_sigma: tuple[float, ...] | None = None  # one σ per axis
    scale_factor: float | None = None
    lowres_zoom: float | None = None
    contrast_gamma: float | None = None

    @property
    def scale(self) -> float:
        """The multiplier of the intensity-scale transform (1 when it does not fire)."""
        return 1.0 if self.scale_factor is None else 1.0 + self.scale_factor

    def apply(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The drawn transforms on a whole image, in upstream's order; `rng` draws the noise."""
        if self.noise_std is not None:
            image = add_noise(image, rng, self.noise_std)
        if self.smooth_sigma is not None:
            image = gaussian_smooth(image, self.smooth_sigma)
        if self.scale_factor is not None:
            image = scale_intensity(image, self.scale_factor)
        if self.lowres_zoom is not None:
            image = simulate_low_resolution(image, self.lowres_zoom)
        if self.contrast_gamma is not None:
            image = adjust_contrast(image, self.contrast_gamma)
        return image.astype(np.float32, copy=False)

    def axis_matrix(self, axis: int, size: int) -> np.ndarray | None:
        """[size, size]: the smoothing then the low-resolution step along `axis` (None when neither fires).

        Applied along every axis, these matrices are the two spatial transforms of `apply`; the intensity
        scale commutes with them.
        """
        matrix = None
        if self.smooth_sigma is not None:
            matrix = smoothing_matrix(size, self.smooth_sigma[axis])
        if self.lowres_zoom is not None:
            lowres = lowres_matrix(size, self.lowres_zoom)
            matrix = lowres if matrix is None else lowres @ matrix
        return matrix


@dataclasses.dataclass(frozen=True)
class IntensityAugment:
    """The five MONAI transforms of stages 1-2, applied in upstream's order, each with its own probability.

    Field names are the keys of config `data.intensity`; defaults are the recipe's (§5, reused in §7).
    """

    noise_prob: float = 0.1
    noise_std: float = 0.1
    smooth_prob: float = 0.2
    smooth_sigma: tuple[float, float] = (0.5, 1.0)
    scale_prob: float = 0.15
    scale_factor: float = 0.25
    lowres_prob: float = 0.25
    lowres_zoom: tuple[float, float] = (0.5, 1.0)
    contrast_prob: float = 0.1
    contrast_gamma: tuple[float, float] = (0.7, 1.5)

    def __post_init__(self):
        for name in ("noise_prob", "smooth_prob", "scale_prob", "lowres_prob", "contrast_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"data.intensity.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.noise_std < 0.0 or self.scale_factor < 0.0:
            raise ConfigError("data.intensity.noise_std and scale_factor must be >= 0, got "
                             f"{self.noise_std} and {self.scale_factor}")
        for name, (lo, hi) in (("smooth_sigma", self.smooth_sigma), ("lowres_zoom", self.lowres_zoom),
                               ("contrast_gamma", self.contrast_gamma)):
            if not 0.0 < lo <= hi:
                raise ConfigError(f"data.intensity.{name} must satisfy 0 < min <= max, got {(lo, hi)}")

    def draw(self, rng: np.random.Generator, ndim: int) -> IntensityDraw:
        """Which transforms fire on one `ndim`-dimensional image, and with which parameters."""
        def fires(probability: float) -> bool:
            return rng.random() < probability

        return IntensityDraw(
            noise_std=rng.uniform(0.0, self.noise_std) if fires(self.noise_prob) else None,
            # RandGaussianSmooth draws one σ per spatial axis.
            smooth_sigma=tuple(rng.uniform(*self.smooth_sigma) for _ in range(ndim))
            if fires(self.smooth_prob) else None,
            scale_factor=rng.uniform(-self.scale_factor, self.scale_factor) if fires(self.scale_prob) else None,
            lowres_zoom=rng.uniform(*self.lowres_zoom) if fires(self.lowres_prob) else None,
            contrast_gamma=rng.uniform(*self.contrast_gamma) if fires(self.contrast_prob) else None)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Augmented float32 (z-scored) image of any rank; the input itself when no transform fires."""
        return self.draw(rng, image.ndim).apply(image, rng)
