"""Attention kernels (flexict_jax.models.attention, config.model.attention_impl): every implementation computes the
reference softmax(q·kᵀ·scale)·v, including the prefix (CLS/storage) rows and padded keys; "auto" picks per platform."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flexict_jax.models import attention
from flexict_jax.models.text_encoder import TextEncoder
from flexict_jax.models.vit import VisionTransformer


def _reference(q, k, v, scale, key_mask=None, is_causal=False):
    """Plain float64 numpy attention (grouped-query: query head h reads kv head h // (N/K))."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    logits = np.einsum("btnh,bsnh->bnts", q, k) * scale
    allowed = np.ones(logits.shape, bool)
    if key_mask is not None:
        allowed &= np.asarray(key_mask)[:, None, None, :]
    if is_causal:
        allowed &= np.tril(np.ones(logits.shape[-2:], bool))
    logits = np.where(allowed, logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", weights, v)


def _qkv(batch=2, length=37, heads=4, kv_heads=4, head_dim=24, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(keys[0], (batch, length, heads, head_dim)),
            jax.random.normal(keys[1], (batch, length, kv_heads, head_dim)),
            jax.random.normal(keys[2], (batch, length, kv_heads, head_dim)))


def test_auto_picks_cudnn_on_gpu_in_bf16_splash_on_tpu_and_xla_otherwise():
    assert attention.resolve("auto", jnp.bfloat16, 72, platform="gpu") == "cudnn"
    assert attention.resolve("auto", jnp.float32, 72, platform="gpu") == "xla"  # cuDNN flash is bf16/fp16 only
    assert attention.resolve("auto", jnp.bfloat16, 256, platform="gpu") == "xla"  # head too wide for it
    assert attention.resolve("auto", jnp.bfloat16, 72, platform="tpu") == "splash"
    assert attention.resolve("auto", jnp.bfloat16, 72, platform="cpu") == "xla"
    assert attention.resolve("splash", jnp.float32, 72, platform="cpu") == "splash"  # explicit names are kept
    with pytest.raises(ValueError, match="config.model.attention_impl='flash'"):
        attention.resolve("flash", jnp.float32, 72)


@pytest.mark.parametrize("kv_heads,causal,masked", [(4, False, False), (2, True, True)])
def test_xla_and_splash_match_the_reference(kv_heads, causal, masked):
    q, k, v = _qkv(kv_heads=kv_heads)
    key_mask = (np.arange(q.shape[1]) >= np.array([[0], [5]])) if masked else None  # left padding in row 1
    want = _reference(q, k, v, 0.2, key_mask, causal)
    for impl in ("xla", "splash"):
        got = attention.dot_product_attention(q, k, v, scale=0.2, impl=impl, key_mask=key_mask, is_causal=causal,
                                              interpret=True)
        rows = slice(None) if key_mask is None else key_mask  # padded query rows are meaningless by contract
        np.testing.assert_allclose(np.asarray(got)[rows], want[rows], atol=2e-5, err_msg=impl)


def test_splash_gradients_match_xla():
    q, k, v = _qkv(length=21)

    def loss(impl, q, k, v):
        return jnp.sum(jnp.sin(attention.dot_product_attention(q, k, v, scale=0.3, impl=impl, interpret=True)))
    want = jax.grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2))(q, k, v)
    got = jax.grad(lambda *a: loss("splash", *a), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=5e-5)


@pytest.mark.slow
def test_backbone_and_text_tower_outputs_do_not_depend_on_the_kernel():
    """RoPE, the CLS/storage prefix and the text padding go through the kernel unchanged."""
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 1))
    outs = {impl: VisionTransformer(dim=48, depth=2, num_heads=2, attention_impl=impl, rngs=nnx.Rngs(0))(
        x, patch_size=8)["prenorm"] for impl in ("xla", "auto")}
    np.testing.assert_array_equal(outs["xla"], outs["auto"])  # auto is xla on CPU
    tokens = jnp.arange(24).reshape(2, 12) % 50
    mask = jnp.arange(12) >= jnp.array([[0], [4]])
    tower = TextEncoder(vocab_size=50, width=32, depth=1, num_heads=4, num_kv_heads=2, causal=True, pooling="last",
                        rngs=nnx.Rngs(0))
    pooled = tower(tokens, mask)["pooled"]
    # The same tower through splash (in the Pallas interpreter) by swapping the kernel of its one layer.
    layer = tower.layers[0].self_attn
    original = attention.dot_product_attention
    try:
        attention.dot_product_attention = lambda *a, **kw: original(*a, **{**kw, "impl": "splash", "interpret": True})
        splash_pooled = tower(tokens, mask)["pooled"]
    finally:
        attention.dot_product_attention = original
    assert layer.attention_impl == "auto"
    np.testing.assert_allclose(splash_pooled, pooled, atol=2e-5)


def test_splash_attention_lowers_for_a_tpu_topology():
    """The ViT block's splash kernel compiles for TPU v5p on this CPU host (libtpu, no TPU), sharded over a
    batch mesh: the Mosaic kernel and its shard_map are accepted by the TPU compiler."""
    pytest.importorskip("libtpu", reason="needs the jax[tpu] extra (libtpu) for TPU topologies")
    from jax.experimental import topologies
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from configs.common import SHARDING_RULES
    from flexict_jax import sharding
    # Other processes on this host may hold libtpu's lockfile; a compile-only client does not need it.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        devices = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1").devices
    except RuntimeError as error:  # libtpu present but unusable here (JaxRuntimeError)
        pytest.skip(f"no TPU topology on this host: {error}")
    mesh = sharding.make_mesh((1, -1, 1), devices)
    shape = jax.ShapeDtypeStruct((8, 201, 12, 72), jnp.bfloat16,
                                 sharding=NamedSharding(mesh, P(("data", "fsdp"), None, None, None)))
    with sharding.activate(mesh, SHARDING_RULES):
        def fwd_bwd(q, k, v):
            return jax.grad(lambda q, k, v: jnp.sum(attention.dot_product_attention(
                q, k, v, scale=72 ** -0.5, impl="splash").astype(jnp.float32)), argnums=(0, 1, 2))(q, k, v)
        compiled = jax.jit(fwd_bwd).lower(shape, shape, shape).compile()
    assert "tpu_custom_call" in compiled.as_text()
