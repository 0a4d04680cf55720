"""Helpers every task shares: parameter trees to modules, the crop layouts the losses take, the iBOT buffer size.

Pure functions, used by the tasks and by the evaluators that embed with a task's model (`flexict_jax.evals`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
from flax import nnx

from flexict_jax import sharding
from flexict_jax.data import masking2d
from flexict_jax.losses import ibot

Params = dict[str, Any]


def masked_token_capacity(masks_shape: tuple[int, ...], config: mlc.ConfigDict) -> int:
    """Static size of one example's iBOT masked-token buffer for masks [B, n_global, N]: the most tokens the data
    pipeline can mask in an example — at most `masking2d.max_masked_crops` masked crops, each with at most
    int(max_ratio * N) tokens (see flexict_jax.data.masking2d)."""
    _, n_global, n_tokens = masks_shape
    masked_crops = masking2d.max_masked_crops(n_global, config.data.mask.probability)
    return masked_crops * int(config.data.mask.ratio[1] * n_tokens)


@dataclasses.dataclass(frozen=True)
class MaskedTokens:
    """The iBOT masked-token buffer, one block of rows per example: `index` [B, C] into an example's
    n_global·N patch tokens, `valid` and `weight` [B·C] (ibot.gather_masked's, per example).

    Per example, not one buffer over the global batch: a gather with indices into the whole batch cannot keep
    the batch sharding, so the compiler replicated the buffer and ran the iBOT head on every masked token of
    the global batch on every device, memory and FLOPs that did not shrink with more devices (docs/scaling.md
    §4). Gathering within each example keeps the rows with their example's device. The rows come in the same
    order with each example's padding after its own tokens; the losses are weighted sums over valid rows.

    `rows` pins an array over the buffer's rows (the heads' logits, the targets, `valid`, `weight`) to the
    batch sharding, so the iBOT head, Sinkhorn-Knopp and the loss run on each device's own rows, their sums
    all-reduced. Left to itself the partitioner may replicate the rows after the head (it did for the tiny
    configs), and then gathers the boolean `valid` across devices: a collective on booleans, which the TPU
    cost model cannot price (`plan --topology` gets no step time; docs/scaling.md §4)."""
    index: jax.Array
    valid: jax.Array
    weight: jax.Array

    @staticmethod
    def rows(x: jax.Array) -> jax.Array:
        """`x` [B·C, ...] with its rows sharded like the batch (a no-op without an active mesh)."""
        return sharding.constrain(x, ("batch",) + (None,) * (x.ndim - 1))

    def take(self, patch_tokens: jax.Array) -> jax.Array:
        """[B·n_global, N, D] patch tokens (sample-major) -> [B·C, D], the buffer's rows."""
        batch, dim = self.index.shape[0], patch_tokens.shape[-1]
        per_example = patch_tokens.reshape((batch, -1, dim))
        return self.rows(jnp.take_along_axis(per_example, self.index[..., None], axis=1).reshape((-1, dim)))

    def logits(self, head: nnx.Module, patch_tokens: jax.Array) -> jax.Array:
        """The iBOT head's logits of the buffer's rows of `patch_tokens`, their rows pinned like the batch."""
        return self.rows(head(self.take(patch_tokens)))


def gather_masked_tokens(masks: jax.Array, config: mlc.ConfigDict) -> MaskedTokens:
    """The buffer of masks [B, n_global, N] (True = masked, predicted by the student)."""
    capacity = masked_token_capacity(masks.shape, config)
    index, valid, weight = jax.vmap(ibot.gather_masked, in_axes=(0, None))(masks, capacity)
    return MaskedTokens(index, MaskedTokens.rows(valid.reshape(-1)), MaskedTokens.rows(weight.reshape(-1)))


def merge_model(graphdef: nnx.GraphDef, abstract_state: nnx.State, params: Params) -> nnx.Module:
    """The model of `graphdef` holding `params` (a pure dict): how a task's pure loss function uses its modules."""
    state = jax.tree.map(lambda v: v, abstract_state)  # a fresh container to fill in
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def flatten_crops(x: jax.Array) -> jax.Array:
    """[B, n_crops, ...] -> [B * n_crops, ...], sample-major so the batch sharding is preserved."""
    return x.reshape((-1,) + x.shape[2:])


def crops_first(x: jax.Array, n_crops: int) -> jax.Array:
    """[B * n_crops, K] (sample-major) -> [n_crops, B, K], the layout the DINO loss takes."""
    return x.reshape((-1, n_crops) + x.shape[1:]).swapaxes(0, 1)
