"""Mixed precision (config.model.compute_dtype; docs/scaling.md "Mixed precision").

Upstream trains under FSDP2 `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)` on every module (backbone
blocks, heads, text tower, teacher alike) and collates its crops in bf16: each forward runs on a bfloat16 copy of
the float32 master weights, the gradients come back to the float32 parameters, and the losses upcast to float32
(docs/recipe.md §4). `cast_for_compute` is that copy; the float32 islands live in the ops themselves (LayerNorm/RMSNorm
statistics in flax, softmax in `jax.nn.dot_product_attention`, `ops.l2_normalize`, RoPE, the losses).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str) -> jnp.dtype:
    """The dtype of `config.model.compute_dtype`; a ValueError names the key and the choices."""
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"config.model.compute_dtype={name!r} must be one of {sorted(COMPUTE_DTYPES)}")
    return jnp.dtype(COMPUTE_DTYPES[name])


def cast_for_compute(tree: Any, dtype: jnp.dtype) -> Any:
    """`tree` with its floating-point leaves cast to `dtype` (integers, booleans and keys untouched).

    Under `jax.grad` the cast's transpose brings the gradients back to the leaves' own (float32) dtype; for
    float32 it is the identity.
    """
    def cast(x):
        return x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x
    return jax.tree.map(cast, tree)
