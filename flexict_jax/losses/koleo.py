"""KoLeo regulariser: spreads the student's CLS embeddings over the sphere (docs/recipe.md §3.4)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from flexict_jax.ops import l2_normalize


def _koleo_group(x: jax.Array, eps: float) -> jax.Array:
    """KoLeo of one [G, D] group: −mean log of each sample's distance to its nearest neighbour."""
    # torch F.normalize semantics: x / max(‖x‖, eps).
    x = l2_normalize(x, eps=eps)
    dots = x @ x.T
    # −1 on the diagonal (the minimum cosine) keeps a sample from being its own neighbour.
    dots = jnp.where(jnp.eye(x.shape[0], dtype=bool), -1.0, dots)
    neighbours = x[jnp.argmax(dots, axis=1)]
    # torch PairwiseDistance semantics: eps is added to the difference before the norm.
    distances = jnp.linalg.norm(x - neighbours + eps, axis=-1)
    return -jnp.mean(jnp.log(distances + eps))


def koleo_loss(x: jax.Array, *, group_size: int | None = None, eps: float = 1e-8) -> jax.Array:
    """KoLeo loss of the pre-head CLS embeddings (docs/recipe.md §3.4), L = −mean log(‖x − x_nn + eps‖ + eps).

    Upstream computes it per GPU (batch 100 in stages 1–2) and, in stage 1.1, over the global batch. Here
    the batch is split into fixed groups of `group_size` consecutive samples, each group finds neighbours
    only among itself, and the group losses are averaged; so the value does not depend on how many devices
    the batch is sharded over.

    Args:
      x: [B, D] embeddings. To reproduce the per-crop average of upstream, pass crops in crop-major order
        ([n_crops·B_crop, D]) with a `group_size` that divides B_crop, so no group straddles two crops.
      group_size: samples per neighbour-search group; None = the whole (global) batch, i.e. stage 1.1's
        distributed KoLeo.
      eps: 1e-8, used for the normalisation, inside the distance and inside the log, as upstream.

    Returns:
      float32 scalar.
    """
    if x.ndim != 2:
        raise ValueError(f"koleo_loss: x must be [batch, dim], got shape {x.shape}")
    batch = x.shape[0]
    group_size = batch if group_size is None else group_size
    if group_size < 2:
        raise ValueError(f"koleo_loss: a neighbour needs groups of >= 2 samples, got group_size {group_size}")
    if batch % group_size:
        raise ValueError(f"koleo_loss: batch {batch} is not divisible by group_size {group_size}")
    groups = x.astype(jnp.float32).reshape(batch // group_size, group_size, x.shape[1])
    return jnp.mean(jax.vmap(_koleo_group, in_axes=(0, None))(groups, eps))
