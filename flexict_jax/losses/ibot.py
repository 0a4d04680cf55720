"""iBOT masked-patch loss over a fixed-size buffer of masked tokens (docs/recipe.md §3.3, §5 masking, §14.1).

The number of masked tokens changes every step, but jitted shapes must not. So the masked tokens of all
global-crop images are gathered into a buffer of `max_tokens` rows (sized by the trainer to the largest
possible count); unused rows are padding with `valid = False` and weight 0.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def gather_masked(masks: jax.Array | np.ndarray, max_tokens: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Static-size indices of the masked tokens and their iBOT weights.

    Args:
      masks: [I, N] bool, True where patch token n of global-crop image i is masked (and predicted).
      max_tokens: buffer size M.

    Returns:
      indices: [M] int32 into the flattened [I·N] token axis, in row-major order; padding points at token 0
        (a real token, so gathering it is safe).
      valid: [M] bool, False for padding.
      weights: [M] float32, 1/n_masked(image of the token) for valid rows (docs/recipe.md §3.3), 0 for padding.

    Capacity: when `masks` is a concrete (host or device) array, more than `max_tokens` masked tokens raises
    ValueError. Under `jit` it cannot be checked: the first `max_tokens` masked tokens in row-major order are
    kept and the rest are silently dropped (their images then weigh less than 1). The trainer avoids this by
    sizing M to the maximum possible count.
    """
    if masks.ndim != 2:
        raise ValueError(f"gather_masked: masks must be [images, tokens], got shape {masks.shape}")
    if max_tokens < 1:
        raise ValueError(f"gather_masked: max_tokens must be >= 1, got {max_tokens}")
    if not isinstance(masks, jax.core.Tracer):
        n_total = int(np.count_nonzero(np.asarray(masks)))
        if n_total > max_tokens:
            raise ValueError(f"gather_masked: {n_total} masked tokens do not fit the buffer of {max_tokens}")
    masks = jnp.asarray(masks, dtype=bool)
    n_tokens = masks.shape[1]
    # The k-th masked token sits where the running count of masked tokens first reaches k: the indices
    # jnp.nonzero(size=M, fill_value=0) gives, found without its integer scatter-add (bincount), which the
    # TPU cost model cannot price (`plan --topology` would get no step-time estimate).
    running = jnp.cumsum(masks.reshape(-1), dtype=jnp.int32)
    n_masked = jnp.sum(masks, axis=1)
    valid = jnp.arange(max_tokens) < running[-1]
    indices = jnp.where(valid, jnp.searchsorted(running, jnp.arange(1, max_tokens + 1), side="left"), 0)
    image_weight = 1.0 / jnp.maximum(n_masked, 1).astype(jnp.float32)
    weights = jnp.where(valid, image_weight[indices // n_tokens], 0.0)
    return indices.astype(jnp.int32), valid, weights


def ibot_patch_loss(student_logits: jax.Array, teacher_probs: jax.Array, weights: jax.Array,
                    n_images: int | jax.Array, student_temperature: float = 0.1) -> jax.Array:
    """L = −(1/n_images) Σ_m w_m Σ_k t·log_softmax(s/τ_s) over the masked-token buffer (docs/recipe.md §3.3).

    With w_m = 1/n_masked(image) every masked image contributes its mean token loss, however many tokens it
    has masked.

    Args:
      student_logits: [M, K] student iBOT-head logits at the buffer's tokens.
      teacher_probs: [M, K] teacher targets at the same tokens (e.g. `sinkhorn_knopp(..., valid=valid)`).
      weights: [M] from `gather_masked`; 0 marks padding, whose rows are ignored whatever they contain.
      n_images: number of global-crop images, counting the ~50% that carry no mask at all.
      student_temperature: τ_s = 0.1 (docs/recipe.md §3).

    Returns:
      float32 scalar.
    """
    if student_logits.ndim != 2 or student_logits.shape != teacher_probs.shape:
        raise ValueError(f"ibot_patch_loss: expected student and teacher [M, K], got {student_logits.shape} "
                         f"and {teacher_probs.shape}")
    if weights.shape != student_logits.shape[:1]:
        raise ValueError(f"ibot_patch_loss: weights must have shape {student_logits.shape[:1]}, "
                         f"got {weights.shape}")
    log_probs = jax.nn.log_softmax(student_logits.astype(jnp.float32) / student_temperature, axis=-1)
    cross_entropy = -jnp.sum(teacher_probs.astype(jnp.float32) * log_probs, axis=-1)
    # where(), not a plain product: 0 · inf in a padding row would otherwise turn the loss into NaN.
    weighted = jnp.where(weights > 0, weights * cross_entropy, 0.0)
    return jnp.sum(weighted) / n_images
