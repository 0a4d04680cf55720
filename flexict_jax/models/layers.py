"""Transformer building blocks of the FlexiCT backbone and heads (docs/recipe.md §2.1, docs/torch_format.md §2.4).

Every parameter carries logical axis names (`nnx.with_partitioning`); the config maps them onto the mesh.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from flexict_jax.models import attention, rope

LAYER_NORM_EPS = 1e-6  # docs/recipe.md §2.1


def trunc_normal(std: float = 0.02) -> nnx.Initializer:
    """torch `trunc_normal_(std=std)`: N(0, std²) cut at ±2 in absolute units, i.e. at ±2/std sigmas.

    jax's `truncated_normal(std)` cuts at ±2 sigmas and rescales, a visibly narrower distribution.
    """
    def init(key, shape, dtype=jnp.float32):
        return std * jax.random.truncated_normal(key, -2.0 / std, 2.0 / std, shape, dtype)
    return init


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dense(x: jax.Array, kernel: jax.Array, precision, preferred_element_type) -> jax.Array:
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision,
                               preferred_element_type=preferred_element_type)


def _dense_fwd(x, kernel, precision, preferred_element_type):
    return _dense(x, kernel, precision, preferred_element_type), (x, kernel)


def _dense_bwd(precision, preferred_element_type, residuals, g):
    x, kernel = residuals
    dx = jax.lax.dot_general(g, kernel, (((g.ndim - 1,), (1,)), ((), ())), precision=precision,
                             preferred_element_type=preferred_element_type)
    # The kernel gradient xᵀ·g as one 2-D dot contracting the token rows of both operands: XLA:CPU runs it on
    # Eigen, which reads x transposed in place, 13-25 % faster on one thread than YNNPACK on a materialised xᵀ
    # (docs/jax_notes.md §A7). Autodiff's own form contracts the batch and token axes of 3-D operands, for which
    # XLA transposes the cotangent instead, recomputing the fusion that produces it.
    dkernel = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]), (((0,), (0,)), ((), ())),
                                  precision=precision, preferred_element_type=preferred_element_type)
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


_dense.defvjp(_dense_fwd, _dense_bwd)


def dense_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None,
                      preferred_element_type=None, out_sharding=None) -> jax.Array:
    """`nnx.Linear`'s dot_general (last axis of lhs with the first of rhs) with the XLA:CPU-friendly backward above
    on CPU. Other platforms contract transposed operands natively: plain `lax.dot_general` there. The platform is
    the one the step is traced for (`attention.target_platform`), as for attention_impl="auto"."""
    if (out_sharding is not None or dimension_numbers != (((lhs.ndim - 1,), (0,)), ((), ()))
            or attention.target_platform() != "cpu"):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type, out_sharding=out_sharding)
    return _dense(lhs, rhs, precision, preferred_element_type)


_SQRT_HALF = 0.7071067811865476  # 1/√2
_INV_SQRT_2PI = 0.3989422804014327  # 1/√(2π)


@jax.custom_jvp
def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, x·Φ(x), written as torch writes it: 0.5·x·(1 + erf(x/√2)).

    `jax.nn.gelu(approximate=False)` goes through erfc, which XLA expands into a two-branch rational-and-exp
    formula several times the cost of erf's single rational one, and its autodiff keeps that formula's
    intermediates for the backward pass. Here the derivative Φ(x) + x·φ(x) is written out, so the backward keeps
    one array (docs/jax_notes.md §A7).
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * _SQRT_HALF))


@gelu.defjvp
def _gelu_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    cdf = 0.5 * (1.0 + jax.lax.erf(x * _SQRT_HALF))
    pdf = _INV_SQRT_2PI * jnp.exp(-0.5 * jnp.square(x))
    return x * cdf, (cdf + x * pdf) * t


def linear(in_features: int, out_features: int, names: tuple[str | None, str | None], *, use_bias: bool = True,
           init_std: float = 0.02, rngs: nnx.Rngs) -> nnx.Linear:
    """Linear layer with trunc-normal(0.02) kernel and zero bias (docs/recipe.md §2.1); bias named by the output axis."""
    return nnx.Linear(
        in_features, out_features, use_bias=use_bias, rngs=rngs, dot_general=dense_dot_general,
        kernel_init=nnx.with_partitioning(trunc_normal(init_std), names),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (names[1],)))


def layer_norm(dim: int, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Two-pass variance, as torch computes it (docs/torch_format.md §2.7).
    return nnx.LayerNorm(
        dim, epsilon=LAYER_NORM_EPS, use_fast_variance=False, rngs=rngs,
        scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",)))


class LayerScale(nnx.Module):
    def __init__(self, dim: int, init_value: float):
        self.gamma = nnx.Param(jnp.full((dim,), init_value, jnp.float32), out_sharding=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.gamma[...]


class Mlp(nnx.Module):
    def __init__(self, dim: int, hidden_dim: int, *, rngs: nnx.Rngs):
        self.fc1 = linear(dim, hidden_dim, ("embed", "mlp"), rngs=rngs)
        self.fc2 = linear(hidden_dim, dim, ("mlp", "embed"), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(gelu(self.fc1(x)))


class Attention(nnx.Module):
    """Multi-head self-attention with a fused bias-free qkv and RoPE on the patch tokens.

    qkv kernel column = s·dim + h·head_dim + d for s in (q, k, v): the torch row order (docs/torch_format.md §1.5).
    """

    def __init__(self, dim: int, num_heads: int, *, rope_bf16: bool, attention_impl: str = "auto",
                 rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.rope_bf16 = rope_bf16
        self.attention_impl = attention.check_impl(attention_impl)
        self.qkv = linear(dim, 3 * dim, ("embed", "qkv"), use_bias=False, rngs=rngs)
        self.proj = linear(dim, dim, ("heads", "embed"), rngs=rngs)

    def __call__(self, x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
        batch, length, dim = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q = rope.apply_rope(q, sin, cos, bf16=self.rope_bf16)
        k = rope.apply_rope(k, sin, cos, bf16=self.rope_bf16)
        out = attention.dot_product_attention(q, k, v, scale=(dim // self.num_heads) ** -0.5,
                                              impl=self.attention_impl)
        return self.proj(out.reshape(batch, length, dim))


def batch_subset_residual(x: jax.Array, branch: Callable[[jax.Array], jax.Array], rate: float,
                          key: jax.Array | None, groups: int = 1) -> jax.Array:
    """x + branch(x), with DINOv2's batch-subset stochastic depth when `key` is given (docs/recipe.md §2.1).

    The rows of `x` are split into `groups` equal consecutive groups; in each, a random subset of
    max(int(g·(1-rate)), 1) of its g rows gets the branch, scaled by g/subset; the others skip it. Upstream draws
    the subset per GPU batch; fixed groups keep that meaning whatever the mesh, and keep the gather inside a device
    when the groups follow the batch sharding (one group over the global batch gathers across all devices:
    docs/scaling.md §4). Unlike per-sample Bernoulli drop-path, the branch is only computed for the subset.
    """
    rows = x.shape[0]
    if rows % groups:
        raise ValueError(f"{rows} rows cannot be split into {groups} drop-path groups")
    size = rows // groups
    subset = max(int(size * (1.0 - rate)), 1)
    if key is None or subset == size:
        return x + branch(x)
    # No sharding constraint: the reshape of batch-sharded rows keeps whole groups on a device when a device holds
    # whole groups, and splits a group over devices (gathering within it only) when it does not.
    grouped = x.reshape((groups, size) + x.shape[1:])
    index = jnp.argsort(jax.random.uniform(key, (groups, size)), axis=1)[:, :subset]  # a permutation per group
    chosen = jnp.take_along_axis(grouped, index.reshape(index.shape + (1,) * (x.ndim - 1)), axis=1)
    update = branch(chosen.reshape((groups * subset,) + x.shape[1:])) * (size / subset)
    rows_of = jnp.arange(groups)[:, None]
    grouped = grouped.at[rows_of, index].add(update.reshape(chosen.shape))
    return grouped.reshape(x.shape)


class Block(nnx.Module):
    """Pre-norm transformer block with LayerScale on both residual branches (docs/torch_format.md §2.4)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, *, layerscale_init: float,
                 drop_path_rate: float, rope_bf16: bool, attention_impl: str = "auto", rngs: nnx.Rngs):
        self.drop_path_rate = drop_path_rate
        self.norm1 = layer_norm(dim, rngs=rngs)
        self.attn = Attention(dim, num_heads, rope_bf16=rope_bf16, attention_impl=attention_impl, rngs=rngs)
        self.ls1 = LayerScale(dim, layerscale_init)
        self.norm2 = layer_norm(dim, rngs=rngs)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), rngs=rngs)
        self.ls2 = LayerScale(dim, layerscale_init)

    def __call__(self, x: jax.Array, sin: jax.Array, cos: jax.Array, key: jax.Array | None = None,
                 drop_path_groups: int = 1) -> jax.Array:
        """key: None for the deterministic forward; otherwise drives stochastic depth (train mode) drawn in
        `drop_path_groups` groups of rows (see batch_subset_residual)."""
        attn_key, mlp_key = (None, None) if key is None else jax.random.split(key)
        x = batch_subset_residual(x, lambda h: self.ls1(self.attn(self.norm1(h), sin, cos)), self.drop_path_rate,
                                  attn_key, drop_path_groups)
        return batch_subset_residual(x, lambda h: self.ls2(self.mlp(self.norm2(h))), self.drop_path_rate, mlp_key,
                                     drop_path_groups)
