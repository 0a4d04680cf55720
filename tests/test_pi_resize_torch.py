"""Issue #3's PI-resize check at the operator level, patch 8 -> 16, against torch 2.13 (docs/recipe.md §2.3, §14.1).

tests/test_models.py already checks, through `PatchEmbed`, that <resize(x), ŵ> = <x, w> for random x with
torch's own interpolate (2-D and 3-D, 8 -> 16) and the resampled 2-D kernel for 8 -> 16 against upstream's
formula; tests/test_resize.py checks the per-axis matrices. What is left, and checked here: the operator the
patch embedding actually uses, `pi_resize_matrix`, against the one torch builds from one-hot basis kernels, in
2-D (bicubic, antialias) and 3-D (trilinear), and the 3-D kernel for patch 16 against upstream's fp32 pinv.
"""
from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from flexict_jax.models.patch_embed import PatchEmbed, pi_resize_matrix

torch = pytest.importorskip("torch")
F = torch.nn.functional

# The torch calls of upstream's PatchEmbedND resample, per spatial rank (docs/recipe.md §2.3).
TORCH_MODE = {2: dict(mode="bicubic", antialias=True), 3: dict(mode="trilinear")}


def _torch_operator(spatial_dims: int, old: int, new: int, dtype) -> torch.Tensor:
    """R [new**n, old**n]: one-hot basis kernels pushed through F.interpolate, as upstream builds it."""
    basis = torch.eye(old ** spatial_dims, dtype=dtype).reshape(-1, 1, *(old,) * spatial_dims)
    resized = F.interpolate(basis, size=(new,) * spatial_dims, align_corners=False, **TORCH_MODE[spatial_dims])
    return resized.reshape(len(basis), -1).T


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_pi_resize_operator_is_the_pinv_of_torchs_resize(spatial_dims):
    ours = pi_resize_matrix((8,) * spatial_dims, (16,) * spatial_dims).astype(np.float64)  # pinv(R)ᵀ
    operator = _torch_operator(spatial_dims, 8, 16, torch.float64)
    assert ours.shape == tuple(operator.shape) == (16 ** spatial_dims, 8 ** spatial_dims)
    # R has full column rank, so pinv(R)ᵀ = R (RᵀR)⁻¹ (an SVD of the 4096 x 512 operator would be ~5x slower).
    np.testing.assert_allclose(ours, (operator @ torch.linalg.inv(operator.T @ operator)).numpy(), atol=1e-6)
    # Rᵀ·pinv(R)ᵀ = I: <R x, ŵ> = <x, w> for every x and w, i.e. the response to an upsampled patch is kept.
    np.testing.assert_allclose(operator.numpy().T @ ours, np.eye(8 ** spatial_dims), atol=1e-5)


def test_3d_kernel_for_patch_16_matches_upstreams_resample():
    """Upstream: W_16 = W_8 · pinv(R) in fp32, R from trilinear one-hot basis kernels (docs/torch_format.md §2.1)."""
    embed = PatchEmbed(3, 1, 4, 8, rngs=nnx.Rngs(0))
    weight = torch.from_numpy(np.array(embed.kernel[...])).movedim(-1, 0).movedim(-1, 1)  # DHWIO -> O, I, D, H, W
    operator = _torch_operator(3, 8, 16, torch.float32)
    theirs = (weight.reshape(4, 1, -1) @ torch.linalg.pinv(operator)).reshape(4, 1, 16, 16, 16).numpy()
    ours = np.moveaxis(np.moveaxis(np.asarray(embed.kernel_for(16)), -1, 0), -1, 1)
    assert ours.shape == theirs.shape
    assert np.linalg.norm(ours - theirs) / np.linalg.norm(theirs) < 1e-5
