"""End-to-end stage-1 training on real CT: ingest → slices → Grain → sharded ViT → losses → Orbax.

Runs the tiny config (seconds per run). Multi-device runs use the 8 fake CPU devices from conftest.py.
"""
from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
from run_utils import (
    ONE_VARIANT,
    REPO,
    assert_trees_close,
    checkpoint_steps,
    cli_overrides,
    config_with,
    metrics,
    saved_state,
    xla_env,
)

from configs import stage1
from flexict_jax import checkpointing, train_step, trainer

pytestmark = pytest.mark.slow  # end to end: trains real runs (the fast loop is `pytest -m "not slow"`)


@pytest.fixture(scope="module")
def ct_slices(real_ct_slices):
    return real_ct_slices


def tiny_config(data_dir, **overrides):
    return config_with(stage1.get_config, "tiny", data_dir, **overrides)


def saved_params(workdir, step) -> dict:
    return saved_state(workdir, step)["params"]


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory, ct_slices) -> pathlib.Path:
    workdir = tmp_path_factory.mktemp("six_steps")
    assert trainer.train(tiny_config(ct_slices), str(workdir)) == 0
    return workdir


def test_tiny_run_logs_and_checkpoints(six_steps):
    records = metrics(six_steps)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for r in records:
        for key in ("loss", "dino_local", "dino_global", "ibot", "koleo", "lr", "teacher_temperature",
                    "samples_per_s", "eta_min", "patch_size"):
            assert key in r, key
        assert np.isfinite(r["loss"])
    assert checkpoint_steps(six_steps) == [3, 6]
    assert json.loads((six_steps / "config.json").read_text())["stage"] == "stage1"


def test_resume_equals_uninterrupted(six_steps, ct_slices, tmp_path):
    assert trainer.train(tiny_config(ct_slices, total_steps=3), str(tmp_path)) == 0
    assert trainer.train(tiny_config(ct_slices), str(tmp_path)) == 0  # resumes at 3, runs to 6
    assert_trees_close(saved_params(tmp_path, 6), saved_params(six_steps, 6), atol=1e-6)
    resumed, uninterrupted = metrics(tmp_path), metrics(six_steps)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(resumed, uninterrupted):  # same data order, same patch-size draws
        assert a["patch_size"] == b["patch_size"]
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)


