"""Gram anchoring: the student's patch-token similarities follow a frozen Gram teacher's (docs/recipe.md §3.5, §6).

The Gram teacher sees the same field of view as the student at a higher resolution (stage 1.1), so its patch
grid is resized to the student's first. Upstream resizes with torch `F.interpolate(align_corners=False)` without
antialias -- bicubic (Keys a = -0.75, border replicated) in 2-D, trilinear in 3-D (docs/recipe.md §14.1) -- which is
neither the PI-resize kernel nor `jax.image.resize("cubic")`; so the resize is done here as one explicit
`flexict_jax.resize` matrix per axis, applied on device.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from flexict_jax.ops import l2_normalize
from flexict_jax.resize import resize_matrix

# torch's interpolate mode for the teacher features per grid rank, as `resize_matrix` (method, antialias).
_GRID_RESIZE_MODE = {2: ("cubic", False), 3: ("linear", False)}


@functools.cache
def _axis_matrix(n_from: int, n_to: int, rank: int) -> np.ndarray:
    method, antialias = _GRID_RESIZE_MODE[rank]
    return resize_matrix(n_from, n_to, method, antialias).astype(np.float32)


def resize_patch_grid(tokens: jax.Array, grid_from: tuple[int, ...], grid_to: tuple[int, ...]) -> jax.Array:
    """Patch tokens [B, ∏grid_from, D] (row-major grid) -> [B, ∏grid_to, D], resized like upstream's Gram teacher.

    2-D grids (h, w): torch bicubic, align_corners=False, no antialias; 3-D grids (d, h, w): trilinear. The
    result is float32.
    """
    grid_from, grid_to = tuple(grid_from), tuple(grid_to)
    rank = len(grid_from)
    if rank not in _GRID_RESIZE_MODE or len(grid_to) != rank:
        raise ValueError(f"resize_patch_grid: grids must both be 2-D or both 3-D, got {grid_from} -> {grid_to}")
    if min(grid_from + grid_to) < 1:
        raise ValueError(f"resize_patch_grid: grid sizes must be positive, got {grid_from} -> {grid_to}")
    if tokens.ndim != 3 or tokens.shape[1] != np.prod(grid_from):
        raise ValueError(f"resize_patch_grid: tokens must be [batch, {int(np.prod(grid_from))} (= grid "
                         f"{grid_from}), dim], got shape {tokens.shape}")
    x = tokens.astype(jnp.float32)
    if grid_from == grid_to:
        return x
    batch, dim = x.shape[0], x.shape[-1]
    x = x.reshape((batch,) + grid_from + (dim,))
    for axis, (n_from, n_to) in enumerate(zip(grid_from, grid_to), start=1):
        if n_from != n_to:
            matrix = jnp.asarray(_axis_matrix(n_from, n_to, rank))
            # Full fp32 products: these are loss targets, and TPU/GPU default precision would round them to bf16.
            x = jnp.moveaxis(jnp.tensordot(matrix, x, axes=(1, axis), precision=jax.lax.Precision.HIGHEST), 0, axis)
    return x.reshape(batch, -1, dim)


def _l2_normalize(x: jax.Array, eps: float) -> jax.Array:
    # torch F.normalize semantics: x / max(‖x‖, eps).
    return l2_normalize(x, eps=eps)


def gram_loss(student_patch: jax.Array, teacher_patch: jax.Array, eps: float = 1e-12) -> jax.Array:
    """L = mean over (b, p, q) of (Xs Xsᵀ − Xt Xtᵀ)² with L2-normalised tokens (docs/recipe.md §3.5).

    Per image (`img_level: true`), all tokens (`tokens_used: all`), negative similarities kept
    (`remove_neg: false`). The teacher side gets no gradient.

    Args:
      student_patch: [B, P, D] student patch tokens (post-norm, pre-head) of the masked global crops.
      teacher_patch: [B, P, D] Gram-teacher patch tokens on the same grid (see `resize_patch_grid`).
      eps: the normalisation floor of torch's F.normalize.

    Returns:
      float32 scalar.
    """
    if student_patch.ndim != 3 or student_patch.shape != teacher_patch.shape:
        raise ValueError(f"gram_loss: expected student and teacher patch tokens of one shape [batch, tokens, dim], "
                         f"got {student_patch.shape} and {teacher_patch.shape}")
    student = _l2_normalize(student_patch.astype(jnp.float32), eps)
    teacher = _l2_normalize(jax.lax.stop_gradient(teacher_patch).astype(jnp.float32), eps)
    student_gram = jnp.einsum("bpd,bqd->bpq", student, student)
    teacher_gram = jnp.einsum("bpd,bqd->bpq", teacher, teacher)
    return jnp.mean(jnp.square(student_gram - teacher_gram))
