"""Scaled dot-product attention with a per-platform kernel (config.model.attention_impl; docs/scaling.md).

  "xla"    two einsums around a float32 softmax, materialising the [B, heads, T, S] scores: the reference, and
           what every CPU run uses. It is the arithmetic of `jax.nn.dot_product_attention(implementation="xla")`
           (float32 logits and softmax whatever the input dtype, a large finite negative for masked logits),
           written heads-first ([B, heads, T, H], torch's layout) so that every dot is a plain 4-D batched
           matmul for XLA:CPU (docs/jax_notes.md §A7; bench/bench_torch_vs_jax.py, docs/benchmarks.md).
  "cudnn"  the same call with implementation="cudnn": cuDNN's fused flash attention (GPU, bf16/fp16 only,
           head_dim a multiple of 8 and at most 128).
  "splash" the Pallas TPU splash-attention kernel (`jax.experimental.pallas.ops.tpu.splash_attention`): flash
           attention in VMEM blocks, run per device under `shard_map` over the batch. The sequence is padded to a
           multiple of 128 and the padding kept out by segment ids, so padded keys get no weight.
  "auto"   cudnn on GPU in bf16/fp16 when the head fits it, splash on TPU, xla otherwise, for the platform the
           step is compiled for: the devices of the mesh being traced under (so ahead-of-time compilation for
           TPU topologies on a CPU host picks splash, as the TPU run would), else `jax.default_backend()`.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from flexict_jax import sharding

ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")
SPLASH_LANES = 128  # the splash kernel tiles the sequence in blocks of multiples of 128
CUDNN_MAX_HEAD_DIM = 128


def check_impl(impl: str) -> str:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"config.model.attention_impl={impl!r} must be one of {ATTENTION_IMPLS}")
    return impl


def target_platform() -> str:
    """The platform the code being traced will run on: that of the mesh the step is traced under (`jax.set_mesh`;
    a compile-only TPU topology on a CPU host is "tpu"), else jax's default backend. Kernels chosen per platform
    (attention here, the dense layers' backward in layers.py) ask this, so an ahead-of-time TPU plan compiles
    what a TPU run would run."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return device.platform if device is not None else jax.default_backend()


def resolve(impl: str, dtype: jnp.dtype, head_dim: int, platform: str | None = None) -> str:
    """The kernel `impl` stands for on `platform` (default: `target_platform()`) for this dtype and head."""
    check_impl(impl)
    if impl != "auto":
        return impl
    if platform is None:
        platform = target_platform()
    if (platform in ("gpu", "cuda") and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            and head_dim % 8 == 0 and head_dim <= CUDNN_MAX_HEAD_DIM):
        return "cudnn"
    if platform == "tpu":
        return "splash"
    return "xla"


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, impl: str = "xla",
                          key_mask: jax.Array | None = None, is_causal: bool = False,
                          interpret: bool = False) -> jax.Array:
    """softmax(scale·q·kᵀ)·v for q [B, T, N, H] and k, v [B, S, K, H] (N a multiple of K: grouped-query).

    key_mask: optional [B, S] bool, False = a padding key nobody attends to (a query row with no allowed key
        gets a finite, meaningless output). is_causal: query i attends to keys j <= i (needs T == S).
    interpret: run the splash kernel in Pallas' interpreter (tests on CPU).
    """
    impl = resolve(impl, q.dtype, q.shape[-1])
    if impl == "splash":
        out = _splash_sharded(q, k, v, scale=scale, key_mask=key_mask, is_causal=is_causal, interpret=interpret)
        if out is not None:
            return out
        impl = "xla"  # a batch the mesh does not divide (e.g. a drop-path subset): see _splash_sharded
    if impl == "cudnn":
        mask = None if key_mask is None else key_mask[:, None, None, :]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, scale=scale,
                                            implementation="cudnn")
    return _xla(q, k, v, scale=scale, key_mask=key_mask, is_causal=is_causal)


