"""Elastic resume: a run checkpointed on N processes / one mesh continues on M processes / another mesh, with the
same sequence of global batches and the same curve (issue 15).

The contract under test: a checkpoint saves the index of the next GLOBAL batch (meta "data"), global batch t is
the same examples whatever the process count (data/grain_common.py), so every host of any process count starts
at its rows of that batch; the parameters, optimizer and teachers are restored onto the new mesh's shardings.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from run_utils import (
    MESH_COMPARABLE,
    REPO,
    assemble_process_batches,
    assert_batches_equal,
    assert_trees_close,
    checkpoint_steps,
    cli_overrides,
    config_with,
    metrics,
    read_meta,
    restore_latest,
    saved_state,
    take,
    xla_env,
)

from configs import stage1
from flexict_jax import checkpointing, export, trainer
from flexict_jax.data import datasets

pytestmark = pytest.mark.slow  # every test resumes a trained run on another mesh

TERMS = ("loss", "dino_local", "dino_global", "ibot")  # well conditioned: equal to 1e-5 across meshes


def tiny_config(data_dir, **overrides):
    return config_with(stage1.get_config, "tiny", data_dir, **{**MESH_COMPARABLE, **overrides})


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory, real_ct_slices) -> pathlib.Path:
    """4 uninterrupted steps on 1 process × 8 devices, with the checkpoints of steps 2, 3 and 4."""
    workdir = tmp_path_factory.mktemp("four_steps")
    config = tiny_config(real_ct_slices, total_steps=4, **{"ckpt.every_steps": 1, "ckpt.keep_last": 3})
    assert trainer.train(config, str(workdir)) == 0
    assert checkpoint_steps(workdir) == [2, 3, 4]
    return workdir


@pytest.fixture(scope="module")
def two_steps(four_steps, tmp_path_factory) -> pathlib.Path:
    """That run as it was after step 2: the later checkpoints removed (a resume drops the logged rows 3-4)."""
    workdir = shutil.copytree(four_steps, tmp_path_factory.mktemp("two_steps") / "run")
    for step in (3, 4):
        shutil.rmtree(workdir / "checkpoints" / str(step))
    return workdir


def test_global_batches_start_at_a_position_on_any_process_count(real_ct_slices):
    """Global batches k, k+1 assembled from 2 or 4 processes started at position k are batches k, k+1 of one
    process started at 0: what a resume on another process count relies on."""
    config = tiny_config(real_ct_slices)
    whole = take(datasets.global_batches(config, process_index=0, process_count=1), 3)
    for count in (2, 4):
        parts = [take(datasets.global_batches(config, process_index=i, process_count=count, position=1), 2)
                 for i in range(count)]
        assert_batches_equal(assemble_process_batches(parts), whole[1:])


def test_checkpoint_records_position_and_topology(two_steps):
    meta = read_meta(two_steps, 2)
    assert meta["data"] == {"position": 2}
    assert meta["topology"] == {"processes": 1, "devices": 8, "mesh": {"data": 1, "fsdp": 8, "tensor": 1}}
    assert not (two_steps / "checkpoints" / "2" / "data").exists()  # no per-process iterator files any more


def test_restores_onto_another_mesh_and_records_the_change(two_steps, real_ct_slices):
    restored = restore_latest(two_steps, tiny_config(real_ct_slices, mesh=(1, 2, 4)))
    assert (restored.step, restored.data_position) == (2, 2)
    saved = checkpointing.conform(saved_state(two_steps, 2)["params"], restored.state["params"], what="step 2")
    assert_trees_close(jax.device_get(restored.state["params"]), saved, atol=0)
    assert restored.state["params"]["backbone"]["cls_token"].sharding.mesh.shape == {"data": 1, "fsdp": 2,
                                                                                      "tensor": 4}
    [change] = restored.meta["topology_changes"]
    assert change["step"] == 2
    assert change["from"]["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert change["to"]["mesh"] == {"data": 1, "fsdp": 2, "tensor": 4}


def legacy_copy(source: pathlib.Path, target: pathlib.Path, process_files: dict[str, int]) -> pathlib.Path:
    """`source` with its checkpoint in the layout written before the global position: no meta "data" entry,
    one Grain iterator state per process in `<step>/data/` (`process_files`: file name -> next_index)."""
    shutil.copytree(source, target)
    step_dir = target / "checkpoints" / "2"
    meta = json.loads((step_dir / "meta" / "metadata").read_text())
    del meta["data"], meta["topology"]
    (step_dir / "meta" / "metadata").write_text(json.dumps(meta))
    (step_dir / "data").mkdir()
    for name, next_index in process_files.items():
        (step_dir / "data" / name).write_text(json.dumps({"next_index": next_index}, indent=4))
    return target


def test_legacy_iterator_files_of_another_process_count(two_steps, real_ct_slices, tmp_path):
    workdir = legacy_copy(two_steps, tmp_path / "legacy",
                          {"process_0-of-2.json": 2, "process_1-of-2.json": 2})
    restored = restore_latest(workdir, tiny_config(real_ct_slices))
    assert (restored.step, restored.data_position) == (2, 2)


def test_partially_missing_iterator_files_are_a_clear_error(two_steps, real_ct_slices, tmp_path):
    workdir = legacy_copy(two_steps, tmp_path / "partial", {"process_0-of-2.json": 2})
    with pytest.raises(checkpointing.NoRestorableCheckpointError, match=r"step 2: .*1 of the 2 processes.*"
                                                                          r"process_1-of-2\.json"):
        restore_latest(workdir, tiny_config(real_ct_slices))
    assert checkpoint_steps(workdir) == [2]  # nothing moved when nothing restores


def test_changed_global_batch_is_refused(two_steps, real_ct_slices):
    with pytest.raises(checkpointing.IncompatibleCheckpointError, match="global_batch_size=16.*trained with 8"):
        restore_latest(two_steps, tiny_config(real_ct_slices, global_batch_size=16))


def test_device_count_that_does_not_divide_the_global_batch_is_refused(two_steps, real_ct_slices, tmp_path):
    workdir = shutil.copytree(two_steps, tmp_path / "run")
    before = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
    env = xla_env(3)
    proc = subprocess.run(
        [sys.executable, "-m", "flexict_jax.train", "--config=configs/stage1.py:tiny", f"--workdir={workdir}",
         f"--config.data.dir={real_ct_slices}", "--config.total_steps=4"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert "global_batch_size=8" in line and "device count (3)" in line and "divides" in line
    assert sorted(p.relative_to(workdir) for p in workdir.rglob("*")) == before


def start_processes(count: int, devices: int, workdir: pathlib.Path, data_dir: pathlib.Path, log: pathlib.Path,
                    **overrides) -> subprocess.CompletedProcess:
    args = ["--config=configs/stage1.py:tiny", f"--workdir={workdir}", f"--config.data.dir={data_dir}"]
    args += cli_overrides({**MESH_COMPARABLE, **overrides})
    with open(log, "w") as out:
        return subprocess.run(["bash", "launch/local_multiprocess.sh", str(count), f"--cpu-devices={devices}",
                               "--", *args], cwd=REPO, env=dict(os.environ, PYTHON=sys.executable), stdout=out,
                              stderr=subprocess.STDOUT, timeout=900)


def test_1x8_then_2x4_then_1x8_equals_uninterrupted(two_steps, four_steps, real_ct_slices, tmp_path):
    """Steps 1-2 on 1 process × 8 devices, mesh (1,8,1); step 3 on 2 processes × 4, mesh (2,4,1); step 4 on 1
    process × 8, mesh (1,2,4): the curve and the final parameters are those of 4 uninterrupted steps on 1 × 8."""
    reference = four_steps
    workdir = shutil.copytree(two_steps, tmp_path / "elastic")
    log = tmp_path / "two_processes.log"
    result = start_processes(2, 4, workdir, real_ct_slices, log, total_steps=3, mesh=(2, 4, 1))
    assert result.returncode == 0, log.read_text()[-4000:]
    assert "elastic resume from step 2: written by 1 process(es) x 8 devices" in log.read_text()
    assert checkpoint_steps(workdir)[-1] == 3
    assert read_meta(workdir, 3)["topology"]["processes"] == 2
    # Export and hand-offs (init.from, gram.from_workdir) read a step written by 2 processes in 1.
    teacher, _, _ = checkpointing.read_subtree(workdir, "teacher", 3)
    assert_trees_close(teacher, checkpointing.read_subtree(reference, "teacher", 3)[0], atol=1e-5)
    exported = export.export(workdir, kind="2d", fmt="safetensors", out=tmp_path / "step3", step=3)
    assert (exported / "model.safetensors").stat().st_size > 0

    assert trainer.train(tiny_config(real_ct_slices, total_steps=4, mesh=(1, 2, 4)), str(workdir)) == 0

    elastic, uninterrupted = metrics(workdir), metrics(reference)
    assert [r["step"] for r in elastic] == [1, 2, 3, 4]
    for a, b in zip(elastic, uninterrupted):
        for key in TERMS:
            np.testing.assert_allclose(a[key], b[key], atol=1e-5, rtol=0, err_msg=f"step {a['step']} {key}")
        np.testing.assert_allclose(a["koleo"], b["koleo"], rtol=1e-3, err_msg=f"step {a['step']} koleo")
    assert_trees_close(saved_state(workdir, 4)["params"], saved_state(reference, 4)["params"], atol=1e-5)

    meta = read_meta(workdir, 4)
    assert meta["data"] == {"position": 4}
    assert [(c["step"], c["from"]["processes"], c["to"]["processes"], c["to"]["mesh"])
            for c in meta["topology_changes"]] == [(2, 1, 2, {"data": 2, "fsdp": 4, "tensor": 1}),
                                                   (3, 2, 1, {"data": 1, "fsdp": 2, "tensor": 4})]
