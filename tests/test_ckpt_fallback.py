"""Checkpoint fallback (issue 12, item 3): a newest step that does not restore is moved to
`checkpoints/corrupt/<step>` (never deleted) with one warning naming the step and the reason, and the previous
step is restored; only when none restores does the run stop, with one clear line. Stage-1 tiny on real CT.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
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
    restore_latest,
    saved_state,
)

from configs import stage1
from flexict_jax import checkpointing, trainer

pytestmark = pytest.mark.slow  # every test restores from a trained run (six training steps on real CT)


def tiny_config(data_dir, **overrides):
    return config_with(stage1.get_config, "tiny", data_dir, **{**ONE_VARIANT, **overrides})


@pytest.fixture(scope="module")
def six_steps(stage1_tiny_run) -> pathlib.Path:
    """An uninterrupted 6-step run of `tiny_config`: checkpoints 3 and 6 (conftest; shared, read-only)."""
    assert checkpoint_steps(stage1_tiny_run) == [3, 6]
    return stage1_tiny_run


def truncate_arrays(step_dir: pathlib.Path) -> None:
    largest = max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(largest, "r+b") as f:
        f.truncate(largest.stat().st_size // 2)


def corrupt_arrays(step_dir: pathlib.Path) -> None:
    """Random bytes over the middle of the largest array file: still decodes, so only the fingerprints see it."""
    largest = max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8).tobytes()
    largest.write_bytes(bytes(data))


FAULTS = {
    "truncated arrays": truncate_arrays,
    "random bytes in the arrays": corrupt_arrays,
    "missing meta": lambda step_dir: (step_dir / "meta" / "metadata").unlink(),
}


def assert_saved(params, workdir, step) -> None:
    """`params` (restored onto the mesh) are bitwise those saved at `step` of `workdir`."""
    saved = checkpointing.conform(saved_state(workdir, step)["params"], params, what=f"{workdir} step {step}")
    assert_trees_close(jax.device_get(params), saved, atol=0)


def files_of(directory: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_damaged_newest_step_falls_back_and_is_moved_aside(six_steps, real_ct_slices, tmp_path, fault, caplog):
    damage = FAULTS[fault]
    workdir = shutil.copytree(six_steps, tmp_path / "run")
    damage(workdir / "checkpoints" / "6")
    damaged_files = files_of(workdir / "checkpoints" / "6")

    restored = restore_latest(workdir, tiny_config(real_ct_slices))

    assert (restored.step, restored.data_position) == (3, 3)
    assert_saved(restored.state["params"], six_steps, 3)
    assert checkpoint_steps(workdir) == [3]
    assert files_of(workdir / "checkpoints" / "corrupt" / "6") == damaged_files  # moved whole, nothing deleted
    [warning] = [r.getMessage() for r in caplog.records if "does not restore" in r.getMessage()]
    assert "checkpoint step 6 does not restore" in warning and "corrupt/6" in warning


def test_unfinished_save_is_moved_aside(six_steps, real_ct_slices, tmp_path):
    """What an async save killed mid-write leaves: the step's temporary directory, never renamed into place."""
    workdir = shutil.copytree(six_steps, tmp_path / "run")
    checkpoints = workdir / "checkpoints"
    (checkpoints / "6").rename(checkpoints / "6.orbax-checkpoint-tmp")
    restored = restore_latest(workdir, tiny_config(real_ct_slices))
    assert restored.step == 3
    assert sorted(p.name for p in checkpoints.iterdir()) == ["3", "corrupt"]
    assert (checkpoints / "corrupt" / "6.orbax-checkpoint-tmp" / "state").is_dir()


def test_missing_commit_marker_falls_back(six_steps, real_ct_slices, tmp_path):
    """On object stores a step is finished only with its commit_success.txt; without it, the previous one."""
    workdir = shutil.copytree(six_steps, tmp_path / "run")
    (workdir / "checkpoints" / "6" / "commit_success.txt").unlink()
    (workdir / "checkpoints" / "6" / "state" / "commit_success.txt").unlink()
    restored = restore_latest(workdir, tiny_config(real_ct_slices))
    assert restored.step == 3
    assert checkpoint_steps(workdir) == [3]


def test_training_after_fallback_equals_uninterrupted(six_steps, real_ct_slices, tmp_path):
    workdir = shutil.copytree(six_steps, tmp_path / "run")
    truncate_arrays(workdir / "checkpoints" / "6")
    assert trainer.train(tiny_config(real_ct_slices), str(workdir)) == 0
    assert checkpoint_steps(workdir) == [3, 6]
    assert_trees_close(saved_state(workdir, 6)["params"], saved_state(six_steps, 6)["params"], atol=1e-6)
    resumed = {r["step"]: r for r in metrics(workdir)}  # the rows of steps 4-6 as the resumed run logged them
    for row in metrics(six_steps):
        np.testing.assert_allclose(resumed[row["step"]]["loss"], row["loss"], rtol=1e-5)
    assert (workdir / "checkpoints" / "corrupt" / "6" / "state").is_dir()


