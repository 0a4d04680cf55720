"""Stage-1 losses (docs/recipe.md §3) against hand-computed values and an independent numpy Sinkhorn-Knopp."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import stage1
from flexict_jax.data import masking2d
from flexict_jax.losses.dino import dino_cross_entropy, dino_term_weights
from flexict_jax.losses.ibot import gather_masked, ibot_patch_loss
from flexict_jax.losses.koleo import koleo_loss
from flexict_jax.losses.sinkhorn import sinkhorn_knopp
from flexict_jax.tasks.common import gather_masked_tokens, masked_token_capacity


def literal_sinkhorn(logits: np.ndarray, temperature: float, n_iterations: int = 3) -> np.ndarray:
    """Recipe §3.1 step by step in float64, with the K×N transpose and without the max shift."""
    q = np.exp(np.asarray(logits, np.float64) / temperature).T  # K×N
    n_prototypes, n_samples = q.shape
    q /= q.sum()
    for _ in range(n_iterations):
        q /= q.sum(axis=1, keepdims=True)
        q /= n_prototypes
        q /= q.sum(axis=0, keepdims=True)
        q /= n_samples
    return (q * n_samples).T


# --- Sinkhorn-Knopp -------------------------------------------------------------------------------------------

def test_sinkhorn_rows_sum_to_one_and_prototypes_balance():
    logits = np.random.default_rng(0).normal(size=(32, 8)).astype(np.float32)
    targets = np.asarray(sinkhorn_knopp(logits, 1.0))
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-6)
    # 3 iterations balance approximately; many iterations converge to exactly N/K per prototype.
    np.testing.assert_allclose(targets.sum(axis=0), 32 / 8, rtol=0.1)
    converged = np.asarray(sinkhorn_knopp(logits, 1.0, n_iterations=100))
    np.testing.assert_allclose(converged.sum(axis=0), 32 / 8, rtol=1e-4)


def test_sinkhorn_matches_literal_recipe():
    hand = np.array([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]])
    np.testing.assert_allclose(sinkhorn_knopp(jnp.asarray(hand, jnp.float32), 0.5),
                               literal_sinkhorn(hand, 0.5), rtol=1e-6)
    logits = np.random.default_rng(1).normal(size=(12, 5))
    np.testing.assert_allclose(sinkhorn_knopp(jnp.asarray(logits, jnp.float32), 0.07),
                               literal_sinkhorn(logits, 0.07), rtol=1e-5, atol=1e-7)


def test_sinkhorn_invariant_to_global_shift_and_stable_for_huge_logits():
    # Multiples of 1/64 and τ = 1/4: 1e4 + x, the division and the max shift are all exact in float32, so
    # any difference below would come from the algorithm, not from rounding of the inputs.
    logits = np.round(np.random.default_rng(2).normal(size=(6, 4)) * 64).astype(np.float32) / 64
    reference = sinkhorn_knopp(logits, 0.25)
    np.testing.assert_allclose(sinkhorn_knopp(logits + 7.0, 0.25), reference, rtol=1e-6, atol=1e-7)
    huge = logits + np.float32(1e4)
    # The literal algorithm overflows at these magnitudes (exp(4e4)); the max-shifted one is exact.
    with np.errstate(over="ignore", invalid="ignore"):
        assert not np.isfinite(literal_sinkhorn(huge, 0.25)).all()
    np.testing.assert_allclose(sinkhorn_knopp(huge, 0.25), reference, rtol=1e-6, atol=1e-7)


def test_sinkhorn_valid_rows_equal_running_on_valid_rows_only():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(10, 6)).astype(np.float32)
    valid = np.array([1, 0, 1, 1, 0, 0, 1, 1, 1, 0], bool)
    logits[~valid] = 1e6  # padding garbage must not reach the max shift or any sum
    targets = np.asarray(sinkhorn_knopp(logits, 0.2, valid=jnp.asarray(valid)))
    np.testing.assert_allclose(targets[valid], sinkhorn_knopp(logits[valid], 0.2), rtol=1e-6)
    np.testing.assert_array_equal(targets[~valid], 0.0)
    nothing_valid = sinkhorn_knopp(logits, 0.2, valid=jnp.zeros(10, bool))
    np.testing.assert_array_equal(nothing_valid, 0.0)


def test_sinkhorn_computes_in_float32_for_bfloat16_input():
    logits = np.random.default_rng(4).normal(size=(8, 4))
    targets = sinkhorn_knopp(jnp.asarray(logits, jnp.bfloat16), 0.1)
    assert targets.dtype == jnp.float32
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-6)


def test_sinkhorn_on_sharded_batch_equals_single_device(batch_sharding):
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(16, 8)).astype(np.float32)
    valid = rng.random(16) < 0.7
    centre = jax.jit(lambda x, v: sinkhorn_knopp(x, 0.07, valid=v))
    single = centre(logits, valid)
    sharded = centre(jax.device_put(logits, batch_sharding), jax.device_put(valid, batch_sharding))
    assert len(sharded.sharding.device_set) == 8
    np.testing.assert_allclose(sharded, single, rtol=1e-6, atol=1e-7)


# --- DINO -----------------------------------------------------------------------------------------------------

def test_dino_cross_entropy_hand_computed():
    # τ_s = 0.1: student crop 0 has softmax (1/4, 3/4), crop 1 (1/2, 1/2); B = 1, K = 2.
    student = jnp.array([[[0.0, 0.1 * math.log(3.0)]], [[0.0, 0.0]]])
    teacher = jnp.array([[[1.0, 0.0]], [[0.5, 0.5]]])
    ce_00 = math.log(4.0)                                  # student 0 vs teacher 0
    ce_01 = 0.5 * math.log(4.0) + 0.5 * math.log(4.0 / 3.0)  # student 0 vs teacher 1
    ce_10 = ce_11 = math.log(2.0)
    assert dino_cross_entropy(student, teacher) == pytest.approx((ce_00 + ce_01 + ce_10 + ce_11) / 4, rel=1e-6)
    assert dino_cross_entropy(student, teacher, ignore_diagonal=True) == pytest.approx((ce_01 + ce_10) / 2,
                                                                                        rel=1e-6)


@pytest.mark.parametrize("n_crops", [2, 3])
def test_dino_ignore_diagonal_averages_over_cross_view_pairs(n_crops):
    rng = np.random.default_rng(6)
    student = rng.normal(size=(n_crops, 4, 5)).astype(np.float32)
    teacher = rng.dirichlet(np.ones(5), size=(n_crops, 4)).astype(np.float32)
    log_probs = jax.nn.log_softmax(student / 0.1, axis=-1)
    pairs = [-(teacher[t] * log_probs[s]).sum(-1).mean()
             for s in range(n_crops) for t in range(n_crops) if s != t]
    assert len(pairs) == n_crops * (n_crops - 1)
    loss = dino_cross_entropy(student, teacher, ignore_diagonal=True)
    assert loss == pytest.approx(float(np.mean(pairs)), rel=1e-6)
    # A uniform student scores log K against any teacher: the divisor counts exactly the kept pairs.
    uniform = dino_cross_entropy(np.zeros_like(student), teacher, ignore_diagonal=True)
    assert uniform == pytest.approx(math.log(5), rel=1e-6)


def test_dino_cross_entropy_identities():
    rng = np.random.default_rng(7)
    student = rng.normal(size=(1, 3, 6)).astype(np.float32)
    z = student / 0.1
    uniform_teacher = np.full_like(student, 1 / 6)
    # −Σ (1/K) log softmax(z) = logsumexp(z) − mean(z) = log K + KL(uniform ‖ p).
    expected = float(np.mean(jax.scipy.special.logsumexp(z, axis=-1) - z.mean(-1)))
    assert dino_cross_entropy(student, uniform_teacher) == pytest.approx(expected, rel=1e-6)
    assert expected > math.log(6)
    # Teacher equal to the student's own distribution: the cross-entropy is its entropy.
    p = jax.nn.softmax(z, axis=-1)
    entropy = float(np.mean(-(p * np.log(p)).sum(-1)))
    assert dino_cross_entropy(student, p) == pytest.approx(entropy, rel=1e-5)


def test_dino_term_weights():
    local, global_ = dino_term_weights(2, 8)
    assert local == pytest.approx(16 / 18) and global_ == pytest.approx(2 / 18)
    assert dino_term_weights(2, 0) == (0.0, 1.0)
    assert dino_term_weights(1, 8) == (1.0, 0.0)
    with pytest.raises(ValueError, match="no DINO pairs"):
        dino_term_weights(1, 0)


def test_dino_ignore_diagonal_needs_cross_pairs():
    with pytest.raises(ValueError, match="leaves no pairs"):
        dino_cross_entropy(jnp.zeros((1, 2, 3)), jnp.zeros((1, 2, 3)), ignore_diagonal=True)


# --- iBOT -----------------------------------------------------------------------------------------------------

def test_gather_masked_hand_example():
    masks = np.array([[0, 1, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0]], bool)
    indices, valid, weights = gather_masked(masks, 5)
    np.testing.assert_array_equal(indices, [1, 3, 8, 0, 0])
    np.testing.assert_array_equal(valid, [True, True, True, False, False])
    np.testing.assert_allclose(weights, [0.5, 0.5, 1.0, 0.0, 0.0])
    assert indices.dtype == jnp.int32


def test_gather_masked_capacity():
    masks = np.array([[1, 1, 0], [0, 1, 0]], bool)
    with pytest.raises(ValueError, match="3 masked tokens do not fit the buffer of 2"):
        gather_masked(masks, 2)
    # Under jit it cannot raise: the first tokens in row-major order are kept (documented clamp).
    indices, valid, weights = jax.jit(gather_masked, static_argnums=1)(masks, 2)
    np.testing.assert_array_equal(indices, [0, 1])
    np.testing.assert_array_equal(valid, [True, True])
    np.testing.assert_allclose(weights, [0.5, 0.5])


def test_gather_masked_matches_flatnonzero():
    """The running-count search finds exactly numpy's masked positions, padded with 0 or cut at the buffer."""
    rng = np.random.default_rng(3)
    gather = jax.jit(gather_masked, static_argnums=1)
    for density, buffer in ((0.0, 4), (0.1, 64), (0.5, 64), (0.9, 32), (1.0, 16)):
        masks = rng.random((6, 20)) < density
        indices, valid, _ = gather(masks, buffer)
        expected = np.flatnonzero(masks)[:buffer]
        np.testing.assert_array_equal(indices, np.pad(expected, (0, buffer - expected.size)))
        np.testing.assert_array_equal(valid, np.arange(buffer) < expected.size)