def _xla(q, k, v, *, scale, key_mask, is_causal):
    batch, length, heads, head_dim = q.shape
    kv_heads, keys = k.shape[2], k.shape[1]
    group = heads // kv_heads

    def heads_first(x):  # [B, T, N, H] -> [B, N, T, H]: batched dots with leading batch dims, as torch's layout
        return x.transpose(0, 2, 1, 3)
    # Query head h reads kv head h // group (transformers' repeat_kv order): heads-first, a kv head's `group`
    # query heads are consecutive, so they fold into its rows ([B, K, G·T, H]) and every dot is a plain 4-D
    # batched matmul (docs/jax_notes.md §A7).
    q = heads_first(q).reshape(batch, kv_heads, group * length, head_dim)
    k, v = heads_first(k), heads_first(v)
    # bf16 operands, float32 logits; the explicit algorithm keeps the backward dots (float32 cotangents) bf16 too,
    # as jax's own version does (jax-ml/jax#24047).
    algorithm = jax.lax.DotAlgorithmPreset.BF16_BF16_F32 if q.dtype == jnp.bfloat16 else None
    logits = jnp.einsum("bkqh,bksh->bkqs", q, k, precision=algorithm,
                        preferred_element_type=jnp.promote_types(q.dtype, jnp.float32))
    logits = logits * jnp.float32(scale)
    allowed = None if key_mask is None else key_mask[:, None, None, None, :]
    if is_causal:
        causal = jnp.tril(jnp.ones((length, keys), bool))
        allowed = causal if allowed is None else allowed & causal
    if allowed is not None:  # finite, as jax's: a row with no allowed key averages all values instead of NaN
        logits = logits.reshape(batch, kv_heads, group, length, keys)
        logits = jnp.where(allowed, logits, -0.7 * jnp.finfo(logits.dtype).max)
        logits = logits.reshape(batch, kv_heads, group * length, keys)
    # jax's own softmax derivative (off by default in this jax): its backward keeps the probabilities alone,
    # where autodiff of the formula also keeps exp(logits - max), one more [B, heads, T, S] array per block
    # (docs/jax_notes.md §A7).
    with jax.softmax_custom_jvp(True):
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkqs,bksh->bkqh", probs, v)
    return out.reshape(batch, heads, length, head_dim).transpose(0, 2, 1, 3)


def _splash_sharded(q, k, v, *, scale, key_mask, is_causal, interpret) -> jax.Array | None:
    """Splash attention per device: shard_map over the batch (and heads) as the activations are sharded; None
    when the batch rows do not split evenly over the mesh's batch axes."""
    if key_mask is None:
        key_mask = jnp.ones(k.shape[:2], bool)
    run = functools.partial(_splash_local, scale=scale, is_causal=is_causal, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return run(q, k, v, key_mask)
    spec = sharding.logical_to_spec(("batch", "length", "heads", None))
    batch_axes, head_axes = spec[0], spec[2]

    def size(entry) -> int:
        return math.prod(mesh.shape[a] for a in sharding.spec_axes(entry))
    if q.shape[0] % size(batch_axes) or k.shape[2] % size(head_axes):
        return None
    return jax.shard_map(run, mesh=mesh, in_specs=(spec, spec, spec, P(batch_axes, None)), out_specs=spec,
                         check_vma=False)(q, k, v, key_mask)


def _splash_local(q, k, v, key_mask, *, scale, is_causal, interpret):
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as kernel_lib,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as mask_lib,
    )
    _, length, heads, _ = q.shape
    if k.shape[1] != length:
        raise ValueError(f"splash attention: queries ({length}) and keys ({k.shape[1]}) differ in length")
    padded = -(-length // SPLASH_LANES) * SPLASH_LANES
    block = next(b for b in (512, 256, 128) if padded % b == 0)

    def heads_first(x):  # [B, T, N, H] -> [B, N, padded, H]
        return jnp.pad(x, ((0, 0), (0, padded - length), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    # Segment 0 = real tokens, 1 = padding and masked tokens: a real query never sees a key of segment 1, and a
    # padding query sees padding keys (itself at least), so no row is empty.
    segments = jnp.pad(jnp.where(key_mask, 0, 1), ((0, 0), (0, padded - length)), constant_values=1).astype(jnp.int32)
    shape = (padded, padded)
    head_mask = mask_lib.CausalMask(shape) if is_causal else mask_lib.FullMask(shape)
    blocks = kernel_lib.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                                   block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                                   block_kv_dq=block)
    splash = kernel_lib.make_splash_mha(mask_lib.MultiHeadMask([head_mask] * heads), block_sizes=blocks,
                                        head_shards=1, q_seq_shards=1, interpret=interpret)
    # The kernel takes no scale: it is folded into q, as MaxText does.
    out = jax.vmap(lambda q_, k_, v_, sq, skv: splash(q_, k_, v_, segment_ids=kernel_lib.SegmentIds(sq, skv)))(
        heads_first(q * jnp.asarray(scale, q.dtype)), heads_first(k), heads_first(v), segments, segments)
    return out.transpose(0, 2, 1, 3)[:, :length]