def test_none_restores_is_one_clear_line_and_moves_nothing(six_steps, real_ct_slices, tmp_path):
    workdir = shutil.copytree(six_steps, tmp_path / "run")
    truncate_arrays(workdir / "checkpoints" / "6")
    (workdir / "checkpoints" / "3" / "meta" / "metadata").unlink()
    before = files_of(workdir)
    proc = subprocess.run(
        [sys.executable, "-m", "flexict_jax.train", "--config=configs/stage1.py:tiny", f"--workdir={workdir}",
         f"--config.data.dir={real_ct_slices}", *cli_overrides(ONE_VARIANT)], cwd=REPO, capture_output=True,
        text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert "no checkpoint under" in line and "step 6:" in line and "step 3:" in line
    assert files_of(workdir) == before


def test_kill_during_async_save_then_resume(real_ct_slices, tmp_path):
    """SIGKILL while an async save is being written (the default on real runs), then the same command: the
    unfinished save is moved aside and the run continues from the previous checkpoint to the end."""
    cmd = [sys.executable, "-m", "flexict_jax.train", "--config=configs/stage1.py:tiny", f"--workdir={tmp_path}",
           f"--config.data.dir={real_ct_slices}", "--config.ckpt.async_save=True", "--config.ckpt.every_steps=1",
           "--config.ckpt.keep_last=100", *cli_overrides(ONE_VARIANT), "--config.total_steps=200"]
    checkpoints = tmp_path / "checkpoints"
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline, unfinished = time.monotonic() + 600, []
        while not unfinished:  # a save not yet renamed into place, after a finished one: kill now
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no async save caught in progress"
            if checkpoints.exists() and checkpoint_steps(tmp_path):
                unfinished = list(checkpoints.glob("*.orbax-checkpoint-tmp*"))
            if not unfinished:
                time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    left = sorted(p.name for p in checkpoints.iterdir())
    finished = checkpoint_steps(tmp_path)
    assert any(".orbax-checkpoint-tmp" in name for name in left), left  # killed mid-write
    assert finished, "no finished checkpoint before the kill"

    resume = subprocess.run(cmd[:-1] + [f"--config.total_steps={finished[-1] + 2}"], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert resume.returncode == 0, resume.stderr[-3000:]
    assert f"resumed from {checkpoints / str(finished[-1])}" in resume.stderr
    assert "an unfinished save" in resume.stderr
    assert checkpoint_steps(tmp_path)[-1] == finished[-1] + 2
    assert not list(checkpoints.glob("*.orbax-checkpoint-tmp*"))
    assert list((checkpoints / "corrupt").glob("*.orbax-checkpoint-tmp*"))


def test_two_processes_agree_on_the_fallback_step(six_steps, real_ct_slices, tmp_path):
    """2 processes x 4 devices: a newest step whose arrays are damaged is moved aside once, both restore step 3."""
    workdir = shutil.copytree(six_steps, tmp_path / "run")
    truncate_arrays(workdir / "checkpoints" / "6")
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "tests"),
                                                                     os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(["bash", "launch/local_multiprocess.sh", "2", "--cpu-devices=4", "--module=restore_worker",
                           "--", str(real_ct_slices), str(workdir), str(tmp_path / "restored")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    for i in (0, 1):
        assert json.loads((tmp_path / f"restored.{i}.json").read_text()) == {"step": 3, "position": 3}
    assert checkpoint_steps(workdir) == [3]
    assert sorted(p.name for p in (workdir / "checkpoints" / "corrupt").iterdir()) == ["6"]
    assert (proc.stdout + proc.stderr).count("checkpoint step 6 does not restore") == 1


def test_closed_loop_callbacks_after_a_failed_save_are_dropped_and_nothing_else(tmp_path, monkeypatch):
    """The Checkpointer's unraisable hook drops exactly the late TensorStore completions of a failed async save
    (RuntimeError 'Event loop is closed', no object) and passes every other unraisable on."""
    import types
    passed_on = []
    monkeypatch.setattr(sys, "unraisablehook", passed_on.append)
    checkpointing.Checkpointer(tmp_path / "checkpoints", every_steps=1, keep_last=1).close()
    def unraisable(error, obj=None):
        return types.SimpleNamespace(exc_type=type(error), exc_value=error, exc_traceback=None, err_msg=None,
                                     object=obj)
    sys.unraisablehook(unraisable(RuntimeError("Event loop is closed")))
    other = [unraisable(RuntimeError("Event loop is closed"), obj=object()), unraisable(ValueError("x"))]
    for u in other:
        sys.unraisablehook(u)
    assert passed_on == other
