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
    torch's. The arithmetic runs in float32 at least (a bf16 input is normalised in float32 and rounded back: the
    DINO/iBOT bottleneck feeds a bf16 prototype matmul under mixed precision, docs/scaling.md).
    """
    y = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    squared = jnp.sum(jnp.square(y), axis=axis, keepdims=True)
    return (y * jax.lax.rsqrt(jnp.maximum(squared, eps * eps))).astype(x.dtype)
