"""Stage-1 self-distillation learns at small scale (issue 16): on slices of a few distinct patterns, the DINO term
falls clearly below its uniform value ln K and the EMA teacher's CLS features separate the patterns.

The step is the trainer's own jitted step (`train_step.build_program`), fed by the stage-1 per-example transform
(crops, flips, intensity augmentations, iBOT masks) on synthetic HU slices, so the test exercises the real
objective, not a stand-in. It asserts learning, not timing.
"""
from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from configs import common, stage1
from flexict_jax import sharding, tasks, train_step
from flexict_jax.data import pipeline2d, records
from flexict_jax.data.datasets import variant_for_step
from flexict_jax.data.intensity import normalize_hu
from flexict_jax.losses import sinkhorn
from flexict_jax.tasks import common as tasks_common
from flexict_jax.tasks import dino as dino_task

N_PATTERNS, PER_PATTERN, SIZE = 4, 8, 64
STEPS = 400


def _pattern_slice(family: int, rng: np.random.Generator) -> np.ndarray:
    """An int16 HU slice of one of four families (soft tissue on air): horizontal bars, a grid of bone-dense
    dots, one large lung-like disk, concentric rings; period, phase and size vary within a family."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    period, phase = rng.uniform(8, 14), rng.uniform(0, 2 * np.pi)
    if family == 0:
        tissue = np.sin(2 * np.pi * yy / period + phase) > 0
        hu = np.where(tissue, 60.0, -1000.0)
    elif family == 1:
        dots = (np.sin(2 * np.pi * yy / period + phase) > 0.6) & (np.sin(2 * np.pi * xx / period + phase) > 0.6)
        hu = np.where(dots, 900.0, 40.0)
    elif family == 2:
        cy, cx, r = rng.uniform(24, 40, 2).tolist() + [rng.uniform(16, 24)]
        hu = np.where((yy - cy) ** 2 + (xx - cx) ** 2 < r * r, -850.0, 30.0)
    else:
        radius = np.hypot(yy - SIZE / 2, xx - SIZE / 2)
        hu = np.where(np.sin(2 * np.pi * radius / period + phase) > 0, 300.0, -100.0)
    return (hu + rng.normal(0, 20, hu.shape)).astype(np.int16)


def _config():
    config = stage1.get_config("tiny")
    config.mesh = (1, 1, 1)
    config.total_steps = STEPS
    common.small_scale_learning(config)
    config.global_batch_size = 16
    config.patch_sizes, config.patch_size_probs = (8,), (1.0,)  # one compiled step
    config.data.update(dict(global_crop_size=32, local_crop_size=16, n_local_crops=2))
    config.loss.koleo_group_size = 16
    config.schedules.lr = common.schedule(0.0, 2e-3, 2e-3, warmup_steps=30)
    config.schedules.momentum = common.constant(0.99)
    return config


def _knn_accuracy(features: np.ndarray, labels: np.ndarray, k: int = 5) -> float:
    """Leave-one-out k-nearest-neighbour accuracy under cosine similarity (majority vote)."""
    x = features / np.linalg.norm(features, axis=1, keepdims=True)
    similarity = x @ x.T
    np.fill_diagonal(similarity, -np.inf)
    neighbours = np.argsort(-similarity, axis=1)[:, :k]
    votes = np.array([np.bincount(labels[n], minlength=labels.max() + 1).argmax() for n in neighbours])
    return float(np.mean(votes == labels))


@pytest.fixture(scope="module")
def trained():
    config = _config()
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(N_PATTERNS), PER_PATTERN)
    slices = [_pattern_slice(int(f), rng) for f in labels]
    encoded = [records.encode_array(s, {"volume_id": f"pattern_{i}", "z_index": 0}) for i, s in enumerate(slices)]
    transform = pipeline2d.stage1_transform(config.data, seed=config.seed, patch_sizes=config.patch_sizes)
    mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])  # one device: the fastest on CPU
    history = []
    with sharding.activate(mesh, config.sharding_rules):
        program = train_step.build_program(config, mesh)
        state = jax.jit(program.init_state, out_shardings=program.state_shardings)()
        variant = variant_for_step(config, 0)
        order = np.random.default_rng(1)
        step_fn = None
        for step in range(STEPS):
            examples = [transform.map_with_index(step * 1000 + int(i), encoded[i])
                        for i in order.choice(len(encoded), config.global_batch_size, replace=False)]
            local = tasks.get(config).step_batch(
                {k: np.stack([e[k] for e in examples]) for k in examples[0]}, variant)
            batch = sharding.global_batch(mesh, local)
            if step_fn is None:
                step_fn = program.train_step(config, variant, local)
            state, metrics = step_fn(state, batch)
            history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
        # The teacher's CLS of each whole slice, resized to the global crop size (no augmentation).
        images = np.stack([normalize_hu(s, config.data.hu_window) for s in slices])
        images = images.reshape(len(slices), config.data.global_crop_size, SIZE // config.data.global_crop_size,
                                config.data.global_crop_size, -1).mean(axis=(2, 4))[..., None]
        model = tasks_common.merge_model(program.graphdef, program.abstract_params, state["teacher"])
        features = np.asarray(model.backbone(images, patch_size=8, train=False)["cls"])
    return config, history, features, labels


def _mean(rows: list[dict], key: str) -> float:
    return float(np.mean([r[key] for r in rows]))


@pytest.mark.slow
def test_dino_falls_below_uniform(trained):
    config, history, _, _ = trained
    ln_k = math.log(config.heads.num_prototypes)
    first, last = history[:10], history[-20:]
    summary = {key: (_mean(first, key), _mean(last, key)) for key in
               ("dino_global", "dino_local", "ibot", "dino_target_entropy", "dino_teacher_spread")}
    assert all(np.isfinite(r["loss"]) for r in history)
    for key in ("dino_global", "dino_local"):
        assert summary[key][1] < ln_k - 0.15, (ln_k, summary)  # from ~ln K + 0.9 at the start
    # The diagnostics say why: the teacher's targets are no longer uniform, its logits differ across crops.
    assert summary["dino_target_entropy"][1] < 0.95 * ln_k, (ln_k, summary)
    assert summary["dino_teacher_spread"][1] > 0.5 * _mean(last, "teacher_temperature"), summary


@pytest.mark.slow
def test_teacher_features_separate_the_patterns(trained):
    _, _, features, labels = trained
    accuracy = _knn_accuracy(features, labels)
    assert accuracy >= 0.45, accuracy  # chance is 1 / N_PATTERNS = 0.25


def test_target_diagnostics_read_uniform_and_sharp_targets():
    """The logged diagnostics: identical teacher rows give spread 0 and uniform Sinkhorn-Knopp targets (entropy
    ln K); distinct rows give their std and sharper targets; padding rows (valid=False) take no part."""
    k = 16
    same = np.tile(np.linspace(-1.0, 1.0, k, dtype=np.float32), (8, 1))
    targets = sinkhorn.sinkhorn_knopp(same, 0.04)
    out = dino_task.target_diagnostics("dino", same, targets)
    assert float(out["dino_teacher_spread"]) == pytest.approx(0.0, abs=1e-6)
    assert float(out["dino_target_entropy"]) == pytest.approx(math.log(k), rel=1e-5)

    rows = np.eye(8, k, dtype=np.float32)  # each row prefers its own prototype
    padded = np.concatenate([rows, np.full((4, k), 50.0, np.float32)])
    valid = np.arange(12) < 8
    out = dino_task.target_diagnostics("ibot", padded, sinkhorn.sinkhorn_knopp(padded, 0.04, valid=valid), valid)
    np.testing.assert_allclose(float(out["ibot_teacher_spread"]), np.mean(np.std(rows, axis=0)), rtol=1e-5)
    assert float(out["ibot_target_entropy"]) < math.log(k) - 1.0
