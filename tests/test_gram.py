"""Gram anchoring loss and the Gram-teacher patch-grid resize (docs/recipe.md §3.5, §6, §14.1)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexict_jax.losses.gram import gram_loss, resize_patch_grid

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _reference_gram_loss(student: np.ndarray, teacher: np.ndarray) -> float:
    """float64 numpy: per-image Gram of L2-normalised tokens, mean squared difference."""
    def gram(x):
        x = x / np.linalg.norm(x, axis=-1, keepdims=True)
        return np.einsum("bpd,bqd->bpq", x, x)
    return float(np.mean((gram(student.astype(np.float64)) - gram(teacher.astype(np.float64))) ** 2))


# --- loss ------------------------------------------------------------------------------------------------------

def test_zero_for_identical_tokens_and_for_rescaled_tokens():
    x = jax.random.normal(jax.random.key(0), (3, 20, 8))
    assert float(gram_loss(x, x)) == 0.0
    # Tokens are L2-normalised first, so a positive per-token scale of the teacher changes nothing.
    scale = jax.random.uniform(jax.random.key(1), (3, 20, 1), minval=0.1, maxval=10.0)
    assert float(gram_loss(x, x * scale)) < 1e-12


def test_hand_computed_tiny_case_keeps_negatives():
    student = jnp.array([[[1.0, 0.0], [0.0, 1.0]]])  # orthogonal tokens: G_s = I
    teacher = jnp.array([[[3.0, 0.0], [-2.0, 0.0]]])  # opposite tokens: G_t = [[1, -1], [-1, 1]]
    # G_s - G_t = [[0, 1], [1, 0]] -> mean of squares = 2/4. Upstream's remove_neg would zero the -1 entries of
    # G_t and give 0 instead; stage 1.1 keeps negatives (docs/recipe.md §3.5).
    assert float(gram_loss(student, teacher)) == pytest.approx(0.5, abs=1e-7)
    teacher = jnp.array([[[1.0, 1.0], [1.0, 1.0]]])  # parallel tokens: G_t = 1 everywhere
    assert float(gram_loss(student, teacher)) == pytest.approx(0.5, abs=1e-7)


def test_matches_a_per_image_reference_and_ignores_cross_image_pairs():
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(size=(2, 4, 12, 6)).astype(np.float32)
    loss = float(gram_loss(jnp.asarray(student), jnp.asarray(teacher)))
    assert loss == pytest.approx(_reference_gram_loss(student, teacher), rel=1e-5)
    # Per image (`img_level: true`): the batch loss is the mean of the one-image losses.
    singles = [float(gram_loss(jnp.asarray(student[i:i + 1]), jnp.asarray(teacher[i:i + 1]))) for i in range(4)]
    assert loss == pytest.approx(np.mean(singles), rel=1e-5)


def test_gradient_reaches_only_the_student():
    student, teacher = jax.random.normal(jax.random.key(0), (2, 2, 10, 4))
    d_student, d_teacher = jax.jit(jax.grad(gram_loss, argnums=(0, 1)))(student, teacher)
    assert float(jnp.abs(d_student).sum()) > 0 and np.isfinite(np.asarray(d_student)).all()
    assert float(jnp.abs(d_teacher).sum()) == 0.0


def test_bf16_tokens_give_a_float32_loss():
    x = jax.random.normal(jax.random.key(0), (2, 9, 8))
    loss = gram_loss(x.astype(jnp.bfloat16), x)
    assert loss.dtype == jnp.float32 and float(loss) < 1e-4


def test_bad_shapes_are_reported():
    with pytest.raises(ValueError, match="gram_loss"):
        gram_loss(jnp.zeros((2, 4, 8)), jnp.zeros((2, 5, 8)))
    with pytest.raises(ValueError, match="gram_loss"):
        gram_loss(jnp.zeros((4, 8)), jnp.zeros((4, 8)))


# --- teacher patch-grid resize ---------------------------------------------------------------------------------

def _torch_resize(tokens: np.ndarray, grid_from, grid_to) -> np.ndarray:
    """Upstream's resize of the Gram teacher's patch tokens, [B, P, D] -> [B, P', D]."""
    batch, dim = tokens.shape[0], tokens.shape[-1]
    grid = torch.from_numpy(tokens).transpose(-2, -1).unflatten(-1, grid_from)  # [B, D, *grid]
    mode = dict(mode="bicubic", antialias=False) if len(grid_from) == 2 else dict(mode="trilinear")
    out = F.interpolate(grid, size=grid_to, align_corners=False, **mode)
    return out.reshape(batch, dim, -1).transpose(-2, -1).numpy()


@pytest.mark.parametrize("grid_from,grid_to", [
    ((12, 12), (8, 8)),  # docs/recipe.md §6 at p=8 scaled down: 96 -> 64
    ((8, 8), (6, 6)),  # 64 -> 48
    ((6, 9), (4, 6)),
    ((4, 4), (7, 7)),  # upsampling uses the same stencil
    ((6, 6, 6), (4, 4, 4)),  # 3-D: trilinear (stage 2-G)
    ((4, 6, 5), (3, 9, 5)),
])
def test_resize_matches_torch_interpolate(grid_from, grid_to):
    tokens = np.random.default_rng(0).normal(size=(2, int(np.prod(grid_from)), 5)).astype(np.float32)
    ours = jax.jit(resize_patch_grid, static_argnums=(1, 2))(jnp.asarray(tokens), grid_from, grid_to)
    assert ours.shape == (2, int(np.prod(grid_to)), 5) and ours.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(ours), _torch_resize(tokens, grid_from, grid_to), atol=1e-5)


