"""Transformer text encoder for stage 3 (docs/recipe.md §2.5, §14.1): the from-scratch tower and the Qwen3 blocks.

One architecture serves both text towers of the stage-3 config:
  - trained from scratch on a sentencepiece vocabulary: bidirectional attention, mean pooling;
  - Qwen3(-Embedding) imported from Hugging Face (`qwen3.py`): causal attention, last-token pooling.
The block is Qwen3's (docs/torch_format.md §3.1): pre-norm RMSNorm, grouped-query attention with per-head q/k RMSNorm
applied before a 1-D rotate-half RoPE, SwiGLU MLP, no biases, no dropout. Parameter names follow the Hugging
Face module names (self_attn.q_proj, mlp.gate_proj, input_layernorm, ...), so the Qwen3 converter is a rename
plus transposes.

Why the from-scratch tower is bidirectional: a report embedding is a summary of the whole text, not a
next-token predictor. With full attention every token, and so the mean over tokens, sees the whole report;
causal masking would leave only the last token informed and buys nothing without a generation objective.
Mean pooling over the valid tokens then uses every token's output as a training signal.

Padding: `mask` marks real tokens. Padded keys are masked out of attention, and pooling reads only real
tokens, so padding (left or right, any pad id) does not change the pooled output. RoPE positions are 0..L-1
whatever the padding, as in Hugging Face; attention depends only on position differences, so a left-padded
sequence matches its unpadded self up to float rounding (docs/torch_format.md §3.1 measured ≤ 1e-6).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flexict_jax import sharding
from flexict_jax.models import attention, rope
from flexict_jax.models.layers import linear
from flexict_jax.models.vit import RESIDUAL_AXES

POOLINGS = ("mean", "last")
EMBEDDING_INIT_STD = 0.02  # Hugging Face Qwen3 `initializer_range`


def rms_norm(dim: int, eps: float, *, rngs: nnx.Rngs) -> nnx.RMSNorm:
    return nnx.RMSNorm(dim, epsilon=eps, rngs=rngs,
                       scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)))


def text_rope_sincos(length: int, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """1-D rotate-half RoPE tables [length, head_dim] for positions 0..length-1 (Hugging Face "default").

    Frequencies theta^(-2j/head_dim), j < head_dim/2, each used twice ([f, f] layout), in float32 as
    transformers computes them; `rope.apply_rope` then rotates channel j with j + head_dim/2.
    """
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)
    angles = jnp.arange(length, dtype=jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.sin(angles), jnp.cos(angles)


def pool_tokens(hidden: jax.Array, mask: jax.Array, pooling: str) -> jax.Array:
    """[B, L, D] token outputs -> [B, D].

    "mean": mean over real tokens (an all-padding row gives zeros).
    "last": the output at the last real token: position L-1 under left padding (the Qwen3-Embedding
      convention, docs/recipe.md §2.5), the position before the padding under right padding.
    """
    if pooling == "mean":
        weights = mask.astype(hidden.dtype)[..., None]
        return jnp.sum(hidden * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
    if pooling == "last":
        last = mask.shape[1] - 1 - jnp.argmax(mask[:, ::-1], axis=1)
        return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


class SelfAttention(nnx.Module):
    """Grouped-query attention: num_heads query heads share num_kv_heads key/value heads (query head h reads
    kv head h // (num_heads / num_kv_heads), as transformers' `repeat_kv`); q and k are RMS-normalised per
    head before RoPE."""

    def __init__(self, width: int, num_heads: int, num_kv_heads: int, head_dim: int, *, norm_eps: float,
                 causal: bool, attention_impl: str = "auto", rngs: nnx.Rngs):
        self.causal = causal
        self.attention_impl = attention.check_impl(attention_impl)
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.q_proj = linear(width, num_heads * head_dim, ("embed", "qkv"), use_bias=False, rngs=rngs)
        self.k_proj = linear(width, num_kv_heads * head_dim, ("embed", "qkv"), use_bias=False, rngs=rngs)
        self.v_proj = linear(width, num_kv_heads * head_dim, ("embed", "qkv"), use_bias=False, rngs=rngs)
        self.o_proj = linear(num_heads * head_dim, width, ("heads", "embed"), use_bias=False, rngs=rngs)
        self.q_norm = rms_norm(head_dim, norm_eps, rngs=rngs)
        self.k_norm = rms_norm(head_dim, norm_eps, rngs=rngs)

    def __call__(self, x: jax.Array, sin: jax.Array, cos: jax.Array, mask: jax.Array) -> jax.Array:
        """mask [B, L]: True = real token; queries attend to real keys only (and earlier ones if causal). A padded
        query gets a finite, meaningless output; it never reaches a real token."""
        batch, length, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(batch, length, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).reshape(batch, length, self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).reshape(batch, length, self.num_kv_heads, self.head_dim)
        q = rope.apply_rope(q, sin, cos)
        k = rope.apply_rope(k, sin, cos)
        out = attention.dot_product_attention(q, k, v, scale=self.head_dim ** -0.5, impl=self.attention_impl,
                                              key_mask=mask, is_causal=self.causal)
        return self.o_proj(out.reshape(batch, length, self.num_heads * self.head_dim))


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) · up(x)), bias-free."""

    def __init__(self, width: int, hidden_dim: int, *, rngs: nnx.Rngs):
        self.gate_proj = linear(width, hidden_dim, ("embed", "mlp"), use_bias=False, rngs=rngs)
        self.up_proj = linear(width, hidden_dim, ("embed", "mlp"), use_bias=False, rngs=rngs)
        self.down_proj = linear(hidden_dim, width, ("mlp", "embed"), use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class TextBlock(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)) (Qwen3DecoderLayer)."""

    def __init__(self, width: int, num_heads: int, num_kv_heads: int, head_dim: int, mlp_dim: int, *,
                 norm_eps: float, causal: bool, attention_impl: str = "auto", rngs: nnx.Rngs):
        self.input_layernorm = rms_norm(width, norm_eps, rngs=rngs)
        self.self_attn = SelfAttention(width, num_heads, num_kv_heads, head_dim, norm_eps=norm_eps, causal=causal,
                                       attention_impl=attention_impl, rngs=rngs)
        self.post_attention_layernorm = rms_norm(width, norm_eps, rngs=rngs)
        self.mlp = SwiGLU(width, mlp_dim, rngs=rngs)

    def __call__(self, x: jax.Array, sin: jax.Array, cos: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.input_layernorm(x), sin, cos, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextEncoder(nnx.Module):
    """Token embedding -> `depth` pre-norm blocks -> final RMSNorm -> pooling.

    Parameters: embed_tokens.embedding [vocab, width] ("vocab", "embed"); layers.{i}.{input_layernorm,
    self_attn.{q,k,v,o}_proj, self_attn.{q,k}_norm, post_attention_layernorm, mlp.{gate,up,down}_proj};
    norm.scale. Linear kernels are (in, out), trunc-normal(0.02); embeddings N(0, 0.02); norm scales 1.
    """

    def __init__(self, *, vocab_size: int, width: int, depth: int, num_heads: int, num_kv_heads: int | None = None,
                 head_dim: int | None = None, mlp_dim: int | None = None, causal: bool = False,
                 pooling: str = "mean", rope_theta: float = 10_000.0, norm_eps: float = 1e-6, remat: bool = False,
                 attention_impl: str = "auto", rngs: nnx.Rngs):
        """
        num_kv_heads: key/value heads (grouped-query attention); None = num_heads.
        head_dim: None = width // num_heads (Qwen3-0.6B decouples them: 16 heads × 128 on a 1024 width).
        mlp_dim: SwiGLU hidden size; None = 3·width, the Qwen3-0.6B ratio (3072 for 1024).
        causal: causal attention (Qwen3) or bidirectional (the from-scratch tower; see the module docstring).
        pooling: "mean" or "last" (last real token; Qwen3-Embedding, docs/recipe.md §2.5).
        remat: recompute each block in the backward pass (docs/recipe.md §14.1: gradient checkpointing).
        attention_impl: the attention kernel, a key of `attention.ATTENTION_IMPLS` ("auto": per platform).
        """
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        head_dim = width // num_heads if head_dim is None else head_dim
        mlp_dim = 3 * width if mlp_dim is None else mlp_dim
        if min(vocab_size, width, depth, num_heads, num_kv_heads, head_dim, mlp_dim) < 1:
            raise ValueError(f"text encoder sizes must be positive: vocab_size={vocab_size}, width={width}, "
                             f"depth={depth}, num_heads={num_heads}, num_kv_heads={num_kv_heads}, "
                             f"head_dim={head_dim}, mlp_dim={mlp_dim}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for rotate-half RoPE, got {head_dim}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.width = width
        self.head_dim = head_dim
        self.causal = causal
        self.pooling = pooling
        self.rope_theta = rope_theta
        self.remat = remat
        self.embed_tokens = nnx.Embed(
            vocab_size, width, rngs=rngs,
            embedding_init=nnx.with_partitioning(nnx.initializers.normal(EMBEDDING_INIT_STD), ("vocab", "embed")))
        self.layers = nnx.List([
            TextBlock(width, num_heads, num_kv_heads, head_dim, mlp_dim, norm_eps=norm_eps, causal=causal,
                      attention_impl=attention_impl, rngs=rngs)
            for _ in range(depth)])
        self.norm = rms_norm(width, norm_eps, rngs=rngs)

    def __call__(self, tokens: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
        """Encodes token ids [B, L] with `mask` [B, L] (True = real token, False = padding).

        Returns hidden [B, L, width] (after the final norm; Hugging Face's `last_hidden_state`) and pooled
        [B, width]. Every row needs at least one real token: an empty row pools to zeros ("mean") or to the
        output at position L-1 ("last"); the data pipeline rejects empty texts.
        """
        if tokens.ndim != 2 or mask.shape != tokens.shape:
            raise ValueError(f"expected tokens [B, L] and a mask of the same shape, got {tokens.shape} and "
                             f"{mask.shape}")
        mask = mask.astype(bool)
        h = sharding.constrain(self.embed_tokens(tokens), RESIDUAL_AXES)
        sin, cos = text_rope_sincos(tokens.shape[1], self.head_dim, self.rope_theta)
        apply_block = nnx.remat(TextBlock.__call__) if self.remat else TextBlock.__call__
        for layer in self.layers:
            h = sharding.constrain(apply_block(layer, h, sin, cos, mask), RESIDUAL_AXES)
        hidden = self.norm(h)
        return {"hidden": hidden, "pooled": pool_tokens(hidden, mask, self.pooling)}
