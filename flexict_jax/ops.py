"""Numerical building blocks shared by models and losses."""
from __future__ import annotations

import jax
import jax.numpy as jnp

NORMALIZE_EPS = 1e-12  # torch F.normalize


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = NORMALIZE_EPS) -> jax.Array:
    """x / max(‖x‖, eps), as torch `F.normalize`, with a finite gradient everywhere.

    `x / jnp.maximum(jnp.linalg.norm(x), eps)` has a NaN gradient where ‖x‖ is 0 — which happens in practice:
    at initialisation the bottleneck of a masked token (zero mask token, LayerScale 1e-5) is so small that its
    squared norm underflows to 0 in float32. Clamping the squared norm keeps both the value and the gradient
    torch's.
    """
    squared = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(squared, eps * eps))