def test_bicubic_is_the_unantialiased_kernel():
    # Antialiased bicubic (the PI-resize's) downsamples differently: the Gram path must not use it.
    tokens = np.random.default_rng(1).normal(size=(1, 144, 3)).astype(np.float32)
    grid = torch.from_numpy(tokens).transpose(-2, -1).unflatten(-1, (12, 12))
    antialiased = F.interpolate(grid, size=(8, 8), mode="bicubic", antialias=True, align_corners=False)
    antialiased = antialiased.reshape(1, 3, -1).transpose(-2, -1).numpy()
    assert np.abs(np.asarray(resize_patch_grid(jnp.asarray(tokens), (12, 12), (8, 8))) - antialiased).max() > 0.05


def _smooth_field(grid, dim: int) -> np.ndarray:
    """[1, ∏grid, dim]: smooth functions of the patch-centre coordinates (i + 0.5) / n, one per channel."""
    axes = [(np.arange(n) + 0.5) / n for n in grid]
    coords = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(grid))
    phases = np.linspace(0.0, 1.0, dim)
    field = np.prod([np.cos(1.5 * coords[:, [a]] + phases + a) for a in range(len(grid))], axis=0)
    return field[None].astype(np.float32)


@pytest.mark.parametrize("grid_from,grid_to", [((48, 48), (32, 32)), ((32, 24), (24, 36)),
                                               ((16, 16, 16), (12, 12, 12))])
def test_resizing_a_smooth_field_samples_it_on_the_new_grid(grid_from, grid_to):
    # align_corners=False maps patch centres to patch centres, so the resized grid samples the same field. Keys
    # cubic with a = -0.75 (like trilinear) is only second-order accurate, so the error is ~h² of the source grid,
    # and it shrinks accordingly when the source grid is refined.
    def error(scale):
        source = tuple(n * scale for n in grid_from)
        resized = resize_patch_grid(jnp.asarray(_smooth_field(source, 4)), source, grid_to)
        return np.abs(np.asarray(resized) - _smooth_field(grid_to, 4)).max()
    coarse, fine = error(1), error(2)
    assert coarse < 5.0 / min(grid_from) ** 2
    assert fine < coarse / 2.5


def test_same_grid_is_the_identity_and_bad_grids_are_reported():
    tokens = jax.random.normal(jax.random.key(0), (2, 12, 3))
    np.testing.assert_array_equal(resize_patch_grid(tokens, (3, 4), (3, 4)), tokens)
    with pytest.raises(ValueError, match="tokens must be"):
        resize_patch_grid(tokens, (4, 4), (2, 2))
    with pytest.raises(ValueError, match="both be 2-D or both 3-D"):
        resize_patch_grid(tokens, (3, 4), (2, 2, 2))
    with pytest.raises(ValueError, match="positive"):
        resize_patch_grid(tokens, (3, 4), (0, 2))

