"""Schedules, FlexiCT parameter groups and the AdamW chain (docs/recipe.md §4, §13 #14, §14.1) on tiny fake params."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from flexict_jax import optim, schedules

DIM = 2


def _fake_params(depth: int = 3, *, str_keys: bool = False, seed: int = 0) -> dict:
    """A pure param dict with the backbone/head layout of the real model, DIM wide."""
    rng = np.random.default_rng(seed)

    def arr(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    def linear(bias=True):
        return {"kernel": arr(DIM, DIM), "bias": arr(DIM)} if bias else {"kernel": arr(DIM, DIM)}

    def layer_norm():
        return {"scale": arr(DIM), "bias": arr(DIM)}

    def block():
        return {"norm1": layer_norm(), "attn": {"qkv": {"kernel": arr(DIM, 3 * DIM)}, "proj": linear()},
                "ls1": {"gamma": arr(DIM)}, "norm2": layer_norm(), "mlp": {"fc1": linear(), "fc2": linear()},
                "ls2": {"gamma": arr(DIM)}}

    def head():
        return {"mlp": {"layers": {0: linear(), 1: linear()}}, "last_layer": {"kernel": arr(DIM, 3)}}

    key = str if str_keys else int
    return {
        "backbone": {
            "patch_embed_2d": {"kernel": arr(2, 2, 1, DIM), "bias": arr(DIM)},
            "patch_embed_3d": {"kernel": arr(2, 2, 2, 1, DIM), "bias": arr(DIM)},
            "cls_token": arr(1, 1, DIM), "storage_tokens": arr(1, 4, DIM), "mask_token": arr(1, DIM),
            "blocks": {key(i): block() for i in range(depth)},
            "norm": layer_norm(),
        },
        "dino_head": head(),
        "ibot_head": head(),
    }


def _optim_cfg(**overrides) -> ml_collections.ConfigDict:
    cfg = dict(clip_grad=3.0, unclipped=[], betas=(0.9, 0.999), eps=1e-8, layer_decay=0.9, patch_embed_lr_mult=0.2,
               freeze_last_layer_steps=0, idle_patterns=["backbone/patch_embed_3d"])
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def _grads(params, seed: int = 1, scale: float = 1.0):
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    return treedef.unflatten([jnp.asarray(scale * rng.normal(size=x.shape), jnp.float32) for x in leaves])


def _run(tx, params, grads_per_step):
    state = tx.init(params)
    for grads in grads_per_step:
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


# ---------------------------------------------------------------- schedules

def test_warmup_cosine_constant_pieces():
    table = schedules.linear_warmup_cosine_decay(start=0.0, peak=1.0, end=0.1, warmup_steps=10, total_steps=40,
                                                 cosine_steps=20)
    assert table.shape == (40,) and table.dtype == np.float64
    np.testing.assert_allclose(table[:10], np.arange(10) / 10)  # linear, endpoint excluded
    assert table[10] == 1.0  # the cosine starts at the peak
    np.testing.assert_allclose(table[19:21].mean(), (1.0 + 0.1) / 2)  # cosine midpoint (between steps 19 and 20)
    np.testing.assert_allclose(table[29], 0.1)  # the cosine's last step is `end` (upstream's endpoint convention)
    np.testing.assert_array_equal(table[30:], 0.1)  # constant tail
    assert np.all(np.diff(table[10:30]) < 0)


def test_cosine_defaults_to_rest_and_constant_schedule():
    table = schedules.linear_warmup_cosine_decay(start=1.0, peak=1.0, end=0.0, warmup_steps=0, total_steps=8)
    np.testing.assert_allclose(table, 0.5 * (1 + np.cos(np.pi * np.arange(8) / 7)))
    flat = schedules.linear_warmup_cosine_decay(start=0.04, peak=0.04, end=0.04, warmup_steps=0, total_steps=5)
    np.testing.assert_array_equal(flat, 0.04)  # docs/recipe.md §5: constant weight decay


def test_upward_cosine_ramp_stage_1_1():
    # docs/recipe.md §6: start 0, peak 0, end 5e-5, no warm-up, cosine over 10 "epochs" (scaled down here).
    table = schedules.linear_warmup_cosine_decay(start=0.0, peak=0.0, end=5e-5, warmup_steps=0, total_steps=30,
                                                 cosine_steps=10)
    assert table[0] == 0.0
    np.testing.assert_allclose(table[4:6].mean(), 2.5e-5)  # symmetric about the ramp's middle
    np.testing.assert_allclose(table[9], 5e-5)
    assert np.all(np.diff(table[:10]) > 0)
    np.testing.assert_array_equal(table[10:], 5e-5)


def _upstream_linear_warmup_cosine_decay(start, peak, end, warmup_iterations, total_iterations,
                                        cosine_iterations=None):
    """Upstream's formula (`dinov3/train/cosine_lr_scheduler.py`, docs/recipe.md §4), written out literally."""
    linear = np.linspace(start, peak, warmup_iterations, endpoint=False)
    if cosine_iterations is None:
        cosine_iterations = total_iterations - warmup_iterations
    cosine = (peak - end) * ((np.cos(np.linspace(0, np.pi, cosine_iterations)) + 1) / 2) + end
    constant = np.full((total_iterations - cosine_iterations - warmup_iterations,), fill_value=end)
    return np.concatenate([linear, cosine, constant])


