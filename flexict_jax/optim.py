"""AdamW with FlexiCT's parameter groups (docs/recipe.md §4) as a chain of optax transformations.

The trainable parameters are a nested dict {submodule: {...}} (`nnx.to_pure_dict(nnx.state(model, nnx.Param))`).
`param_groups` gives every leaf its static group info; `build_optimizer` turns it into

    drop idle gradients → per-submodule grad-norm clip → Adam → torch-style lr / weight-decay scaling

with the schedule step kept in the optimizer state, so a restored state resumes the schedules.
"""
from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from flexict_jax.errors import ConfigError
from flexict_jax.schedules import value_at

# Backbone leaves that sit before the first block for layer-wise LR decay (docs/recipe.md §4: layer_id 0).
_EMBEDDING_TOKENS = ("cls_token", "storage_tokens", "mask_token")
OPTIM_KEYS = ("clip_grad", "unclipped", "betas", "eps", "layer_decay", "patch_embed_lr_mult",
              "freeze_last_layer_steps", "idle_patterns")
# torch.nn.utils.clip_grad_norm_ divides by (norm + 1e-6); kept so the clip matches upstream exactly.
_CLIP_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class ParamGroup:
    """Static optimizer info of one parameter leaf (a pytree leaf, not a node)."""
    lr_mult: float  # layer-wise decay × patch-embed multiplier
    wd_mult: float  # 0 or 1
    is_last_layer: bool  # head prototype layer: LR 0 during the last-layer freeze
    is_frozen: bool  # idle in this stage: no gradient, no update, no weight decay
    clip_group: str  # top-level submodule whose gradient norm is clipped together


def lr_scale_sqrt_1024(global_batch: Any) -> Any:
    """LR factor of the `sqrt_wrt_1024` scaling rule, 4·√(global_batch/1024), for peak and end LR (docs/recipe.md §4).

    Also takes an ml_collections FieldReference, so a config's LR follows later overrides of the batch size.
    """
    if isinstance(global_batch, numbers.Real) and not global_batch > 0:
        raise ValueError(f"global batch must be positive, got {global_batch}")
    return 4 * (global_batch / 1024) ** 0.5


def leaf_path(path: tuple[Any, ...]) -> str:
    """'backbone/blocks/3/attn/qkv/kernel' from a jax key path; int and str block keys read the same."""
    names = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            names.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            names.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            # An nnx.State wraps each array in a Variable whose key path ends in `.value`.
            if key.name != "value":
                names.append(key.name)
        else:
            names.append(str(key))
    return "/".join(names)


