"""Flexible-patch-size patch embedding (FlexiViT PI-resize; docs/recipe.md §2.3, docs/torch_format.md §2.1).

One base kernel (8×8 in 2-D, 8×8×8 in 3-D) is stored. A runtime patch size p ≠ 8 uses W_p = W_8 · pinv(R),
where R is the resize operator torch applies to one-hot basis kernels: antialiased bicubic in 2-D, trilinear
(no antialias) in 3-D. Because R upsamples, <resize(x), W_p> = <x, W_8>: a patch seen at a finer sampling
gives the same token. Gradients reach the base kernel through the constant pinv.

The embedding is a "patchify" reshape followed by one matmul, which equals a stride-p convolution and shards
like any dense layer.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flexict_jax.resize import resize_matrix

# torch's interpolate mode per spatial rank, as (method, antialias) for `resize_matrix` (docs/recipe.md §2.3).
_RESIZE_MODE = {2: ("cubic", True), 3: ("linear", False)}


@functools.cache
def pi_resize_matrix(old: tuple[int, ...], new: tuple[int, ...]) -> np.ndarray:
    """pinv(R)ᵀ [∏new, ∏old] as float32: maps a flattened base kernel to the kernel for patch size `new`.

    R [∏new, ∏old] is the Kronecker product of the per-axis resize matrices (row-major flattening). Since
    pinv(A ⊗ B) = pinv(A) ⊗ pinv(B), the pseudo-inverse is assembled from per-axis ones in float64: exact, and
    milliseconds instead of an SVD of the 4096×512 3D operator.
    """
    method, antialias = _RESIZE_MODE[len(old)]
    inverse = np.ones((1, 1))
    for n_old, n_new in zip(old, new):
        inverse = np.kron(inverse, np.linalg.pinv(resize_matrix(n_old, n_new, method, antialias)))
    return inverse.T.astype(np.float32)


class PatchEmbed(nnx.Module):
    """Stride = kernel = p embedding of channels-last [B, (D,) H, W, C] input into [B, N, dim] tokens.

    kernel: [k, k, C, dim] (HWIO) or [k, k, k, C, dim] (DHWIO), k = base_patch_size; bias: [dim].
    """

    def __init__(self, spatial_dims: int, in_chans: int, dim: int, base_patch_size: int, *, rngs: nnx.Rngs):
        if spatial_dims not in _RESIZE_MODE:
            raise ValueError(f"PatchEmbed supports 2 or 3 spatial dims, got {spatial_dims}")
        self.spatial_dims = spatial_dims
        self.base_patch_size = base_patch_size
        shape = (base_patch_size,) * spatial_dims + (in_chans, dim)
        fan_in = in_chans * base_patch_size ** spatial_dims
        # Upstream PatchEmbedND.reset_parameters: kaiming-uniform (fan_in, gain 1) kernel, U(±1/√fan_in) bias.
        kernel_init = nnx.initializers.variance_scaling(1.0, "fan_in", "uniform")
        bound = fan_in ** -0.5
        self.kernel = nnx.Param(kernel_init(rngs.params(), shape, jnp.float32),
                                out_sharding=(None,) * (spatial_dims + 1) + ("embed",))
        self.bias = nnx.Param(jax.random.uniform(rngs.params(), (dim,), jnp.float32, -bound, bound),
                              out_sharding=("embed",))

    def kernel_for(self, patch_size: int) -> jax.Array:
        """The kernel for a runtime patch size: the base kernel itself, or its PI-resize."""
        kernel = self.kernel[...]
        if patch_size == self.base_patch_size:
            return kernel
        old = kernel.shape[:self.spatial_dims]
        new = (patch_size,) * self.spatial_dims
        resize = jnp.asarray(pi_resize_matrix(old, new))
        flat = kernel.reshape(resize.shape[1], -1)
        resized = jnp.matmul(resize, flat, precision=jax.lax.Precision.HIGHEST)
        return resized.reshape(new + kernel.shape[self.spatial_dims:])

    def __call__(self, x: jax.Array, patch_size: int) -> tuple[jax.Array, tuple[int, ...]]:
        """Returns tokens [B, N, dim] in row-major (D,) H, W order and the token grid."""
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(f"{self.spatial_dims}-D patch embedding expects [B, {'D, ' * (self.spatial_dims - 2)}"
                             f"H, W, C] input, got shape {x.shape}")
        if patch_size < 1:
            raise ValueError(f"patch_size must be positive, got {patch_size}")
        batch, channels = x.shape[0], x.shape[-1]
        grid = tuple(n // patch_size for n in x.shape[1:-1])
        if min(grid) == 0:
            raise ValueError(f"input spatial shape {x.shape[1:-1]} is smaller than the patch size {patch_size}")
        # Like a stride-p convolution, drop the remainder that does not fill a whole patch.
        x = x[(slice(None),) + tuple(slice(0, g * patch_size) for g in grid)]
        split = [batch]
        for g in grid:
            split += [g, patch_size]
        x = x.reshape(split + [channels])
        # [B, g0, p, g1, p, (g2, p,) C] -> [B, g0, g1, (g2,) p, p, (p,) C]
        n = self.spatial_dims
        x = x.transpose([0] + [1 + 2 * i for i in range(n)] + [2 + 2 * i for i in range(n)] + [1 + 2 * n])
        patches = x.reshape(batch, int(np.prod(grid)), -1)
        # The PI-resize runs in float32 (its constant is float32, as upstream's pinv); the matmul in x's dtype.
        kernel = self.kernel_for(patch_size).astype(patches.dtype)
        return patches @ kernel.reshape(patches.shape[-1], -1) + self.bias[...], grid