@pytest.mark.parametrize("args", [
    (0.0, 2e-4 * 3.54, 2e-4 * 3.54, 30, 200),  # stage 1 (warm-up, then constant), scaled down
    (0.0, 0.0, 5e-5 * 2.5, 0, 100, 10),  # stage 1.1's upward ramp
    (1e-4 * 2.09, 1e-4 * 2.09, 1e-6 * 2.09, 0, 57),  # stage 3's decay over the whole run
    (0.04, 0.07, 0.07, 30, 100),  # teacher temperature
    (0.1, 1.0, 0.5, 7, 40, 13), (0.0, 1.0, 0.0, 0, 1), (0.0, 1.0, 0.0, 3, 4, 1)])
def test_schedule_matches_upstream_formula(args):
    start, peak, end, warmup, total, *cosine = args
    ours = schedules.linear_warmup_cosine_decay(start=start, peak=peak, end=end, warmup_steps=warmup,
                                                total_steps=total, cosine_steps=cosine[0] if cosine else None)
    np.testing.assert_allclose(ours, _upstream_linear_warmup_cosine_decay(*args), rtol=1e-12, atol=0)


def test_schedule_shorter_run_is_a_prefix_of_the_planned_one():
    args = dict(start=0.0, peak=1.0, end=0.5, warmup_steps=6, cosine_steps=8)
    full = schedules.linear_warmup_cosine_decay(total_steps=20, **args)
    short = schedules.linear_warmup_cosine_decay(total_steps=4, **args)
    np.testing.assert_array_equal(short, full[:4])


@pytest.mark.parametrize("kwargs", [dict(cosine_steps=-5), dict(warmup_steps=-1),
                                    dict(total_steps=0), dict(peak=math.nan)])
def test_schedule_rejects_bad_arguments(kwargs):
    args = dict(start=0.0, peak=1.0, end=0.0, warmup_steps=2, total_steps=10, cosine_steps=None) | kwargs
    with pytest.raises(ValueError):
        schedules.linear_warmup_cosine_decay(**args)


def test_schedule_table_from_config_and_value_at():
    section = ml_collections.ConfigDict(dict(start=0.0, peak=2e-4, end=2e-4, warmup_steps=4, cosine_steps=None))
    table = schedules.table_from_config(section, 10, name="schedules.lr")
    assert table.dtype == jnp.float32 and table.shape == (10,)
    np.testing.assert_allclose(table[4:], 2e-4, rtol=1e-6)
    np.testing.assert_allclose(table[:4], [0, 5e-5, 1e-4, 1.5e-4], rtol=1e-6)
    lookup = jax.jit(schedules.value_at)
    assert float(lookup(table, 2)) == pytest.approx(float(table[2]))
    assert float(lookup(table, 10**6)) == float(table[-1])  # clamped past the end
    del section.cosine_steps
    with pytest.raises(KeyError, match="schedules.lr.*cosine_steps"):
        schedules.table_from_config(section, 10, name="schedules.lr")
    bad = ml_collections.ConfigDict(dict(start=0.0, peak=1.0, end=1.0, warmup_steps=-2, cosine_steps=None))
    with pytest.raises(ValueError, match="schedules.weight_decay"):
        schedules.table_from_config(bad, 10, name="schedules.weight_decay")


