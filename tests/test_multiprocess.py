"""Multi-host training on one machine: 2 processes × 4 CPU devices joined on 127.0.0.1 through
launch/local_multiprocess.sh, the code path of a TPU pod (per-host data shards → global arrays, the same step
variant on every host, checkpoints written by all hosts together, preemption sync).

One stage-1 tiny run on real CT checks, in order: its losses equal those of 1 process × 8 devices; a SIGTERM to
ONE process makes both save the same step and exit 0; the run then resumes from that step.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from run_utils import MESH_COMPARABLE, REPO, checkpoint_steps, cli_overrides, config_with, read_meta

from configs import stage1
from flexict_jax import trainer

pytestmark = pytest.mark.slow  # end to end: trains real runs (the fast loop is `pytest -m "not slow"`)


def start_two_processes(workdir: pathlib.Path, data_dir: pathlib.Path, log: pathlib.Path,
                        **overrides) -> subprocess.Popen:
    args = ["--config=configs/stage1.py:tiny", f"--workdir={workdir}", f"--config.data.dir={data_dir}"]
    args += cli_overrides({**MESH_COMPARABLE, **overrides})
    with open(log, "w") as out:  # a file, not a pipe: nobody has to drain it while the run goes on
        return subprocess.Popen(["bash", "launch/local_multiprocess.sh", "2", "--cpu-devices=4",
                                 f"--log-dir={log.parent / log.stem}", "--", *args],
                                cwd=REPO, env=dict(os.environ, PYTHON=sys.executable), stdout=out,
                                stderr=subprocess.STDOUT)


def metrics(workdir: pathlib.Path) -> list[dict]:
    """The complete lines of the run's metrics.jsonl (it may be mid-write while the run goes on)."""
    path = workdir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().split("\n")[:-1]] if path.exists() else []


def wait_for_steps(proc: subprocess.Popen, workdir: pathlib.Path, n: int, log: pathlib.Path) -> None:
    deadline = time.monotonic() + 900
    while len(metrics(workdir)) < n:
        assert proc.poll() is None, f"exited with {proc.returncode}:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.5)


@pytest.mark.slow
def test_two_processes_match_one_then_preempt_and_resume(real_ct_slices, tmp_path):
    # The reference first (not alongside, to keep this 2-core machine from starving the two processes):
    # 1 process × 8 devices (conftest's fake devices), same config, 3 steps.
    config = config_with(stage1.get_config, "tiny", real_ct_slices, total_steps=3, **MESH_COMPARABLE)
    assert trainer.train(config, str(tmp_path / "one_process")) == 0

    run_dir, log = tmp_path / "two_processes", tmp_path / "launcher.log"
    launcher = start_two_processes(run_dir, real_ct_slices, log, total_steps=100_000, **{"ckpt.every_steps": 1000})
    try:
        wait_for_steps(launcher, run_dir, 3, log)
        pid = int(re.search(r"process 1 of 2: pid (\d+)", log.read_text()).group(1))
        os.kill(pid, signal.SIGTERM)  # one host is preempted
        assert launcher.wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        if launcher.poll() is None:
            launcher.terminate()
            launcher.wait(timeout=120)

    # Same losses as one process with 8 devices.
    one, two = metrics(tmp_path / "one_process"), metrics(run_dir)
    assert [r["step"] for r in one] == [1, 2, 3]
    for a, b in zip(one, two[:3]):
        for key in ("loss", "dino_local", "dino_global", "ibot"):
            np.testing.assert_allclose(b[key], a[key], atol=1e-5, rtol=0, err_msg=f"step {a['step']} {key}")
        np.testing.assert_allclose(b["koleo"], a["koleo"], rtol=1e-3, err_msg=f"step {a['step']} koleo")

    # Both hosts stopped at the same step and wrote one checkpoint of it together, with the global data position.
    stopped = two[-1]["step"]
    for i in (0, 1):
        assert f"stopping at step {stopped} on request" in (tmp_path / "launcher" / f"process_{i}.log").read_text()
    assert checkpoint_steps(run_dir) == [stopped]
    assert read_meta(run_dir, stopped)["data"] == {"position": stopped}

    # The run resumes from that step on both hosts and finishes.
    log = tmp_path / "resume.log"
    launcher = start_two_processes(run_dir, real_ct_slices, log, total_steps=stopped + 2)
    assert launcher.wait(timeout=600) == 0, log.read_text()[-4000:]
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, stopped + 3))
    assert checkpoint_steps(run_dir)[-1] == stopped + 2
