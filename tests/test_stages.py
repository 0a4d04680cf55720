"""Stage hand-offs end to end on real CT: stage 1 → stage 2 (one-time 2D→3D inflation) and stage 1 → 1.1 (Gram).

Tiny configs at patch 16 only; each run takes seconds. The stage-1 and stage-2 runs are built once per pytest run
(conftest: `stage1_tiny_run`, `stage2_tiny_run`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from run_utils import ONE_VARIANT, assert_trees_close, checkpoint_steps, config_with, metrics, saved_state

from configs import stage1_hires, stage2
from flexict_jax import checkpointing, handoff, sharding, train_step, trainer
from flexict_jax.errors import ConfigError
from flexict_jax.models.inflate import inflate_patch_embed
from flexict_jax.tasks import dino

pytestmark = pytest.mark.slow  # end to end: trains real runs (the fast loop is `pytest -m "not slow"`)


def stage2_config(volumes, stage1_dir, **overrides):
    """The config of `stage2_tiny_run` (conftest)."""
    return config_with(stage2.get_config, "tiny", volumes,
                       **{"init.from_workdir": str(stage1_dir), **ONE_VARIANT, **overrides})


def test_stage2_starts_from_inflated_stage1_teacher(stage2_tiny_run, stage1_tiny_run):
    start = saved_state(stage2_tiny_run, 0)
    stage1_teacher = saved_state(stage1_tiny_run, 6)["teacher"]
    expected = inflate_patch_embed(stage1_teacher["backbone"])
    np.testing.assert_array_equal(start["params"]["backbone"]["patch_embed_3d"]["kernel"],
                                  expected["patch_embed_3d"]["kernel"])
    assert_trees_close(start["params"]["backbone"]["blocks"], stage1_teacher["backbone"]["blocks"], atol=0)
    assert_trees_close(start["teacher"], start["params"], atol=0)  # teacher = student at the hand-off
    # Heads are re-initialised (docs/recipe.md §7): they differ from the stage-1 teacher's.
    assert not np.allclose(start["params"]["dino_head"]["last_layer"]["kernel"],
                           stage1_teacher["dino_head"]["last_layer"]["kernel"])
    meta = checkpointing.Checkpointer(stage2_tiny_run / "checkpoints", every_steps=1, keep_last=9).read_meta(0)
    assert meta["init"]["mode"] == "inflate_2d_to_3d" and meta["init"]["step"] == 6
    assert [r["step"] for r in metrics(stage2_tiny_run)] == [1, 2, 3, 4, 5, 6]


def test_stage2_keep_heads_carries_the_stage1_heads(stage1_tiny_run, real_ct_volumes):
    # init.keep_heads (an experiment option, docs/evaluation.md) keeps the stage-1 heads through the inflation, so
    # the objective continues where stage 1 left it; the backbone is inflated as without the option. Hand-off only.
    config = stage2_config(real_ct_volumes, stage1_tiny_run, **{"init.keep_heads": True})
    mesh = sharding.make_mesh(config.mesh)
    with sharding.activate(mesh, config.sharding_rules):
        state, record = handoff.handoff_state(config, train_step.build_program(config, mesh))
    start, stage1_teacher = jax.device_get(state), saved_state(stage1_tiny_run, 6)["teacher"]
    for head in ("dino_head", "ibot_head"):
        assert_trees_close(start["params"][head], stage1_teacher[head], atol=0)
        assert_trees_close(start["teacher"][head], stage1_teacher[head], atol=0)
    np.testing.assert_array_equal(start["params"]["backbone"]["patch_embed_3d"]["kernel"],
                                  inflate_patch_embed(stage1_teacher["backbone"])["patch_embed_3d"]["kernel"])
    assert record["fresh"] == [] and record["mode"] == "inflate_2d_to_3d"
    # Modes that keep or take their heads by themselves refuse the key.
    config.init.mode = "continue"
    with pytest.raises(ConfigError, match="config.init.keep_heads"):
        handoff.validate(config)


def test_stage2_resume_never_reinflates(stage2_tiny_run, real_ct_volumes, stage1_tiny_run, tmp_path):
    assert trainer.train(stage2_config(real_ct_volumes, stage1_tiny_run, total_steps=3), str(tmp_path)) == 0
    before = saved_state(tmp_path, 3)["params"]["backbone"]["patch_embed_3d"]["kernel"]
    # Resume; even a changed init source must not matter once the run has its own checkpoint.
    assert trainer.train(stage2_config(real_ct_volumes, stage1_tiny_run), str(tmp_path)) == 0
    resumed, full = metrics(tmp_path), metrics(stage2_tiny_run)
    assert [r["patch_size"] for r in resumed] == [r["patch_size"] for r in full]  # same variant sequence
    np.testing.assert_allclose([r["loss"] for r in resumed], [r["loss"] for r in full], rtol=1e-5)
    assert_trees_close(saved_state(tmp_path, 6)["params"], saved_state(stage2_tiny_run, 6)["params"], atol=1e-6)
    inflated_at_start = saved_state(tmp_path, 0)["params"]["backbone"]["patch_embed_3d"]["kernel"]
    assert not np.array_equal(before, inflated_at_start)  # trained between 0 and 3 ...
    assert checkpoint_steps(tmp_path)[0] == 0  # ... and the hand-off checkpoint was written once, at step 0


def test_stage1_hires_runs_with_a_gram_teacher(stage1_tiny_run, real_ct_slices, tmp_path):
    config = config_with(stage1_hires.get_config, "tiny", real_ct_slices,
                         **{"init.from_workdir": str(stage1_tiny_run), "gram.from_workdir": str(stage1_tiny_run), **ONE_VARIANT})
    assert trainer.train(config, str(tmp_path)) == 0
    records = metrics(tmp_path)
    assert len(records) == 6 and all(np.isfinite(r["gram"]) and r["gram"] >= 0 for r in records)
    start = saved_state(tmp_path, 0)
    assert_trees_close(start["gram_teacher"]["backbone"], saved_state(stage1_tiny_run, 6)["teacher"]["backbone"], atol=0)
    # The Gram teacher is frozen: still identical after training.
    assert_trees_close(saved_state(tmp_path, 6)["gram_teacher"], start["gram_teacher"], atol=0)


def test_gram_loss_is_zero_for_the_same_network_on_the_same_input():
    config = stage1_hires.get_config("tiny")
    config.model.drop_path_rate = 0.0
    config.model.rope_rescale = None
    model = dino.build_model(config, 0)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: dino.build_model(config, 0)))
    params = nnx.to_pure_dict(nnx.state(model))
    crops = jax.random.normal(jax.random.key(0), (4, 2, 32, 32, 1))
    batch = {"global_crops": crops, "gram_crops": crops, "local_crops": jax.random.normal(
        jax.random.key(1), (4, 2, 16, 16, 1)), "masks": jnp.zeros((4, 2, 16), bool)}
    _, terms = dino.loss_fn(params, params, batch, jax.random.key(2), graphdef=graphdef, abstract_state=abstract,
                            config=config, patch_size=8, teacher_temperature=0.07,
                            gram_teacher={"backbone": params["backbone"]})
    assert float(terms["gram"]) < 1e-10