def test_lr_scale_sqrt_1024():
    assert optim.lr_scale_sqrt_1024(1024) == 4.0
    assert optim.lr_scale_sqrt_1024(400) == pytest.approx(2.5)  # docs/recipe.md §6
    assert optim.lr_scale_sqrt_1024(800) == pytest.approx(3.5355, abs=1e-4)  # docs/recipe.md §5
    with pytest.raises(ValueError):
        optim.lr_scale_sqrt_1024(0)
    config = ml_collections.ConfigDict(dict(global_batch_size=800))
    scale = optim.lr_scale_sqrt_1024(config.get_ref("global_batch_size"))
    config.global_batch_size = 400  # a later override (e.g. a command-line flag) is followed
    assert scale.get() == pytest.approx(2.5)


# ---------------------------------------------------------------- parameter groups

def test_layer_decay_multipliers_depth_16():
    groups = optim.param_groups(_fake_params(16), depth=16, layer_decay=0.9, patch_embed_lr_mult=0.2,
                                idle_patterns=[])
    bb = groups["backbone"]
    assert bb["blocks"][15]["attn"]["qkv"]["kernel"].lr_mult == pytest.approx(0.9)
    assert bb["blocks"][0]["mlp"]["fc1"]["kernel"].lr_mult == pytest.approx(0.185, abs=5e-4)
    assert bb["blocks"][7]["norm1"]["scale"].lr_mult == pytest.approx(0.9 ** 9)
    assert bb["patch_embed_2d"]["kernel"].lr_mult == pytest.approx(0.9 ** 17 * 0.2)
    assert bb["patch_embed_3d"]["bias"].lr_mult == pytest.approx(0.167 * 0.2, abs=5e-4)  # ≈0.033
    for token in ("cls_token", "storage_tokens", "mask_token"):
        assert bb[token].lr_mult == pytest.approx(0.167, abs=5e-4)
    assert bb["norm"]["scale"].lr_mult == 1.0
    for head in ("dino_head", "ibot_head"):
        assert all(info.lr_mult == 1.0 for info in jax.tree.leaves(groups[head]))
        assert groups[head]["last_layer"]["kernel"].is_last_layer
        assert not groups[head]["mlp"]["layers"][0]["kernel"].is_last_layer
    assert {info.clip_group for info in jax.tree.leaves(groups)} == {"backbone", "dino_head", "ibot_head"}


def test_string_block_keys_group_like_int_keys():
    kwargs = dict(depth=3, layer_decay=0.9, patch_embed_lr_mult=0.2, idle_patterns=["backbone/patch_embed_3d"])
    by_int = optim.param_groups(_fake_params(3), **kwargs)
    by_str = optim.param_groups(_fake_params(3, str_keys=True), **kwargs)
    for i in range(3):
        assert by_int["backbone"]["blocks"][i] == by_str["backbone"]["blocks"][str(i)]


def test_weight_decay_exemptions():
    groups = optim.param_groups(_fake_params(2), depth=2, layer_decay=0.9, patch_embed_lr_mult=0.2,
                                idle_patterns=[], no_decay_patterns=["ibot_head/mlp/layers/1"])
    bb, block = groups["backbone"], groups["backbone"]["blocks"][1]
    exempt = [block["norm1"]["scale"], block["norm2"]["bias"], block["ls1"]["gamma"], block["ls2"]["gamma"],
              block["attn"]["proj"]["bias"], block["mlp"]["fc1"]["bias"], bb["norm"]["scale"],
              bb["patch_embed_2d"]["bias"], groups["dino_head"]["mlp"]["layers"][0]["bias"],
              groups["ibot_head"]["mlp"]["layers"][1]["kernel"]]
    decayed = [block["attn"]["qkv"]["kernel"], block["mlp"]["fc2"]["kernel"], bb["patch_embed_2d"]["kernel"],
               bb["cls_token"], bb["storage_tokens"], bb["mask_token"],  # not exempt upstream (docs/recipe.md §13 #14)
               groups["dino_head"]["last_layer"]["kernel"], groups["ibot_head"]["mlp"]["layers"][0]["kernel"]]
    assert [info.wd_mult for info in exempt] == [0.0] * len(exempt)
    assert [info.wd_mult for info in decayed] == [1.0] * len(decayed)


