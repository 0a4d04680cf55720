"""Stage-3 vision-language head (docs/recipe.md §2.5): embeddings, projections, logit scale and its clamp."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from flexict_jax.losses.contrastive import clip_loss
from flexict_jax.models.text_encoder import TextEncoder
from flexict_jax.models.vlm import LOGIT_SCALE_MAX, VisionLanguageHead, clamp_logit_scale

TOWER = dict(vocab_size=40, width=32, depth=1, num_heads=2, mlp_dim=32)
VISION_WIDTH = 24


def head(embed_dim: int | None = None, **kwargs) -> VisionLanguageHead:
    return VisionLanguageHead(TextEncoder(**TOWER, rngs=nnx.Rngs(0)), vision_width=VISION_WIDTH,
                              embed_dim=embed_dim, rngs=nnx.Rngs(1), **kwargs)


def text_batch() -> tuple[jax.Array, jax.Array]:
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 40, size=(4, 6)))
    mask = jnp.arange(6)[None, :] >= jnp.array([0, 2, 3, 5])[:, None]  # left padding
    return tokens, mask


def test_parameter_names_and_initial_logit_scale():
    params = nnx.to_pure_dict(nnx.state(head(), nnx.Param))
    assert set(params) == {"vision_projection", "logit_scale", "text_tower"}
    assert params["vision_projection"]["kernel"].shape == (2 * VISION_WIDTH, 32)
    assert params["logit_scale"].shape == ()
    np.testing.assert_allclose(params["logit_scale"], 2.6593, atol=1e-4)  # ln(1/0.07), docs/recipe.md §2.5
    assert set(params["text_tower"]) == {"embed_tokens", "layers", "norm"}

    projected = nnx.to_pure_dict(nnx.state(head(embed_dim=16), nnx.Param))
    assert projected["text_projection"]["kernel"].shape == (32, 16)
    assert projected["vision_projection"]["kernel"].shape == (2 * VISION_WIDTH, 16)

    siglip = nnx.to_pure_dict(nnx.state(head(logit_scale_init=math.log(10), logit_bias_init=-10.0), nnx.Param))
    np.testing.assert_allclose(siglip["logit_bias"], -10.0)
    np.testing.assert_allclose(siglip["logit_scale"], math.log(10), rtol=1e-6)


def test_every_parameter_has_logical_axes():
    for path, param in nnx.to_flat_state(nnx.state(head(embed_dim=16, logit_bias_init=-10.0), nnx.Param)):
        names = param.get_metadata().get("out_sharding")
        assert names is not None and len(names) == param.ndim, path


def test_vision_projection_init_scales_with_the_width():
    # Upstream: N(0, 1728^-0.5) for the 1728 = 2·864 input (docs/recipe.md §2.5); here 2·432 = 864 inputs.
    wide = VisionLanguageHead(TextEncoder(**{**TOWER, "width": 64}, rngs=nnx.Rngs(0)), vision_width=432,
                              rngs=nnx.Rngs(2))
    kernel = np.asarray(wide.vision_projection.kernel[...])
    assert kernel.shape == (864, 64)
    assert abs(kernel.std() / 864 ** -0.5 - 1) < 0.02
    assert abs(kernel.mean()) < 3 * 864 ** -0.5 / math.sqrt(kernel.size)


def test_image_embedding_is_the_normalised_projection_of_cls_and_mean_patch():
    model = head()
    rng = np.random.default_rng(0)
    cls, patch = rng.normal(size=(3, VISION_WIDTH)), rng.normal(size=(3, 10, VISION_WIDTH))
    emb = np.asarray(model.embed_image(jnp.asarray(cls, jnp.float32), jnp.asarray(patch, jnp.float32)))
    z = np.concatenate([cls, patch.mean(axis=1)], axis=1) @ np.asarray(model.vision_projection.kernel[...])
    np.testing.assert_allclose(emb, z / np.linalg.norm(z, axis=1, keepdims=True), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="cls \\[B, D\\] and patch \\[B, N, D\\]"):
        model.embed_image(jnp.zeros((3, VISION_WIDTH)), jnp.zeros((3, VISION_WIDTH)))


def test_text_embedding_is_identity_projected_when_widths_match():
    tokens, mask = text_batch()
    model = head()
    assert model.text_projection is None
    pooled = np.asarray(model.text_tower(tokens, mask)["pooled"])
    np.testing.assert_allclose(model.embed_text(tokens, mask), pooled / np.linalg.norm(pooled, axis=1, keepdims=True),
                               rtol=1e-5, atol=1e-6)
    model = head(embed_dim=16)
    z = np.asarray(model.text_tower(tokens, mask)["pooled"]) @ np.asarray(model.text_projection.kernel[...])
    emb = np.asarray(model.embed_text(tokens, mask))
    assert emb.shape == (4, 16)
    np.testing.assert_allclose(emb, z / np.linalg.norm(z, axis=1, keepdims=True), rtol=1e-5, atol=1e-6)


def test_clamp_logit_scale():
    other = {"kernel": jnp.ones((2, 2))}
    for value, expected in ((7.0, math.log(100)), (-0.5, 0.0), (1.3, 1.3), (math.log(100), math.log(100))):
        clamped = jax.jit(clamp_logit_scale)({"logit_scale": jnp.float32(value), "vision_projection": other})
        np.testing.assert_allclose(clamped["logit_scale"], expected, rtol=1e-6)
        np.testing.assert_array_equal(clamped["vision_projection"]["kernel"], other["kernel"])
    with pytest.raises(KeyError, match="no 'logit_scale'"):
        clamp_logit_scale({"vision_projection": other})
    with pytest.raises(ValueError, match="outside the clamp range"):
        head(logit_scale_init=5.0)


def test_clamp_holds_after_every_step():
    """A tiny CLIP run first pushes ℓ below 0 (random pairs), then above ln 100 (aligned pairs); clamped
    after each optimizer step, as the trainer does, it never leaves [0, ln 100]."""
    graphdef, state = nnx.split(head())
    params = nnx.to_pure_dict(state)
    tokens, mask = text_batch()
    cls = jnp.asarray(np.random.default_rng(1).normal(size=(4, VISION_WIDTH)), jnp.float32)
    patch = jnp.asarray(np.random.default_rng(2).normal(size=(4, 5, VISION_WIDTH)), jnp.float32)
    # Adam moves ℓ by about its learning rate per step whatever the gradient's size, so both bounds are hit.
    labels = {name: jax.tree.map(lambda _: "scale" if name == "logit_scale" else "rest", tree)
              for name, tree in params.items()}
    optimizer = optax.multi_transform({"scale": optax.adam(1.0), "rest": optax.sgd(3.0)}, labels)

    def loss_fn(params):
        vlm = nnx.merge(graphdef, params)
        return clip_loss(vlm.embed_image(cls, patch), vlm.embed_text(tokens, mask), params["logit_scale"])

    @jax.jit
    def step(params, opt_state):
        grads = jax.grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = optimizer.init(params)
    unclamped, clamped = [], []
    for _ in range(40):
        params, opt_state = step(params, opt_state)
        unclamped.append(float(params["logit_scale"]))
        params = clamp_logit_scale(params)
        clamped.append(float(params["logit_scale"]))
        assert 0.0 <= clamped[-1] <= LOGIT_SCALE_MAX + 1e-6, clamped
    assert min(unclamped) < 0.0 and max(unclamped) > LOGIT_SCALE_MAX, unclamped
    assert clamped[-1] == pytest.approx(LOGIT_SCALE_MAX), clamped