def test_one_device_mesh_equals_2x4_mesh(ct_slices, tmp_path):
    """The first step's loss does not depend on the mesh.

    KoLeo is compared loosely: it takes -log of nearest-neighbour distances between CLS embeddings, which at
    initialisation nearly coincide, so float32 summation-order differences between meshes (a sharded
    contraction adds partial sums in another order) are amplified by 1/distance. The other terms and the total
    without KoLeo must agree to 1e-5. LayerScale starts at 0.1 so the embeddings depend on the input at all.
    """
    overrides = {"total_steps": 1, "model.layerscale_init": 0.1, "loss.koleo_weight": 0.0}
    sharded = tmp_path / "mesh_2x4"
    assert trainer.train(tiny_config(ct_slices, mesh=(2, 4, 1), **overrides), str(sharded)) == 0
    single = tmp_path / "mesh_1x1"
    env = xla_env(1)
    proc = subprocess.run(  # from another directory, with a relative --workdir, as users do
        [sys.executable, "-m", "flexict_jax.train", f"--config={REPO / 'configs/stage1.py'}:tiny",
         "--workdir=mesh_1x1", f"--config.data.dir={ct_slices}", "--config.mesh=(1,1,1)"]
        + cli_overrides(overrides),
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, eight = metrics(single)[0], metrics(sharded)[0]
    for key in ("loss", "dino_local", "dino_global", "ibot"):
        np.testing.assert_allclose(one[key], eight[key], atol=1e-5, rtol=0, err_msg=key)
    np.testing.assert_allclose(one["koleo"], eight["koleo"], rtol=1e-3)

    report = json.loads((sharded / "sharding_report.json").read_text())
    assert report["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    big = [p for p in report["params"] if np.prod(p["shape"]) >= 48 * 48]
    assert big and all(p["bytes_per_device"] < p["bytes"] for p in big), [p for p in big if "fsdp" not in p["spec"]]
    assert report["large_replicated"] == []


def test_refuses_resume_with_changed_shapes(six_steps, ct_slices):
    config = tiny_config(ct_slices, total_steps=9)
    config.heads.num_prototypes = 256
    with pytest.raises(checkpointing.IncompatibleCheckpointError, match="num_prototypes|last_layer"):
        trainer.train(config, str(six_steps))


def test_nonfinite_loss_skips_updates_and_stops(ct_slices, tmp_path):
    assert trainer.train(tiny_config(ct_slices, total_steps=3, **ONE_VARIANT), str(tmp_path)) == 0
    poisoned = tiny_config(ct_slices, total_steps=12, max_consecutive_nonfinite=2, **ONE_VARIANT)
    poisoned.loss.student_temperature = 0.0  # logits / 0 → non-finite loss
    assert trainer.train(poisoned, str(tmp_path)) == 1
    assert checkpoint_steps(tmp_path)[-1] == 3  # the last good checkpoint is kept, nothing saved during the streak


class _Flag:
    """A step's `finite` metric that records when the host reads it."""

    def __init__(self, value, step: int, events: list):
        self.value, self.step, self.events = value, step, events

    def __bool__(self) -> bool:
        self.events.append(("read", self.step))
        return bool(self.value)


def test_host_dispatches_next_step_before_reading_metrics(ct_slices, tmp_path, monkeypatch):
    """The loop reads step n's finite flag only after it has dispatched step n+1 (the host never waits for the
    step it just queued), except where a checkpoint needs the flag first: here only the last step."""
    events = []
    real_train_step = train_step.Program.train_step

    def counted(compiled):
        def run(state, batch):
            step = sum(kind == "dispatch" for kind, _ in events) + 1
            events.append(("dispatch", step))
            state, metrics = compiled(state, batch)
            return state, {**metrics, "finite": _Flag(metrics["finite"], step, events)}
        return run

    def counted_train_step(self, config, variant, batch_example):
        jitted = real_train_step(self, config, variant, batch_example)
        return SimpleNamespace(lower=lambda *args: SimpleNamespace(
            compile=lambda: counted(jitted.lower(*args).compile())))

    monkeypatch.setattr(train_step.Program, "train_step", counted_train_step)
    config = tiny_config(ct_slices, **{"ckpt.every_steps": 1000, **ONE_VARIANT})
    assert trainer.train(config, str(tmp_path)) == 0
    expected = [("dispatch", 1)]
    for step in range(2, 7):
        expected += [("dispatch", step), ("read", step - 1)]
    assert events == expected + [("read", 6)]
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
    assert checkpoint_steps(tmp_path) == [6]


def test_missing_data_dir_is_a_clear_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "flexict_jax.train", "--config=configs/stage1.py:tiny", f"--workdir={tmp_path}",
         f"--config.data.dir={tmp_path / 'nope'}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "config.data.dir" in proc.stderr and "does not exist" in proc.stderr


def test_sigterm_saves_current_step_and_exits_zero(ct_slices, tmp_path):
    cmd = [sys.executable, "-m", "flexict_jax.train", "--config=configs/stage1.py:tiny", f"--workdir={tmp_path}",
           f"--config.data.dir={ct_slices}", "--config.total_steps=100000", "--config.ckpt.every_steps=1000",
           *cli_overrides(ONE_VARIANT)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        path = tmp_path / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= 3:
            break
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    last_logged = metrics(tmp_path)[-1]["step"]
    assert checkpoint_steps(tmp_path) == [last_logged]
    # The run then resumes from that step.
    assert trainer.train(tiny_config(ct_slices, total_steps=last_logged + 2, **ONE_VARIANT), str(tmp_path)) == 0
    assert metrics(tmp_path)[-1]["step"] == last_logged + 2


def test_resume_after_crash_logs_each_step_once(six_steps, ct_slices, tmp_path):
    """A run that logged steps 4-6 but died before its step-6 checkpoint resumes from 3: metrics.jsonl and
    TensorBoard then hold steps 1-6 once each, the later values superseding the lost attempt's."""
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    shutil.copytree(six_steps, tmp_path, dirs_exist_ok=True)
    shutil.rmtree(tmp_path / "checkpoints" / "6")
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "loss"')  # cut short by the kill
    assert trainer.train(tiny_config(ct_slices), str(tmp_path)) == 0
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4, 5, 6]