def _token_cross_entropy(student: np.ndarray, teacher: np.ndarray) -> np.ndarray:
    return -(teacher * jax.nn.log_softmax(student / 0.1, axis=-1)).sum(-1)


def test_ibot_weights_each_masked_image_equally():
    rng = np.random.default_rng(8)
    masks = np.zeros((2, 12), bool)
    masks[0, 5] = True      # one masked token
    masks[1, :10] = True    # ten masked tokens
    indices, valid, weights = gather_masked(masks, 11)
    assert bool(valid.all())
    student = rng.normal(size=(11, 4)).astype(np.float32)
    teacher = rng.dirichlet(np.ones(4), size=11).astype(np.float32)
    ce = np.asarray(_token_cross_entropy(student, teacher))
    per_image = (ce[0] + ce[1:].mean()) / 2
    assert ibot_patch_loss(student, teacher, weights, n_images=2) == pytest.approx(per_image, rel=1e-6)
    assert abs(per_image - ce.mean()) > 1e-3  # token-level averaging would differ


def test_ibot_counts_unmasked_images_and_ignores_padding():
    rng = np.random.default_rng(9)
    masks = np.zeros((4, 6), bool)
    masks[0, [1, 2, 4]] = True
    masks[2, [0, 5]] = True  # images 1 and 3 carry no mask but still count in n_images
    exact = gather_masked(masks, 5)
    padded = gather_masked(masks, 9)
    student = rng.normal(size=(9, 3)).astype(np.float32)
    teacher = rng.dirichlet(np.ones(3), size=9).astype(np.float32)
    student[5:] = np.inf   # padding rows may hold anything
    teacher[5:] = 1e9
    ce = np.asarray(_token_cross_entropy(student[:5], teacher[:5]))
    expected = (ce[:3].mean() + ce[3:].mean()) / 4
    assert ibot_patch_loss(student[:5], teacher[:5], exact[2], n_images=4) == pytest.approx(expected, rel=1e-6)
    assert ibot_patch_loss(student, teacher, padded[2], n_images=4) == pytest.approx(expected, rel=1e-6)