def test_param_groups_reject_bad_input():
    kwargs = dict(layer_decay=0.9, patch_embed_lr_mult=0.2)
    with pytest.raises(ValueError, match="backbone/patch_embed3d"):
        optim.param_groups(_fake_params(2), depth=2, idle_patterns=["backbone/patch_embed3d"], **kwargs)
    with pytest.raises(ValueError, match="block 2 is outside depth 2"):
        optim.param_groups(_fake_params(3), depth=2, idle_patterns=[], **kwargs)
    params, cfg = _fake_params(2), _optim_cfg()
    del cfg.clip_grad
    with pytest.raises(KeyError, match="clip_grad"):
        optim.build_optimizer(params, cfg, lr_table=[1e-3], wd_table=[0.0], depth=2)
    with pytest.raises(ValueError, match="optim.layer_decay"):
        optim.build_optimizer(params, _optim_cfg(layer_decay=math.nan), lr_table=[1e-3], wd_table=[0.0], depth=2)
    with pytest.raises(ValueError, match="text_tower"):
        optim.build_optimizer(params, _optim_cfg(unclipped=["text_tower"]), lr_table=[1e-3], wd_table=[0.0], depth=2)


# ---------------------------------------------------------------- the optimizer

def _numpy_adamw(param, grads, *, lr, wd, b1=0.9, b2=0.999, eps=1e-8):
    """torch.optim.AdamW's algorithm, written out: decoupled decay scaled by the group LR, bias-corrected Adam."""
    p = np.asarray(param, np.float64)
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = np.asarray(g, np.float64)
        p = p * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        denom = np.sqrt(v) / np.sqrt(1 - b2 ** t) + eps
        p = p - lr / (1 - b1 ** t) * m / denom
    return p


def test_update_matches_numpy_adamw():
    depth, lr, wd = 3, 1e-2, 0.04
    params = _fake_params(depth)
    tx = optim.build_optimizer(params, _optim_cfg(clip_grad=1e6), lr_table=np.full(10, lr),
                               wd_table=np.full(10, wd), depth=depth)
    grads = [_grads(params, seed=s) for s in (1, 2, 3)]
    new, _ = _run(tx, params, grads)
    cases = [  # (path, lr multiplier, wd multiplier), worked out by hand from docs/recipe.md §4 with depth 3
        (("backbone", "blocks", 0, "attn", "qkv", "kernel"), 0.9 ** 3, 1.0),
        (("backbone", "blocks", 2, "norm2", "scale"), 0.9, 0.0),
        (("backbone", "patch_embed_2d", "kernel"), 0.9 ** 4 * 0.2, 1.0),
        (("backbone", "cls_token"), 0.9 ** 4, 1.0),
        (("dino_head", "mlp", "layers", 1, "kernel"), 1.0, 1.0),
        (("ibot_head", "last_layer", "kernel"), 1.0, 1.0),
    ]
    for path, lr_mult, wd_mult in cases:
        def get(tree):
            for key in path:
                tree = tree[key]
            return tree
        expected = _numpy_adamw(get(params), [get(g) for g in grads], lr=lr * lr_mult, wd=wd * wd_mult)
        np.testing.assert_allclose(get(new), expected, rtol=1e-5, atol=1e-6, err_msg="/".join(map(str, path)))


def test_clipping_is_per_submodule():
    params = _fake_params(2)
    groups = optim.param_groups(params, depth=2, layer_decay=0.9, patch_embed_lr_mult=0.2,
                                idle_patterns=["backbone/patch_embed_3d"])
    clip = optim.clip_by_submodule_norm(groups, 3.0, unclipped=["ibot_head"])
    grads = _grads(params, scale=10.0)
    clipped, _ = clip.update(grads, clip.init(params))
    before, after = optim.submodule_norms(grads, groups), optim.submodule_norms(clipped, groups)
    assert before["backbone"] > 3 and before["dino_head"] > 3
    assert float(after["backbone"]) == pytest.approx(3.0, rel=1e-5)
    assert float(after["dino_head"]) == pytest.approx(3.0, rel=1e-5)
    assert float(after["ibot_head"]) == pytest.approx(float(before["ibot_head"]))  # unclipped (docs/recipe.md §8)

    # Through the whole optimizer: blowing up the heads' gradients leaves the backbone's update untouched.
    tx = optim.build_optimizer(params, _optim_cfg(), lr_table=np.full(4, 1e-2), wd_table=np.full(4, 0.04), depth=2)
    heads_scaled = {**grads, "dino_head": jax.tree.map(lambda g: 100 * g, grads["dino_head"]),
                    "ibot_head": jax.tree.map(lambda g: -7 * g, grads["ibot_head"])}
    idle_scaled = {**grads, "backbone": {**grads["backbone"], "patch_embed_3d": jax.tree.map(
        lambda g: 1e6 * g, grads["backbone"]["patch_embed_3d"])}}
    reference = tx.update(grads, tx.init(params), params)[0]["backbone"]
    for variant in (heads_scaled, idle_scaled):  # idle leaves do not count in the backbone's norm either
        jax.tree.map(np.testing.assert_array_equal, tx.update(variant, tx.init(params), params)[0]["backbone"],
                     reference)


