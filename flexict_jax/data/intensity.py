"""Per-slice intensity: HU window + z-score, and the MONAI intensity augmentations of stage 1 (recipe §5).

Pure numpy/scipy on 2-D float32 images. Each transform reproduces the MONAI class upstream uses
(`dinov3/data/augmentations.py`, `SimpleDataAugmentationDINO`), with parameters drawn from the
`np.random.Generator` passed in instead of MONAI's process-global RandomState (recipe §13 #7).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import scipy.ndimage
import scipy.special

from flexict_jax import resize


def normalize_hu(hu: np.ndarray, window: tuple[float, float] = (-1000.0, 1000.0)) -> np.ndarray:
    """float32: HU clamped to `window`, then z-scored with the slice's unbiased std (recipe §5).

    Upstream calls this `zero_to_one`, but it is a z-score; a flat slice (std < 1e-6) is only mean-centred.
    """
    x = np.clip(hu.astype(np.float64), window[0], window[1])
    mean = x.mean()
    std = x.std(ddof=1) if x.size > 1 else 0.0
    x = x - mean if std < 1e-6 else (x - mean) / std
    return x.astype(np.float32)


def gaussian_noise(image: np.ndarray, rng: np.random.Generator, max_std: float) -> np.ndarray:
    """MONAI RandGaussianNoise(mean=0, std=max_std, sample_std=True): the std itself is U(0, max_std)."""
    std = rng.uniform(0.0, max_std)
    return image + rng.normal(0.0, std, size=image.shape).astype(np.float32)


def _erf_kernel(sigma: float) -> np.ndarray:
    # MONAI `gaussian_1d(approx="erf", truncated=4)`: the Gaussian integrated over each unit pixel, not
    # renormalised; radius int(max(4σ, 0.5) + 0.5).
    radius = int(max(sigma * 4.0, 0.5) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    t = 1.0 / (math.sqrt(2.0) * sigma)
    return np.maximum(0.5 * (scipy.special.erf(t * (x + 0.5)) - scipy.special.erf(t * (x - 0.5))), 0.0)


def gaussian_smooth(image: np.ndarray, sigma: tuple[float, float]) -> np.ndarray:
    """MONAI GaussianSmooth(sigma=(σ_rows, σ_cols), approx="erf"): separable, zero padding outside the image."""
    out = image.astype(np.float32)
    for axis, s in enumerate(sigma):
        out = scipy.ndimage.correlate1d(out, _erf_kernel(float(s)).astype(np.float32), axis=axis,
                                        mode="constant", cval=0.0)
    return out


def scale_intensity(image: np.ndarray, factor: float) -> np.ndarray:
    """MONAI ScaleIntensity(factor): x·(1 + factor)."""
    return (image * np.float32(1.0 + factor)).astype(np.float32)


def _nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    # torch F.interpolate(mode="nearest") (legacy, not "nearest-exact"): source index floor(dst·in/out), with
    # the scale and the product in float32 as torch computes them (float64 picks other pixels, e.g. 60 -> 44).
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(src, in_size - 1)


def simulate_low_resolution(image: np.ndarray, zoom: float) -> np.ndarray:
    """MONAI RandSimulateLowResolution body: resize to round(shape·zoom) with nearest, back with (bi)linear.

    Upstream keeps MONAI's default `upsample_mode="trilinear"`, which MONAI maps to bilinear for 2-D input; no
    antialiasing on either step, align_corners=False.
    """
    (height, width), image = image.shape, image.astype(np.float32, copy=False)
    low_h, low_w = (max(int(v), 1) for v in np.round(np.array(image.shape) * zoom))
    low = image[np.ix_(_nearest_indices(height, low_h), _nearest_indices(width, low_w))]
    rows = resize.resize_matrix(low_h, height, "linear", antialias=False).astype(np.float32)
    cols = resize.resize_matrix(low_w, width, "linear", antialias=False).astype(np.float32)
    return rows @ low @ cols.T


def adjust_contrast(image: np.ndarray, gamma: float) -> np.ndarray:
    """MONAI AdjustContrast(gamma): ((x - min) / (range + 1e-7))^γ · range + min, so min and max stay put."""
    lo = image.min()
    value_range = image.max() - lo
    out = ((image - lo) / (value_range + 1e-7)) ** gamma * value_range + lo
    return out.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class IntensityAugment:
    """The five MONAI transforms of stage 1, applied in upstream's order, each with its own probability.

    Field names are the keys of config `data.intensity`; defaults are the recipe's (§5).
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
                raise ValueError(f"data.intensity.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.noise_std < 0.0 or self.scale_factor < 0.0:
            raise ValueError("data.intensity.noise_std and scale_factor must be >= 0, got "
                             f"{self.noise_std} and {self.scale_factor}")
        for name, (lo, hi) in (("smooth_sigma", self.smooth_sigma), ("lowres_zoom", self.lowres_zoom),
                               ("contrast_gamma", self.contrast_gamma)):
            if not 0.0 < lo <= hi:
                raise ValueError(f"data.intensity.{name} must satisfy 0 < min <= max, got {(lo, hi)}")

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Augmented float32 2-D (z-scored) slice; the input itself when no transform fires."""
        if rng.random() < self.noise_prob:
            image = gaussian_noise(image, rng, self.noise_std)
        if rng.random() < self.smooth_prob:
            # RandGaussianSmooth(sigma_x=sigma_y=smooth_sigma) draws one σ per axis.
            image = gaussian_smooth(image, (rng.uniform(*self.smooth_sigma), rng.uniform(*self.smooth_sigma)))
        if rng.random() < self.scale_prob:
            image = scale_intensity(image, rng.uniform(-self.scale_factor, self.scale_factor))
        if rng.random() < self.lowres_prob:
            image = simulate_low_resolution(image, rng.uniform(*self.lowres_zoom))
        if rng.random() < self.contrast_prob:
            image = adjust_contrast(image, rng.uniform(*self.contrast_gamma))
        return image.astype(np.float32, copy=False)
