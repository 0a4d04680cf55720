"""Stage-3 image-text losses (docs/recipe.md §8) against float64 numpy references and on a sharded global batch."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexict_jax.losses.contrastive import clip_loss, osl_loss, siglip_loss

LOGIT_SCALE = math.log(1 / 0.07)


def unit_rows(key: int, *shape: int) -> np.ndarray:
    x = np.random.default_rng(key).normal(size=shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def reference_clip(image: np.ndarray, text: np.ndarray, logit_scale: float) -> float:
    """Recipe §8 term by term in float64: ½·mean_i[−s_ii + LSE_j s_ij] + ½·mean_i[−s_ii + LSE_j s_ji]."""
    s = math.exp(logit_scale) * image.astype(np.float64) @ text.astype(np.float64).T
    batch = s.shape[0]
    rows = [-s[i, i] + math.log(sum(math.exp(s[i, j]) for j in range(batch))) for i in range(batch)]
    cols = [-s[i, i] + math.log(sum(math.exp(s[j, i]) for j in range(batch))) for i in range(batch)]
    return 0.5 * np.mean(rows) + 0.5 * np.mean(cols)


def reference_osl_logistic(image, pos, neg, labels, logit_scale) -> float:
    """The logistic form (docs/recipe.md §8): BCE on e^ℓ·v·(t⁺ − t⁻) with target `label`, mean over valid pairs."""
    z = math.exp(logit_scale) * np.einsum("be,bke->bk", image.astype(np.float64), (pos - neg).astype(np.float64))
    valid = labels >= 0
    z, y = z[valid], labels[valid]
    # −[y·log σ(z) + (1−y)·log(1−σ(z))] = log(1 + e^z) − y·z, written stably.
    return float(np.mean(np.logaddexp(0.0, z) - y * z))



@pytest.fixture(scope="module")
def osl_batch():
    image, pos, neg = unit_rows(0, 16, 8), unit_rows(1, 16, 3, 8), unit_rows(2, 16, 3, 8)
    labels = np.random.default_rng(3).integers(-1, 2, size=(16, 3))
    labels[0] = [1, 0, -1]  # every kind at least once
    return image, pos, neg, labels


# --- CLIP -----------------------------------------------------------------------------------------------------

def test_clip_matches_the_recipe_formula():
    image, text = unit_rows(0, 6, 5), unit_rows(1, 6, 5)
    for scale in (0.0, LOGIT_SCALE, math.log(100.0)):
        np.testing.assert_allclose(clip_loss(image, text, scale), reference_clip(image, text, scale), rtol=1e-5)


def test_clip_is_symmetric_and_rewards_alignment():
    image, text = unit_rows(0, 8, 16), unit_rows(1, 8, 16)
    np.testing.assert_allclose(clip_loss(image, text, LOGIT_SCALE), clip_loss(text, image, LOGIT_SCALE), rtol=1e-6)
    # Random pairs sit near chance, ln B; matching pairs at a cold temperature near zero.
    assert abs(float(clip_loss(image, text, 0.0)) - math.log(8)) < 0.2
    orthogonal = np.eye(8, 16, dtype=np.float32)
    assert float(clip_loss(orthogonal, orthogonal, math.log(100.0))) < 1e-6


def test_clip_on_a_2x4_mesh_equals_the_single_device_value(batch_sharding):
    image, text = unit_rows(0, 16, 8), unit_rows(1, 16, 8)
    scale = jnp.float32(LOGIT_SCALE)
    expected = jax.jit(clip_loss)(image, text, scale)
    expected_grads = jax.jit(jax.grad(clip_loss, argnums=(0, 1, 2)))(image, text, scale)
    sharded = [jax.device_put(x, batch_sharding) for x in (image, text)]
    assert len(sharded[0].sharding.device_set) == 8
    loss = jax.jit(clip_loss)(*sharded, scale)
    grads = jax.jit(jax.grad(clip_loss, argnums=(0, 1, 2)))(*sharded, scale)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_allclose(loss, reference_clip(image, text, LOGIT_SCALE), rtol=1e-5)
    for got, want in zip(grads, expected_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_clip_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same \\[B, E\\] shape"):
        clip_loss(unit_rows(0, 4, 8), unit_rows(1, 5, 8), LOGIT_SCALE)
    with pytest.raises(ValueError, match="scalar"):
        clip_loss(unit_rows(0, 4, 8), unit_rows(1, 4, 8), jnp.zeros((1,)))


# --- SigLIP ---------------------------------------------------------------------------------------------------

def test_siglip_matches_pairwise_logistic_losses():
    image, text = unit_rows(0, 5, 4), unit_rows(1, 5, 4)
    scale, bias = math.log(10.0), -10.0
    z = math.exp(scale) * image.astype(np.float64) @ text.astype(np.float64).T + bias
    expected = 0.0
    for i in range(5):
        for j in range(5):
            y = 1.0 if i == j else -1.0
            expected += math.log1p(math.exp(-y * z[i, j]))
    np.testing.assert_allclose(siglip_loss(image, text, scale, bias), expected / 5, rtol=1e-5)


def test_siglip_on_a_2x4_mesh_equals_the_single_device_value(batch_sharding):
    """Loss and gradients (embeddings, logit scale and bias) over the global batch, as for CLIP."""
    image, text = unit_rows(0, 16, 8), unit_rows(1, 16, 8)
    scale, bias = jnp.float32(2.3), jnp.float32(-10.0)
    grad = jax.jit(jax.grad(siglip_loss, argnums=(0, 1, 2, 3)))
    expected, expected_grads = jax.jit(siglip_loss)(image, text, scale, bias), grad(image, text, scale, bias)
    sharded = [jax.device_put(x, batch_sharding) for x in (image, text)]
    assert len(sharded[0].sharding.device_set) == 8
    np.testing.assert_allclose(jax.jit(siglip_loss)(*sharded, scale, bias), expected, rtol=1e-6)
    for got, want in zip(grad(*sharded, scale, bias), expected_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


# --- OSL ------------------------------------------------------------------------------------------------------

def test_osl_equals_its_logistic_form(osl_batch):
    image, pos, neg, labels = osl_batch
    for scale in (0.0, LOGIT_SCALE, math.log(100.0)):
        np.testing.assert_allclose(osl_loss(image, pos, neg, labels, scale),
                                   reference_osl_logistic(image, pos, neg, labels, scale), rtol=1e-5)


def test_osl_ignores_padding_pairs(osl_batch):
    image, pos, neg, labels = osl_batch
    padded = labels == -1
    noisy_pos, noisy_neg = pos.copy(), neg.copy()
    noisy_pos[padded], noisy_neg[padded] = np.inf, -np.inf
    np.testing.assert_allclose(osl_loss(image, noisy_pos, noisy_neg, labels, LOGIT_SCALE),
                               osl_loss(image, pos, neg, labels, LOGIT_SCALE), rtol=1e-6)
    all_padding = np.full_like(labels, -1)
    assert float(osl_loss(image, pos, neg, all_padding, LOGIT_SCALE)) == 0.0


def test_osl_prefers_the_matching_sentence():
    image = np.eye(2, 4, dtype=np.float32)
    # Sample 0: the finding is the image direction (true pair). Sample 1: its negation is (false pair).
    pos = np.stack([image[:1], -image[1:]])
    neg = np.stack([-image[:1], image[1:]])
    labels = np.array([[1], [0]])
    assert float(osl_loss(image, pos, neg, labels, math.log(100.0))) < 1e-6
    assert float(osl_loss(image, pos, neg, 1 - labels, math.log(100.0))) > 100


def test_osl_on_a_2x4_mesh_equals_the_single_device_value(batch_sharding, osl_batch):
    image, pos, neg, labels = osl_batch
    expected = osl_loss(image, pos, neg, labels, LOGIT_SCALE)
    sharded = [jax.device_put(x, batch_sharding) for x in (image, pos, neg, labels)]
    np.testing.assert_allclose(jax.jit(osl_loss)(*sharded, LOGIT_SCALE), expected, rtol=1e-6)


def test_osl_reports_bad_input(osl_batch):
    image, pos, neg, labels = osl_batch
    with pytest.raises(ValueError, match="labels must be 1, 0 or -1"):
        osl_loss(image, pos, neg, labels + 1, LOGIT_SCALE)
    with pytest.raises(ValueError, match="pos/neg \\[B, K, E\\]"):
        osl_loss(image, pos[:, :2], neg, labels, LOGIT_SCALE)