def test_last_layer_frozen_then_trained_and_idle_leaves_untouched():
    params = _fake_params(2)
    tx = optim.build_optimizer(params, _optim_cfg(freeze_last_layer_steps=2), lr_table=np.full(8, 1e-2),
                               wd_table=np.full(8, 0.04), depth=2)
    state = tx.init(params)
    current = params
    for step in range(5):
        updates, state = tx.update(_grads(params, seed=step), state, current)
        current = optax.apply_updates(current, updates)
        for head in ("dino_head", "ibot_head"):
            moved = not np.array_equal(current[head]["last_layer"]["kernel"], params[head]["last_layer"]["kernel"])
            assert moved == (step >= 2), (head, step)
            assert not np.array_equal(current[head]["mlp"]["layers"][0]["kernel"],
                                      params[head]["mlp"]["layers"][0]["kernel"])
    # Idle branch: nonzero gradients and weight decay 0.04, yet bit-identical after 5 steps.
    jax.tree.map(np.testing.assert_array_equal, current["backbone"]["patch_embed_3d"],
                 params["backbone"]["patch_embed_3d"])
    assert not np.array_equal(current["backbone"]["patch_embed_2d"]["kernel"],
                              params["backbone"]["patch_embed_2d"]["kernel"])
    # ... and its Adam moments never left zero: torch gives it no gradient at all.
    adam = state[2]
    for moments in (adam.mu, adam.nu):
        jax.tree.map(lambda m: np.testing.assert_array_equal(m, 0), moments["backbone"]["patch_embed_3d"])


def test_jit_donation_schedule_step_and_checkpoint(tmp_path):
    params = _fake_params(2)
    # LR 0 at step 0 means no update at all (the decay scales with the LR too); steps 1+ move.
    lr_table = np.array([0.0, 1e-2, 1e-2, 1e-2])
    tx = optim.build_optimizer(params, _optim_cfg(), lr_table=lr_table, wd_table=np.full(4, 0.04), depth=2)

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    donating = jax.jit(step, donate_argnums=(0, 1))
    grads = _grads(params)
    copy = lambda tree: jax.tree.map(jnp.array, tree)  # noqa: E731  (donation consumes the inputs)
    p1, s1 = donating(copy(params), tx.init(params), grads)
    jax.tree.map(np.testing.assert_array_equal, p1, params)
    assert int(s1[-1].step) == 1
    p2, s2 = donating(p1, s1, grads)
    eager_params, eager_state = _run(tx, params, [grads, grads])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), p2, eager_params)
    assert int(s2[-1].step) == int(eager_state[-1].step) == 2
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(s2))
    # Every params-shaped part of the state maps onto the params' shardings, as the trainer does it.
    labels = optax.tree_utils.tree_map_params(tx, lambda _, label: label, s2, jax.tree.map(lambda _: "param", params),
                                              transform_non_params=lambda _: "replicated")
    assert jax.tree.structure(labels) == jax.tree.structure(s2)
    assert sorted(set(jax.tree.leaves(labels))) == ["param", "replicated"]

    # The state is a checkpointable pytree: restored, it resumes the schedule where it stopped.
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "opt", s2)
        checkpointer.wait_until_finished()
        restored = checkpointer.restore(tmp_path / "opt", jax.eval_shape(lambda: s2))
    assert int(restored[-1].step) == 2
    resumed = step(p2, restored, grads)
    jax.tree.map(np.testing.assert_array_equal, resumed[0], step(p2, s2, grads)[0])