def test_ibot_pipeline_on_sharded_buffer_equals_per_image_reference(batch_sharding):
    """Dense tokens → fixed-size buffer → SK on valid rows → loss, against a per-image numpy loop."""
    rng = np.random.default_rng(10)
    n_images, n_tokens, n_prototypes, max_tokens = 8, 8, 5, 24
    masks = np.zeros((n_images, n_tokens), bool)
    masks[0, :3] = masks[1, 6] = masks[3, 2:7] = masks[6, ::2] = True
    student_tokens = rng.normal(size=(n_images, n_tokens, n_prototypes)).astype(np.float32)
    teacher_tokens = rng.normal(size=(n_images, n_tokens, n_prototypes)).astype(np.float32)

    def step(masks, student_tokens, teacher_tokens):
        indices, valid, weights = gather_masked(masks, max_tokens)
        student = student_tokens.reshape(-1, n_prototypes)[indices]
        teacher = sinkhorn_knopp(teacher_tokens.reshape(-1, n_prototypes)[indices], 0.05, valid=valid)
        return ibot_patch_loss(student, teacher, weights, n_images=masks.shape[0])

    flat_masks = masks.reshape(-1)
    targets = literal_sinkhorn(teacher_tokens.reshape(-1, n_prototypes)[flat_masks], 0.05)
    ce = np.asarray(_token_cross_entropy(student_tokens.reshape(-1, n_prototypes)[flat_masks], targets))
    image_of_token = np.repeat(np.arange(n_images), n_tokens)[flat_masks]
    expected = sum(ce[image_of_token == i].mean() for i in np.unique(image_of_token)) / n_images

    single = jax.jit(step)(masks, student_tokens, teacher_tokens)
    sharded = jax.jit(step)(*(jax.device_put(a, batch_sharding) for a in (masks, student_tokens, teacher_tokens)))
    assert float(single) == pytest.approx(expected, rel=1e-5)
    assert float(sharded) == pytest.approx(float(single), rel=1e-6)


