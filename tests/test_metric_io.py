"""Metric writers: metrics.jsonl and TensorBoard events without TensorFlow, one row per step after a resume,
Weights & Biases offline."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import ml_collections as mlc
import pytest
from run_utils import REPO

from flexict_jax import metric_io


def scalar_events(logdir, tag) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    accumulator = EventAccumulator(str(logdir))
    accumulator.Reload()
    return [(e.step, e.value) for e in accumulator.Scalars(tag)]


def run_config(**wandb) -> mlc.ConfigDict:
    return mlc.ConfigDict(dict(stage="stage1", wandb=dict(dict(project="", entity="", mode="offline"), **wandb)))


def test_resume_supersedes_rows_past_the_restored_step(tmp_path):
    writer = metric_io.MetricWriter(tmp_path, config=run_config())
    for step in range(1, 6):  # the first attempt logged 5 steps, then died after its step-3 checkpoint
        writer.write(step, {"loss": float(step), "patch_size": 16})
    writer.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "lo')  # a row cut short by the kill
    writer = metric_io.MetricWriter(tmp_path, start_step=3, config=run_config())
    for step in range(4, 7):
        writer.write(step, {"loss": 10.0 + step})
    writer.close()

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1), (2, 2), (3, 3), (4, 14), (5, 15), (6, 16)]
    assert scalar_events(tmp_path / "tensorboard", "loss") == [(1, 1), (2, 2), (3, 3), (4, 14), (5, 15), (6, 16)]


def test_resume_in_the_same_second_when_the_file_counter_gains_a_digit(tmp_path):
    """Event files are read in name order; the writer's per-process counter ends the name, so within one second
    a name ending in .10 sorts before one ending in .9. Seen on CI: the resumed file was read first and the old
    rows won."""
    from tensorboard.summary.writer import event_file_writer
    while True:  # advance the counter until the next two writers get 9 and 10 (or 99 and 100, ...)
        last = event_file_writer._global_uid.get()
        if len(str(last + 2)) > len(str(last + 1)):
            break
    test_resume_supersedes_rows_past_the_restored_step(tmp_path)


def test_read_metrics_merges_rows_of_one_step(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 2, "loss": 1.0}\n{"step": 1, "loss": 2.0}\n'
                                            '{"step": 2, "eval/recall@1": 0.5, "loss": 0.5}\n')
    assert metric_io.read_metrics(tmp_path) == [{"step": 1, "loss": 2.0},
                                                {"step": 2, "loss": 0.5, "eval/recall@1": 0.5}]


def test_tensorboard_events_without_tensorflow(tmp_path):
    """A fresh interpreter with TensorFlow made unimportable writes events the tensorboard reader reads."""
    code = f"""
import sys
sys.modules['tensorflow'] = None  # as if not installed: import fails, find_spec gives None
import ml_collections as mlc
from flexict_jax import metric_io
writer = metric_io.MetricWriter({str(tmp_path)!r}, config=mlc.ConfigDict(dict(stage='stage1')))
writer.write(1, {{'loss': 0.5, 'lr': 1e-3}})
writer.write(2, {{'loss': float('nan'), 'lr': 2e-3}})
writer.close()
assert not [m for m, module in sys.modules.items() if module and m.startswith(('tensorflow', 'torch'))]
"""
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)
    assert scalar_events(tmp_path / "tensorboard", "lr") == [(1, pytest.approx(1e-3)), (2, pytest.approx(2e-3))]
    assert scalar_events(tmp_path / "tensorboard", "loss") == [(1, 0.5)]  # NaN stays in metrics.jsonl only
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    accumulator = EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    (config,) = accumulator.Tensors("config")  # the run's config, for the text dashboard
    assert b"stage1" in config.tensor_proto.string_val[0]
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[1])["loss"] == "nan"


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (optional)")
def test_wandb_offline_run_written_in_workdir(tmp_path):
    """Offline mode needs no network; the run file is complete once the writing process has exited."""
    code = f"""
import ml_collections as mlc
from flexict_jax import metric_io
config = mlc.ConfigDict(dict(wandb=dict(project='flexict-test', entity='', mode='offline')))
writer = metric_io.MetricWriter({str(tmp_path)!r}, config=config)
writer.write(1, {{'dino_local_loss': 0.5}})
writer.close()
"""
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120,
                   env={**os.environ, "WANDB_SILENT": "true"})
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and b"dino_local_loss" in runs[0].read_bytes()
