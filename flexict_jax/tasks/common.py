"""Helpers every task shares: parameter trees to modules, the crop layouts the losses take, the iBOT buffer size.

Pure functions, used by the tasks and by the evaluators that embed with a task's model (`flexict_jax.evals`).
"""
from __future__ import annotations

from typing import Any

import jax
import ml_collections as mlc
from flax import nnx

from flexict_jax.data import masking2d

Params = dict[str, Any]


def masked_token_capacity(masks_shape: tuple[int, ...], config: mlc.ConfigDict) -> int:
    """Static size of the iBOT masked-token buffer for masks [B, n_global, N]: the most tokens the data pipeline
    can mask — at most `masking2d.max_masked_crops` masked crops per example, each with at most
    int(max_ratio * N) tokens (see flexict_jax.data.masking2d)."""
    batch, n_global, n_tokens = masks_shape
    masked_crops = masking2d.max_masked_crops(n_global, config.data.mask.probability)
    return batch * masked_crops * int(config.data.mask.ratio[1] * n_tokens)


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