def test_masked_token_buffer_per_example_keeps_the_rows_and_the_batch_sharding(batch_sharding):
    """The tasks' per-example buffer holds the masked tokens in row-major order with their images' weights, as
    one buffer over the whole batch would, and a batch-sharded input gives a batch-sharded buffer: the gather
    over the whole batch came out replicated, so every device ran the iBOT head on every masked token."""
    config = stage1.get_config("tiny")
    batch, n_global, n_tokens, dim = 16, config.data.n_global_crops, 16, 6
    most = int(config.data.mask.ratio[1] * n_tokens)
    rng = np.random.default_rng(11)
    masks = np.zeros((batch, n_global, n_tokens), bool)
    for example in range(batch):  # as the pipeline masks: up to max_masked_crops crops, each up to `most` tokens
        for crop in range(masking2d.max_masked_crops(n_global, config.data.mask.probability)):
            masks[example, crop, rng.choice(n_tokens, rng.integers(0, most + 1), replace=False)] = True
    tokens = rng.normal(size=(batch * n_global, n_tokens, dim)).astype(np.float32)

    masked = gather_masked_tokens(jnp.asarray(masks), config)
    valid = np.asarray(masked.valid)
    flat = masks.reshape(-1, n_tokens)
    np.testing.assert_array_equal(np.asarray(masked.take(tokens))[valid], tokens[flat])
    per_image = np.repeat(1.0 / np.maximum(flat.sum(1), 1), n_tokens)[flat.reshape(-1)]
    np.testing.assert_allclose(np.asarray(masked.weight)[valid], per_image, rtol=1e-6)
    assert not np.asarray(masked.weight)[~valid].any()

    take = jax.jit(lambda m, t: gather_masked_tokens(m, config).take(t))
    rows = take(jax.device_put(masks, batch_sharding), jax.device_put(tokens, batch_sharding))
    assert rows.shape == (batch * masked_token_capacity(masks.shape, config), dim)
    assert not rows.sharding.is_fully_replicated
    assert rows.sharding.shard_shape(rows.shape) == (rows.shape[0] // 8, dim)


# --- KoLeo ----------------------------------------------------------------------------------------------------

def test_koleo_hand_computed_three_points():
    # After normalisation: (1, 0), (0, 1), (1, 1)/√2. Everyone's nearest neighbour is at angle 45°, whose
    # chord is √(2 − √2).
    x = jnp.array([[2.0, 0.0], [0.0, 0.5], [3.0, 3.0]])
    assert koleo_loss(x) == pytest.approx(-math.log(math.sqrt(2 - math.sqrt(2))), rel=1e-6)


def test_koleo_eps_follows_pairwise_distance():
    # Duplicates: ‖x − x_nn + eps‖ = eps·√D, then log(eps·√D + eps); D = 4 gives log(3·eps).
    x = jnp.array([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    assert koleo_loss(x) == pytest.approx(-math.log(3e-8), rel=1e-5)


def test_koleo_groups_average_per_group_losses():
    x = np.random.default_rng(11).normal(size=(12, 6)).astype(np.float32)
    per_group = np.mean([koleo_loss(x[i:i + 4]) for i in range(0, 12, 4)])
    assert koleo_loss(x, group_size=4) == pytest.approx(float(per_group), rel=1e-6)
    assert koleo_loss(x, group_size=12) == pytest.approx(float(koleo_loss(x)), rel=1e-6)
    with pytest.raises(ValueError, match="not divisible by group_size 5"):
        koleo_loss(x, group_size=5)
    with pytest.raises(ValueError, match=">= 2 samples"):
        koleo_loss(x, group_size=1)


@pytest.mark.parametrize("group_size", [4, None])
def test_koleo_on_sharded_batch_equals_single_device(batch_sharding, group_size):
    x = np.random.default_rng(12).normal(size=(16, 8)).astype(np.float32)
    loss = jax.jit(lambda v: koleo_loss(v, group_size=group_size))
    sharded = jax.device_put(x, batch_sharding)
    assert float(loss(sharded)) == pytest.approx(float(loss(x)), rel=1e-6)
