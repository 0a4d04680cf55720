"""Sinkhorn-Knopp centering of teacher logits (docs/recipe.md §3.1).

The teacher's DINO-head (CLS) and iBOT-head (masked patch) outputs are turned into targets by a few
Sinkhorn-Knopp iterations that balance the batch over the prototypes. Upstream all-reduces the sums across
GPUs; here the function is written on global arrays, so under `jax.jit` with a batch sharded over the mesh,
every `jnp.sum` over the sample axis is already the global sum (XLA inserts the all-reduce).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _divide_or_zero(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """`numerator / denominator` for non-negative sums whose terms are all in `numerator`.

    A zero sum means every term is zero (padding rows, no valid row at all, or a prototype whose mass
    underflowed), so the quotient is zero instead of 0/0 = NaN.
    """
    return numerator / jnp.where(denominator > 0, denominator, 1.0)


def sinkhorn_knopp(teacher_logits: jax.Array, temperature: float | jax.Array, *, n_iterations: int = 3,
                   valid: jax.Array | None = None) -> jax.Array:
    """Teacher targets from teacher logits by Sinkhorn-Knopp (docs/recipe.md §3.1, `train.centering: sinkhorn_knopp`).

    Upstream works on Q = exp(logits/τ)ᵀ (K×N): divide by the total, then `n_iterations` times divide each
    prototype row by its sum and by K, and each sample column by its sum and by N; finally multiply by N and
    transpose. This implementation keeps the [N, K] layout (same arithmetic, no transposes) and subtracts the
    global max of logits/τ before `exp`: every entry is scaled by the same factor, which the first
    normalisation removes, so the result is unchanged but no longer overflows (upstream has no such shift).

    Args:
      teacher_logits: [N, K] teacher head outputs; N = all (global) samples, K = prototypes. Any float dtype;
        the computation runs in float32.
      temperature: teacher temperature τ_t (scheduled per stage, docs/recipe.md §5-§8).
      n_iterations: Sinkhorn-Knopp iterations (3 in every FlexiCT config).
      valid: optional [N] bool. Rows marked False (padding of the fixed-size iBOT buffer, docs/recipe.md §14.1) take
        no part in any sum, N counts only valid rows, and their output rows are zero.

    Returns:
      [N, K] float32 targets; each valid row sums to 1, each prototype receives about N_valid/K in total.
      Gradients are stopped: the targets are constants for the student (upstream runs under no_grad).
    """
    if teacher_logits.ndim != 2:
        raise ValueError(f"sinkhorn_knopp: teacher_logits must be [N, K], got shape {teacher_logits.shape}")
    logits = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32)
    n_prototypes = logits.shape[1]
    if valid is None:
        valid = jnp.ones(logits.shape[:1], dtype=bool)
    elif valid.shape != logits.shape[:1]:
        raise ValueError(f"sinkhorn_knopp: valid must have shape {logits.shape[:1]}, got {valid.shape}")
    valid_rows = valid[:, None]
    n_valid = jnp.sum(valid, dtype=jnp.float32)

    scaled = jnp.where(valid_rows, logits / temperature, -jnp.inf)
    shift = jnp.max(scaled)
    # All rows invalid: the max is -inf; any finite shift then gives exp(-inf) = 0 everywhere.
    shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
    q = jnp.exp(scaled - shift)
    q = _divide_or_zero(q, jnp.sum(q))
    for _ in range(n_iterations):
        q = _divide_or_zero(q, jnp.sum(q, axis=0, keepdims=True) * n_prototypes)
        q = _divide_or_zero(q, jnp.sum(q, axis=1, keepdims=True) * n_valid)
    return q * n_valid