def _matches(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def _check_patterns(paths: Sequence[str], patterns: Sequence[str], what: str) -> None:
    # A misspelt pattern would silently train (or decay) what it meant to exclude.
    for pattern in patterns:
        if not any(_matches(path, pattern) for path in paths):
            raise ValueError(f"{what} entry {pattern!r} matches no parameter; parameters start with "
                             f"{sorted({path.split('/')[0] for path in paths})}")


def _layer_id(names: Sequence[str], depth: int, path: str) -> int:
    """Backbone layer id (docs/recipe.md §4): 0 for embeddings and tokens, i+1 for block i, depth+1 for the rest."""
    if names[0] != "backbone" or len(names) < 2:
        return depth + 1
    if names[1].startswith("patch_embed") or names[1] in _EMBEDDING_TOKENS:
        return 0
    if names[1] == "blocks":
        block = int(names[2])
        if not 0 <= block < depth:
            raise ValueError(f"parameter {path}: block {block} is outside depth {depth}")
        return block + 1
    return depth + 1


def param_groups(params: Any, *, depth: int, layer_decay: float, patch_embed_lr_mult: float,
                 idle_patterns: Sequence[str], no_decay_patterns: Sequence[str] = ()) -> Any:
    """A pytree like `params` whose leaves are each leaf's `ParamGroup` (docs/recipe.md §4, §13 #14, §14.1).

    - LR multiplier `layer_decay ** (depth + 1 - layer_id)`; only the backbone has layer ids, so the final
      backbone norm and every other submodule get 1.0. `patch_embed*` is further × `patch_embed_lr_mult`.
    - Weight decay 0 for names ending in "bias" or containing "norm" or "gamma" (LayerScale), matched on the
      whole path as upstream matches on the dotted name. The CLS, storage and mask tokens are *not* exempt:
      upstream decays them despite its own comment, and we stay faithful (docs/recipe.md §13 #14).
      `no_decay_patterns` (path prefixes) adds exemptions upstream makes with separate groups, e.g. stage 3's
      "logit_scale" (docs/recipe.md §8).
    - `idle_patterns` (path prefixes such as "backbone/patch_embed_3d") mark leaves this stage never uses. Torch
      AdamW skips parameters without a gradient, so they must neither move nor decay (docs/recipe.md §14.1); their
      multipliers are kept for reference but `is_frozen` overrides them.
    """
    if depth <= 0:
        raise ValueError(f"depth must be positive, got {depth}")
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    paths = [leaf_path(path) for path, _ in flat]
    _check_patterns(paths, idle_patterns, "optim.idle_patterns")
    _check_patterns(paths, no_decay_patterns, "optim.no_weight_decay")

    def group(key_path: tuple[Any, ...], _) -> ParamGroup:
        path = leaf_path(key_path)
        names = path.split("/")
        lr_mult = layer_decay ** (depth + 1 - _layer_id(names, depth, path))
        if any(name.startswith("patch_embed") for name in names):
            lr_mult *= patch_embed_lr_mult
        no_decay = (names[-1].endswith("bias") or "norm" in path or "gamma" in path
                    or any(_matches(path, pattern) for pattern in no_decay_patterns))
        return ParamGroup(
            lr_mult=lr_mult,
            wd_mult=0.0 if no_decay else 1.0,
            is_last_layer="last_layer" in names,
            is_frozen=any(_matches(path, pattern) for pattern in idle_patterns),
            clip_group=names[0])

    return jax.tree_util.tree_map_with_path(group, params)


def drop_idle_gradients(groups: Any) -> optax.GradientTransformation:
    """Zeroes the gradient of idle leaves. Torch has no gradient for them at all, so they count in no clip
    norm and their Adam moments stay zero (docs/recipe.md §14.1)."""

    def update_fn(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, info: jnp.zeros_like(u) if info.is_frozen else u, updates, groups), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def submodule_norms(updates: Any, groups: Any) -> dict[str, jax.Array]:
    """Global L2 norm of `updates` per clip group (top-level submodule)."""
    squares: dict[str, list[jax.Array]] = {}
    for update, info in zip(jax.tree.leaves(updates), jax.tree.leaves(groups)):
        squares.setdefault(info.clip_group, []).append(jnp.sum(jnp.square(update.astype(jnp.float32))))
    return {name: jnp.sqrt(sum(terms)) for name, terms in squares.items()}


def clip_by_submodule_norm(groups: Any, max_norm: float, unclipped: Sequence[str]) -> optax.GradientTransformation:
    """Clips each top-level submodule's gradient by its own global norm, like torch's clip_grad_norm_ called
    once per student submodule (docs/recipe.md §4); submodules in `unclipped` pass through (stage 3, docs/recipe.md §8)."""

    def update_fn(updates, state, params=None):
        del params
        norms = submodule_norms(updates, groups)
        factors = {name: jnp.minimum(1.0, max_norm / (norm + _CLIP_EPS))
                   for name, norm in norms.items() if name not in unclipped}
        updates = jax.tree.map(
            lambda u, info: (u * factors[info.clip_group]).astype(u.dtype) if info.clip_group in factors else u,
            updates, groups)
        return updates, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


class ScheduleState(NamedTuple):
    step: jax.Array  # int32 scalar: the number of updates applied so far, indexes the schedule tables


def scale_by_param_groups(groups: Any, lr_table: jax.Array, wd_table: jax.Array,
                          freeze_last_layer_steps: int) -> optax.GradientTransformation:
    """Turns Adam directions into AdamW updates with per-leaf LR and torch-style decoupled weight decay.

    Torch AdamW with param groups does p ← p − lr_g·wd_g·p − lr_g·adam, where the group's lr_g already includes
    its multiplier: the decay is scaled by the leaf's own LR (multiplier included) and is 0 while the last
    layer's LR is 0. Here update = −lr·lr_mult·(adam + wd·wd_mult·p). Idle leaves get a zero update.
    """
    lr_table = np.asarray(lr_table, dtype=np.float32)  # host tables: see schedules.table_from_config
    wd_table = np.asarray(wd_table, dtype=np.float32)
    for name, table in (("lr_table", lr_table), ("wd_table", wd_table)):
        if table.ndim != 1 or table.shape[0] == 0:
            raise ValueError(f"{name} must be a non-empty 1-D table of per-step values, got shape {table.shape}")

    def init_fn(params):
        del params
        return ScheduleState(step=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("scale_by_param_groups needs params for weight decay: call update(grads, state, params)")
        lr = value_at(lr_table, state.step)
        wd = value_at(wd_table, state.step)
        last_layer_lr = jnp.where(state.step < freeze_last_layer_steps, 0.0, lr)

        def leaf(update, param, info):
            if info.is_frozen:
                return jnp.zeros_like(update)
            leaf_lr = (last_layer_lr if info.is_last_layer else lr) * info.lr_mult
            return (-leaf_lr * (update + wd * info.wd_mult * param)).astype(update.dtype)

        return jax.tree.map(leaf, updates, params, groups), ScheduleState(step=state.step + 1)

    return optax.GradientTransformation(init_fn, update_fn)


def validate(optim_cfg: ml_collections.ConfigDict) -> None:
    """The keys of config `optim` that need no parameters to check; ConfigError names the key."""
    missing = [key for key in OPTIM_KEYS if key not in optim_cfg]
    if missing:
        raise ConfigError(f"config optim lacks key(s) {missing}")
    for key in ("clip_grad", "eps", "layer_decay", "patch_embed_lr_mult"):
        value = optim_cfg[key]
        if not isinstance(value, (int, float)) or not value > 0:  # also rejects NaN
            raise ConfigError(f"config optim.{key} must be a positive number, got {value!r}")
    betas = optim_cfg.betas
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        raise ConfigError(f"config optim.betas must be two numbers in [0, 1), got {betas!r}")
    if not isinstance(optim_cfg.freeze_last_layer_steps, int) or optim_cfg.freeze_last_layer_steps < 0:
        raise ConfigError("config optim.freeze_last_layer_steps must be an int >= 0, "
                         f"got {optim_cfg.freeze_last_layer_steps!r}")


def build_optimizer(params: Any, optim_cfg: ml_collections.ConfigDict, *, lr_table: jax.Array,
                    wd_table: jax.Array, depth: int) -> optax.GradientTransformation:
    """FlexiCT's AdamW (docs/recipe.md §4) for `params`; call `update(grads, state, params)`.

    `optim_cfg` keys: clip_grad, unclipped, betas, eps, layer_decay, patch_embed_lr_mult,
    freeze_last_layer_steps, idle_patterns, and optionally no_weight_decay (path prefixes, see
    `param_groups`). `lr_table`/`wd_table` hold one value per step (`schedules.table_from_config`).
    """
    validate(optim_cfg)
    groups = param_groups(params, depth=depth, layer_decay=optim_cfg.layer_decay,
                          patch_embed_lr_mult=optim_cfg.patch_embed_lr_mult,
                          idle_patterns=list(optim_cfg.idle_patterns),
                          no_decay_patterns=list(optim_cfg.get("no_weight_decay", ())))
    submodules = {info.clip_group for info in jax.tree.leaves(groups)}
    unknown = sorted(set(optim_cfg.unclipped) - submodules)
    if unknown:
        raise ConfigError(f"config optim.unclipped names {unknown}, which are not submodules {sorted(submodules)}")
    b1, b2 = optim_cfg.betas
    # Idle leaves keep (zero) Adam moments instead of being masked out: the state then mirrors the params
    # everywhere, so optax.tree_utils.tree_map_params can shard it, at the cost of two idle patch-embed copies.
    return optax.chain(
        drop_idle_gradients(groups),
        clip_by_submodule_norm(groups, float(optim_cfg.clip_grad), list(optim_cfg.unclipped)),
        optax.scale_by_adam(b1=b1, b2=b2, eps=optim_cfg.eps),
        scale_by_param_groups(groups, lr_table, wd_table, int(optim_cfg.freeze_last_layer_steps)),
    )
