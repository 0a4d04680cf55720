"""Separable resize operators that reproduce torch `F.interpolate(..., align_corners=False)` exactly.

A 1-D resize is a linear map, so it is a matrix R [out, in]; a 2-D or 3-D resize is the separable product of
one such matrix per axis. Building the matrices explicitly (host-side numpy, float64) gives three things
the data pipeline and the patch embedding need: bit-level agreement with the PyTorch calls the upstream
recipe uses (docs/recipe.md §14.1), a pseudo-inverse for FlexiViT's PI-resize, and a resize that is just
two matmuls.

Torch has two code paths, and they use different cubic kernels:
  * antialias=True (PIL-style): Keys cubic a=-0.5 (or the triangle), support stretched by the downscale
    factor, weights renormalised over the taps that fall inside the input. Used for upsampling too.
  * antialias=False: a fixed 4-tap (cubic, a=-0.75) or 2-tap (linear) stencil at the source coordinate,
    with out-of-range taps clamped to the border (replication).
"""
from __future__ import annotations

import math

import numpy as np

_METHODS = ("cubic", "linear")


def _keys_cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with parameter `a`."""
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _triangle(x: np.ndarray) -> np.ndarray:
    return np.maximum(1.0 - np.abs(x), 0.0)


def _antialiased_matrix(in_size: int, out_size: int, method: str) -> np.ndarray:
    """torch's `_upsample_{bilinear,bicubic}2d_aa` weights (the PIL resampling filter)."""
    taps = 4 if method == "cubic" else 2
    kernel = (lambda x: _keys_cubic(x, -0.5)) if method == "cubic" else _triangle
    scale = in_size / out_size
    # Downsampling widens the filter by the scale factor so that every input sample contributes.
    support = taps / 2 * scale if scale >= 1.0 else taps / 2
    inv_scale = 1.0 / scale if scale >= 1.0 else 1.0
    matrix = np.zeros((out_size, in_size))
    for i in range(out_size):
        center = scale * (i + 0.5)
        # int() truncates toward zero exactly as torch's static_cast<int64_t> does.
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        j = np.arange(lo, hi)
        weights = kernel((j - center + 0.5) * inv_scale)
        total = weights.sum()
        if total != 0.0:
            weights = weights / total
        matrix[i, lo:hi] = weights
    return matrix


def _stencil_matrix(in_size: int, out_size: int, method: str) -> np.ndarray:
    """torch's `upsample_{bicubic2d,linear1d,bilinear2d,trilinear3d}` weights (no antialias)."""
    scale = in_size / out_size
    matrix = np.zeros((out_size, in_size))
    for i in range(out_size):
        src = scale * (i + 0.5) - 0.5
        if method == "cubic":
            # The cubic path keeps negative source coordinates and clamps the tap indices instead.
            base = math.floor(src)
            t = src - base
            weights = _keys_cubic(np.array([t + 1.0, t, 1.0 - t, 2.0 - t]), -0.75)
            for offset, weight in zip(range(-1, 3), weights):
                matrix[i, min(max(base + offset, 0), in_size - 1)] += weight
        else:
            src = max(src, 0.0)
            base = int(src)
            t = src - base
            matrix[i, base] += 1.0 - t
            matrix[i, min(base + 1, in_size - 1)] += t
    return matrix


def resize_matrix(in_size: int, out_size: int, method: str = "cubic", antialias: bool = True) -> np.ndarray:
    """The [out_size, in_size] float64 matrix of torch `F.interpolate` along one axis (align_corners=False).

    method: "cubic" (torch "bicubic") or "linear" (torch "linear"/"bilinear"/"trilinear").
    antialias: torch's `antialias` flag. torch only accepts it for 2-D bilinear/bicubic, but the matrix is
      per axis, so it is offered for any rank here.
    """
    if method not in _METHODS:
        raise ValueError(f"resize method must be one of {_METHODS}, got {method!r}")
    if in_size < 1 or out_size < 1:
        raise ValueError(f"resize sizes must be positive, got in_size={in_size}, out_size={out_size}")
    if antialias:
        return _antialiased_matrix(in_size, out_size, method)
    return _stencil_matrix(in_size, out_size, method)


def resize_2d(image: np.ndarray, out_hw: tuple[int, int], method: str = "cubic",
              antialias: bool = True) -> np.ndarray:
    """Resizes the last two axes [..., H, W] of `image` to `out_hw` like torch `F.interpolate`.

    Floating-point images are resized in their own dtype; integer images (e.g. int16 HU) in float64, since
    cubic weights overshoot and an integer result would silently truncate (docs/recipe.md §13 item 12).
    """
    image = np.asarray(image)
    if image.ndim < 2:
        raise ValueError(f"resize_2d needs an array of rank >= 2 ([..., H, W]), got shape {image.shape}")
    dtype = image.dtype if np.issubdtype(image.dtype, np.floating) else np.float64
    rows = resize_matrix(image.shape[-2], out_hw[0], method, antialias).astype(dtype)
    cols = resize_matrix(image.shape[-1], out_hw[1], method, antialias).astype(dtype)
    return rows @ image.astype(dtype, copy=False) @ cols.T
