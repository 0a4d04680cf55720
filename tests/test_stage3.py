"""Stage 3 end to end (issue #4): stage 1 -> stage 2 -> stage 3 tiny runs, the stage-3 data pipeline, the
align task's hooks (hand-off, Qwen3 import, logit-scale clamp, in-training evaluation) and retrieval learning.

Data is built with the real tools: stages 1-2 train on the real CT of ../shared/data (conftest fixtures), stage 3
on synthetic phantoms -> `data_prep.ingest` (train and val splits) -> `data_prep.volume_stats` ->
`data_prep.reports` (pseudo-reports from the label maps) -> `data_prep.tokenizer`.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import stage3_eval_worker
from flax import nnx
from run_utils import (
    PHANTOM_SHAPE,
    REPO,
    assert_trees_close,
    checkpoint_steps,
    cli_overrides,
    config_with,
    ingest_split,
    metrics,
    run_cli,
    saved_state,
    xla_env,
)

from configs import stage3
from data_prep import synthetic, volume_stats
from flexict_jax import checkpointing, evals, sharding, train_step, trainer
from flexict_jax.data import datasets, pipeline3d, pipeline_align, report_records, report_rules
from flexict_jax.models.vlm import LOGIT_SCALE_INIT, LOGIT_SCALE_MAX
from flexict_jax.tasks import align
from flexict_jax.variants import Variant

pytestmark = pytest.mark.slow  # end to end: trains real runs (the fast loop is `pytest -m "not slow"`)


def stage3_config(reports_dir, stage2_dir=None, arg="tiny", **overrides):
    init = {"init.from_workdir": str(stage2_dir)} if stage2_dir else {}
    return config_with(stage3.get_config, arg, reports_dir, **{**init, **overrides})


@pytest.fixture(scope="module")
def stage3_run(tmp_path_factory, phantom_reports, stage2_tiny_run) -> pathlib.Path:
    workdir = tmp_path_factory.mktemp("stage3")
    config = stage3_config(phantom_reports, stage2_tiny_run, **{"ckpt.every_steps": 1, "ckpt.keep_last": 10})
    assert trainer.train(config, str(workdir), evaluator=evals.build_evaluator) == 0
    return workdir


# --- stage 1 -> 2 -> 3 end to end -----------------------------------------------------------------------------

def test_stage3_continues_the_stage2_teacher_and_adds_the_text_side(stage3_run, stage2_tiny_run):
    start = saved_state(stage3_run, 0)
    stage2_teacher = saved_state(stage2_tiny_run, checkpointing.latest_step(stage2_tiny_run))["teacher"]
    for part in align.IMAGE_PARTS:  # "continue": backbone and both heads (docs/recipe.md §8)
        assert_trees_close(start["params"][part], stage2_teacher[part], atol=0)
    assert set(start["teacher"]) == set(align.IMAGE_PARTS)  # the EMA teacher is the image side only
    assert_trees_close(start["teacher"], {p: start["params"][p] for p in align.IMAGE_PARTS}, atol=0)
    assert {"text_tower", "vision_projection", "logit_scale"} <= set(start["params"])
    np.testing.assert_allclose(start["params"]["logit_scale"], LOGIT_SCALE_INIT, rtol=1e-6)
    meta = json.loads((stage3_run / "checkpoints" / "0" / "meta" / "metadata").read_text())
    assert meta["stage"] == "stage3" and meta["init"]["mode"] == "continue"

    end = saved_state(stage3_run, 6)
    for part in ("text_tower", "vision_projection", "backbone"):  # everything but the teacher trains
        moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), end["params"][part], start["params"][part])
        assert any(jax.tree.leaves(moved)), part
    assert_trees_close(end["params"]["backbone"]["patch_embed_2d"], start["params"]["backbone"]["patch_embed_2d"],
                       atol=0)  # the idle 2-D embedding neither moves nor decays


def test_stage3_metrics_and_loss_assembly(stage3_run):
    records = metrics(stage3_run)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    for r in train:
        terms = [r[k] for k in ("dino_local", "ibot", "clip", "osl")]
        assert all(np.isfinite(terms)) and "koleo" not in r and "dino_global" not in r
        # Recipe §8: L = 0.5 DINO-local + 1.0 iBOT + 1.0 CLIP + 0.5 OSL.
        assert r["loss"] == pytest.approx(0.5 * r["dino_local"] + r["ibot"] + r["clip"] + 0.5 * r["osl"],
                                          rel=1e-5)
    evals = [r for r in records if "eval/recall@1" in r]
    assert [r["step"] for r in evals] == [3, 6]  # every eval.every_steps and at the end
    for r in evals:
        assert r["eval/examples"] == 4  # the val split
        assert 0 <= r["eval/recall@1"] <= r["eval/recall@5"] <= r["eval/recall@10"] == 1.0
        # Only "lesion" has both classes in the val split; single-class findings have no AUC.
        assert 0 <= r["eval/zero_shot_auc/lesion"] <= 1 and r["eval/zero_shot_auc"] == r["eval/zero_shot_auc/lesion"]
        assert "eval/zero_shot_auc/liver" not in r


@pytest.mark.slow
def test_evaluator_gives_the_same_metrics_on_two_processes(phantom_reports, stage3_run, tmp_path):
    """The in-training evaluator on 2 processes x 4 CPU devices (each host embeds its rows of every evaluation
    batch; the embeddings are gathered in example order) gives the metrics of 1 process x 8 devices, which are
    those the trainer logged at the same step."""
    one = stage3_eval_worker.evaluate(phantom_reports, stage3_run, 6)
    logged = next(r for r in metrics(stage3_run) if r["step"] == 6 and "eval/recall@1" in r)
    assert one["val"] == pytest.approx({k: v for k, v in logged.items() if k.startswith("eval/")
                                        and k != "eval/seconds"}, rel=1e-5)
    assert (one["train"]["eval/examples"], one["val"]["eval/examples"]) == (6, 4)
    assert "eval/zero_shot_auc/lesion" in one["val"]

    out = tmp_path / "two_processes.json"
    python_path = os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=python_path)
    proc = subprocess.run(["bash", "launch/local_multiprocess.sh", "2", "--cpu-devices=4",
                           "--module=stage3_eval_worker", "--", str(phantom_reports), str(stage3_run), "6", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    two = json.loads(out.read_text())
    for split in stage3_eval_worker.SPLITS:
        assert two[split] == pytest.approx(one[split], rel=1e-5, nan_ok=True), split


def test_logit_scale_is_clamped_after_every_step(stage3_run):
    for step in checkpoint_steps(stage3_run):
        assert 0.0 <= float(saved_state(stage3_run, step)["params"]["logit_scale"]) <= LOGIT_SCALE_MAX
    assert all(0.0 <= r["logit_scale"] <= LOGIT_SCALE_MAX for r in metrics(stage3_run) if "logit_scale" in r)


def test_siglip_train_steps_learn_the_scale_and_bias_and_clamp_the_scale(phantom_reports):
    """SigLIP end to end through the trainer's compiled step (`configs/stage3.py:tiny,contrastive=siglip`): finite
    losses assembled as docs/recipe.md §8 with SigLIP in CLIP's place, the logit scale and bias (SigLIP's init ln 10 and
    -10, no clipping, no decay) both move, and a logit scale outside [0, ln 100] comes back clamped."""
    config = stage3_config(phantom_reports, arg="tiny,contrastive=siglip")
    mesh = sharding.make_mesh(config.mesh)
    with sharding.activate(mesh, config.sharding_rules):
        program = train_step.build_program(config, mesh)
        init = jax.jit(program.init_state, out_shardings=program.state_shardings)
        variant = datasets.variant_for_step(config, 0)
        local = align.step_batch(next(iter(datasets.build_dataset(config, process_index=0, process_count=1))),
                                 variant)
        step, batch = program.train_step(config, variant, local), sharding.global_batch(mesh, local)
        state = init()
        scalars = ("logit_scale", "logit_bias")
        start = {k: float(state["params"][k]) for k in scalars}
        assert start == pytest.approx({"logit_scale": math.log(10.0), "logit_bias": -10.0})
        for _ in range(2):
            state, out = step(state, batch)
            out = jax.device_get(out)
            assert out["finite"] and "clip" not in out and np.isfinite(out["siglip"])
            assert out["loss"] == pytest.approx(0.5 * out["dino_local"] + out["ibot"] + out["siglip"]
                                                + 0.5 * out["osl"], rel=1e-5)
        for k in scalars:
            assert float(state["params"][k]) != pytest.approx(start[k], abs=1e-4), k

        for outside, clamped in ((5.0, LOGIT_SCALE_MAX), (-1.0, 0.0)):
            state = init()  # the previous state was donated to the step
            params = dict(state["params"], logit_scale=jax.device_put(
                jnp.float32(outside), program.state_shardings["params"]["logit_scale"]))
            new, _ = step(dict(state, params=params), batch)
            np.testing.assert_allclose(float(new["params"]["logit_scale"]), clamped, rtol=1e-6)


# --- the stage-3 data pipeline --------------------------------------------------------------------------------

def _batches(config, n, **kwargs):
    it = iter(pipeline_align.build_reports3d_dataset(config.data, config.text, seed=config.seed,
                                                 batch_size=kwargs.pop("batch_size", 4),
                                                 patch_sizes=config.patch_sizes, **kwargs))
    return [next(it) for _ in range(n)]


def test_align_batches_shapes_determinism_and_host_split(phantom_reports):
    config = stage3_config(phantom_reports)
    batch = _batches(config, 1)[0]
    g, l, text = config.data.global_crop_size, config.data.local_crop_size, config.text
    expected = {
        "global_crops": ((4, 1, g, g, g, 1), np.float32), "local_crops": ((4, 2, l, l, l, 1), np.float32),
        "masks_p8": ((4, 1, (g // 8) ** 3), np.bool_), "masks_p16": ((4, 1, (g // 16) ** 3), np.bool_),
        "caption_tokens": ((4, text.caption_len), np.int32), "caption_mask": ((4, text.caption_len), np.bool_),
        "osl_pos_tokens": ((4, text.osl_pairs, text.osl_len), np.int32),
        "osl_neg_mask": ((4, text.osl_pairs, text.osl_len), np.bool_),
        "osl_labels": ((4, text.osl_pairs), np.int32)}
    for key, (shape, dtype) in expected.items():
        assert batch[key].shape == shape and batch[key].dtype == dtype, key
    assert batch["caption_mask"][:, -1].all()  # left padding: the pooled last token is real
    assert np.isin(batch["osl_labels"], [-1, 0, 1]).all() and (batch["osl_labels"] == 1).any()

    # Only training records (the 6 phantoms of split "train") are drawn.
    index = report_records.read_report_index(phantom_reports)
    train_ids = {v["volume_id"] for v in index["volumes"] if v["split"] == "train"}
    manifest = [json.loads(line)["id"] for line in
                (pathlib.Path(index["dataset"]) / "manifest.jsonl").read_text().splitlines()]
    first = _batches(config, 3)
    assert {manifest[row] for b in first for row in b["volume_row"]} <= train_ids

    # Resumable: a restored iterator state continues the same stream (the trainer checkpoints it).
    it = iter(pipeline_align.build_reports3d_dataset(config.data, config.text, seed=config.seed, batch_size=4,
                                                 patch_sizes=config.patch_sizes))
    next(it)
    state = it.get_state()
    resumed = iter(pipeline_align.build_reports3d_dataset(config.data, config.text, seed=config.seed, batch_size=4,
                                                      patch_sizes=config.patch_sizes))
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["caption_tokens"], first[1]["caption_tokens"])

    again = _batches(config, 3)
    halves = [_batches(config, 3, batch_size=2, process_index=p, process_count=2) for p in (0, 1)]
    for a, b, h0, h1 in zip(first, again, *halves):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)  # same seed, same stream
            np.testing.assert_array_equal(a[key], np.concatenate([h0[key], h1[key]]), err_msg=key)  # host split


def test_image_views_are_the_stage3_views_and_text_is_a_caption_of_the_record(phantom_reports):
    config = stage3_config(phantom_reports)
    batch = _batches(config, 1)[0]
    source = pipeline_align.ReportVolumes(phantom_reports, "train", (-1000.0, 1000.0))
    views = pipeline3d.volume_views_transform(config.data, seed=config.seed, patch_sizes=config.patch_sizes)
    tokenizer = pipeline_align.load_text_tokenizer(config.text, phantom_reports)
    by_row = {row: i for i, row in enumerate(source.volume_rows)}
    for k in range(4):
        item = source[by_row[int(batch["volume_row"][k])]]
        image = views.map_with_index(int(batch["index"][k]), item["volume"])
        for key in ("global_crops", "local_crops", "masks_p8"):  # the text draws leave the views untouched
            np.testing.assert_array_equal(batch[key][k], image[key], err_msg=key)
        # The caption is one finding of this record, or its Findings (truncated), which open with one section.
        record = item["record"]
        candidates = [report_rules.model_text(text) for _, text in record["findings_sections"]] + [
            report_rules.model_text(s) for section in record["sections"].values() for kind in section.values()
            for s in kind]
        caption = tokenizer.decode(batch["caption_tokens"][k])
        assert any(c.startswith(caption) or caption.startswith(c) for c in candidates), caption


def test_pipeline_errors_name_the_problem(phantom_reports, tmp_path):
    config = stage3_config(phantom_reports)
    config.data.split = "test"
    with pytest.raises(ValueError, match=r"no report record of split 'test' \(it has splits \['train', 'val'\]"):
        _batches(config, 1)
    config.data.split = "train"
    other = tmp_path / "other"
    synthetic.write_phantoms(tmp_path / "raw", count=1, seed=5, shape=PHANTOM_SHAPE, progress=False)
    ingest_split(tmp_path / "raw", other, "train")
    assert run_cli(volume_stats.main, ["--dataset", str(other)]) == 0
    config.data.dataset_dir = str(other)
    with pytest.raises(ValueError, match="describe volumes that are not in"):
        _batches(config, 1)


def test_eval_dataset_pads_to_whole_batches_in_order(phantom_reports):
    config = stage3_config(phantom_reports)
    ds, records = pipeline_align.build_eval_dataset(config.data, config.text, split="val", batch_size=3,
                                                    patch_size=8)
    batches = list(ds)
    assert len(records) == 4 and len(batches) == 2  # 4 examples padded to 2 batches of 3
    tokenizer = pipeline_align.load_text_tokenizer(config.text, phantom_reports)
    tokens = np.concatenate([b["caption_tokens"] for b in batches])
    expected, _ = tokenizer.encode_batch([pipeline_align.report_text(r) for r in records], config.text.caption_len)
    np.testing.assert_array_equal(tokens[:4], expected)
    np.testing.assert_array_equal(tokens[4:], np.repeat(expected[-1:], 2, axis=0))  # padding repeats the last
    assert batches[0]["global_crops"].shape == (3, 1, 32, 32, 32, 1)
    assert {r["finding_labels"]["lesion"] for r in records} == {0, 1}


# --- config and task --------------------------------------------------------------------------------------------

def test_config_defaults_follow_the_recipe():
    c = stage3.get_config()
    assert (c.task, c.data.kind, c.init.mode, c.global_batch_size, c.total_steps) == (
        "align", "reports3d", "continue", 280, 50_000)
    assert (c.data.n_global_crops, c.data.global_crop_mode, tuple(c.data.local_crop_extent), c.data.intensity_augment,
            c.data.flip_prob) == (1, "center", (20, 40), False, 0.0)
    assert (c.loss.dino_weight, c.loss.ibot_weight, c.loss.koleo_weight, c.loss.contrastive_weight,
            c.loss.osl_weight, c.loss.contrastive, c.loss.clip_from_masked) == (0.5, 1.0, 0.0, 1.0, 0.5, "clip", True)
    scale = 4 * math.sqrt(280 / 1024)  # docs/recipe.md §8: factor 2.09 at 8 GPUs
    lr = c.schedules.lr
    assert (lr.start, lr.peak, lr.end, lr.warmup_steps) == pytest.approx((1e-4 * scale, 1e-4 * scale, 1e-6 * scale, 0))
    assert (c.schedules.momentum.peak, c.schedules.teacher_temperature.peak, c.schedules.weight_decay.peak) == (
        0.999, 0.07, 0.04)
    assert (c.optim.clip_grad, list(c.optim.unclipped), list(c.optim.no_weight_decay),
            c.optim.freeze_last_layer_steps) == (3.0, ["vision_projection", "logit_scale"], ["logit_scale"], 0)
    assert (c.text.tower, c.text.caption_len, c.text.osl_len, c.text.osl_pairs) == ("qwen3", 768, 256, 8)
    siglip = stage3.get_config("tiny,contrastive=siglip")
    assert "logit_bias" in siglip.optim.unclipped and "logit_bias" in siglip.optim.no_weight_decay


def test_config_errors_name_the_key(phantom_reports):
    config = stage3_config(phantom_reports, **{"text.tower": "qwen3"})
    with pytest.raises(ValueError, match="needs --config.text.hf_folder"):
        align.validate(config)
    config = stage3_config(phantom_reports, **{"loss.contrastive": "siglip"})  # without the optimizer groups
    with pytest.raises(ValueError, match="contrastive=siglip"):
        align.validate(config)
    config = stage3_config(phantom_reports, **{"eval.patch_size": 4})
    with pytest.raises(ValueError, match="eval.patch_size"):
        align.validate(config)


def test_parameter_groups_of_the_student(phantom_reports):
    """Top-level parts are the clip groups: the text tower is clipped on its own, projection and logit scale
    not at all; the logit scale has no weight decay; the text tower decays all but its norms (docs/recipe.md §8)."""
    from flexict_jax import optim
    config = stage3_config(phantom_reports, arg="tiny,contrastive=siglip")
    params = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: align.build_model(config, 0))))
    assert set(params) == {*align.IMAGE_PARTS, "text_tower", "vision_projection", "logit_scale", "logit_bias"}
    np.testing.assert_allclose(align.build_model(config, 0).logit_scale[...], math.log(10.0), rtol=1e-6)  # SigLIP
    groups = optim.param_groups(params, depth=config.model.depth, layer_decay=0.9, patch_embed_lr_mult=0.2,
                                idle_patterns=config.optim.idle_patterns,
                                no_decay_patterns=config.optim.no_weight_decay)
    assert groups["logit_scale"].wd_mult == groups["logit_bias"].wd_mult == 0.0
    assert groups["vision_projection"]["kernel"].wd_mult == 1.0
    tower = groups["text_tower"]
    assert tower["embed_tokens"]["embedding"].wd_mult == 1.0 and tower["norm"]["scale"].wd_mult == 0.0
    assert tower["layers"][0]["self_attn"]["q_norm"]["scale"].wd_mult == 0.0
    assert tower["layers"][0]["mlp"]["gate_proj"]["kernel"].clip_group == "text_tower"
    assert tower["layers"][0]["mlp"]["gate_proj"]["kernel"].lr_mult == 1.0


def test_after_update_clamps_the_logit_scale():
    params = {"logit_scale": jnp.float32(7.0), "backbone": {"w": jnp.ones(2)}}
    assert float(align.after_update(params)["logit_scale"]) == pytest.approx(LOGIT_SCALE_MAX)
    assert float(align.after_update({**params, "logit_scale": jnp.float32(-3.0)})["logit_scale"]) == 0.0


def test_step_batch_picks_the_masks_of_the_step(phantom_reports):
    local = _batches(stage3_config(phantom_reports), 1)[0]
    batch = align.step_batch(local, Variant(16))
    assert batch["masks"] is local["masks_p16"]
    assert set(batch) == {"global_crops", "local_crops", "masks", *pipeline_align.TEXT_KEYS}


def test_clip_image_embedding_from_the_masked_or_the_clean_crop(phantom_reports):
    """With `loss.clip_from_masked` (upstream) the CLIP term sees the iBOT-masked crop; without it the clean one.
    Both agree when nothing is masked (deterministic student: no drop path, no RoPE rescale)."""
    terms = {}
    for from_masked in (True, False):
        config = stage3_config(phantom_reports, **{"loss.clip_from_masked": from_masked, "model.drop_path_rate": 0.0,
                                                   "model.rope_rescale": None})
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: align.build_model(config, 0)))
        params = nnx.to_pure_dict(nnx.state(align.build_model(config, 0)))
        batch = align.step_batch(_batches(config, 1)[0], Variant(16))
        batch["masks"][:] = False
        batch["masks"][0, 0, :4] = True  # one masked sample

        @jax.jit
        def loss(params, masks):
            return align.loss_fn(params, align.teacher_params(params), {**batch, "masks": masks}, jax.random.key(0),
                                 graphdef=graphdef, abstract_state=abstract, config=config, patch_size=16,
                                 teacher_temperature=0.07)[1]
        terms[from_masked] = (loss(params, batch["masks"]), loss(params, np.zeros_like(batch["masks"])))
    masked, clean = terms[True], terms[False]
    assert float(masked[1]["clip"]) == pytest.approx(float(clean[1]["clip"]), rel=1e-6)
    assert float(masked[0]["clip"]) != pytest.approx(float(clean[0]["clip"]), rel=1e-6)
    assert float(masked[0]["ibot"]) == pytest.approx(float(clean[0]["ibot"]), rel=1e-6)  # SSL terms unchanged


# --- Qwen3 text tower -------------------------------------------------------------------------------------------

def test_qwen3_tower_is_imported_at_the_hand_off(qwen3_folder, phantom_reports, stage2_tiny_run, tmp_path):
    folder, weights = qwen3_folder
    config = stage3_config(phantom_reports, stage2_tiny_run, **{
        "text.tower": "qwen3", "text.hf_folder": str(folder), "total_steps": 1, "eval.every_steps": 0})
    model = align.build_model(config, 0)
    assert model.text_tower.causal and model.text_tower.pooling == "last" and model.text_tower.width == 32
    assert trainer.train(config, str(tmp_path)) == 0
    start = saved_state(tmp_path, 0)["params"]["text_tower"]  # the trainer's `initial_params` hook
    assert_trees_close(checkpointing.conform(start, weights, what="saved"), weights, atol=0)
    assert np.isfinite(metrics(tmp_path)[0]["loss"])


# --- retrieval learns -----------------------------------------------------------------------------------------

def test_retrieval_on_the_training_split_rises_above_chance(phantom_reports, tmp_path):
    """A shorter stand-in for the demo run (docs/stage3.md has the demo's numbers): the tiny model from scratch,
    patch 16 only and one local crop (cheaper steps), 150 steps on the 6 training phantoms; chance Recall@1 is
    1/6. Run as users do, through the CLI, on one device (many steps of 8 fake CPU devices in one process can
    trip XLA:CPU's collective rendezvous timeout; see the report)."""
    overrides = {"total_steps": 150, "patch_sizes": "(16,)", "patch_size_probs": "(1.0,)", "data.n_local_crops": 1,
                 "eval.split": "train", "eval.every_steps": 50, "eval.patch_size": 16, "log_every": 50,
                 "ckpt.every_steps": 1000, "mesh": "(1,1,1)"}
    env = xla_env(1)
    proc = subprocess.run(
        [sys.executable, "-m", "flexict_jax.train", f"--config={REPO / 'configs/stage3.py'}:tiny",
         f"--workdir={tmp_path}", f"--config.data.dir={phantom_reports}"]
        + cli_overrides(overrides),
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recall = [r["eval/recall@1"] for r in metrics(tmp_path) if "eval/recall@1" in r]
    assert len(recall) == 3 and recall[-1] >= 0.5, recall
