"""Faults a week-long pod job meets, injected on real CT: lost chunks, corrupt records, mixed geometry, refused
starts, a read-only workdir, a full disk, a misspelt config key (issue 12; docs/operations.md).

Each test breaks a copy of data built by the offline tools and checks what the user sees: the error names the
file/record/key and says what to do, nothing is invented or silently replaced, and nothing the user had changes.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorstore as ts
from run_utils import ONE_VARIANT, REPO, cli_overrides, config_with, metrics, run_cli, take, xla_env

from configs import stage1
from data_prep import ingest, slices, volume_stats
from data_prep import verify as verify_cli
from flexict_jax import checkpointing, faults, trainer
from flexict_jax.data import datasets, records, slice_source, volume_source, volume_store

pytestmark = pytest.mark.slow  # the checks that matter train or ingest real CT end to end

BATCH = 8  # the tiny stage-1 global batch


# --- helpers ---------------------------------------------------------------------------------------------------

def snapshot(directory: pathlib.Path) -> dict[str, tuple[int, str]]:
    """Every file under `directory`: (mtime in ns, sha256 of the content)."""
    return {str(p.relative_to(directory)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(directory.rglob("*")) if p.is_file()}


def corrupt_shard(path: pathlib.Path, fractions: list[float], seed: int = 0) -> list[int]:
    """Overwrites 32 random bytes at each fraction of the file (away from its header and footer) and returns
    the indices of the records that no longer read back."""
    size = path.stat().st_size
    rng = np.random.default_rng(seed)
    with open(path, "r+b") as f:
        for fraction in fractions:
            f.seek(int(size * fraction))
            f.write(rng.integers(0, 256, 32, dtype=np.uint8).tobytes())
    shard = records.ShardedRecords([str(path)])
    bad = []
    for i in range(len(shard)):
        try:
            shard[i]
        except records.CorruptRecordError:
            bad.append(i)
    return bad


def cli(*args: str, cwd=REPO, timeout: int = 600, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = xla_env(1, JAX_PLATFORMS="cpu")
    return subprocess.run([*prefix, sys.executable, "-m", "flexict_jax.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def unshare_works() -> bool:
    """Whether this machine lets an unprivileged user namespace mount (a private tmpfs or read-only bind)."""
    try:
        return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def tiny_config(data_dir, **overrides):
    return config_with(stage1.get_config, "tiny", data_dir, **{**ONE_VARIANT, **overrides})


# --- 1. reads never invent data --------------------------------------------------------------------------------

@pytest.fixture
def volumes_copy(real_ct_volumes, tmp_path) -> pathlib.Path:
    shutil.copytree(real_ct_volumes, tmp_path / "dataset")
    return tmp_path / "dataset"


def test_ingest_records_a_content_checksum_and_verify_passes(volumes_copy, capsys):
    for entry in volume_store.read_manifest(volumes_copy):
        store = volume_store.open_volume(volumes_copy / entry["path"])
        assert entry["content_sha256"] == volume_store.content_sha256(store.read().result())
    assert verify_cli.main(["--dataset", str(volumes_copy)]) == 0
    assert "all good" in capsys.readouterr().out


def test_missing_chunk_fails_the_read_naming_volume_and_chunk(volumes_copy, capsys):
    volume = volumes_copy / "volumes" / "ts_example_ct.zarr"
    chunk_files = sorted(p for p in (volume / "c").rglob("*") if p.is_file())
    assert len(chunk_files) >= 2, chunk_files
    chunk_files[-1].unlink()  # a lost object: the last z row of shards
    store = volume_store.open_volume(volume)
    with pytest.raises(ValueError, match=r"chunk .*ts_example_ct\.zarr.* is missing"):
        store[store.shape[0] - 1:].read().result()
    # The 3-D pipeline's reader and the statistics job fail the same way instead of reading -1024 HU.
    source = volume_source.VolumeSource(volumes_copy, (-1000.0, 1000.0))
    row = [e["id"] for e in source.entries].index("ts_example_ct")
    shape = source[row].shape
    with pytest.raises(ValueError, match="is missing"):
        source[row].read((shape[0] - 1, 0, 0), shape)
    (volumes_copy / volume_source.STATS_NAME).unlink()
    assert run_cli(volume_stats.main, ["--dataset", str(volumes_copy)]) == 2
    capsys.readouterr()
    assert verify_cli.main(["--dataset", str(volumes_copy)]) == 2
    err = capsys.readouterr().err
    assert "ts_example_ct.zarr: unreadable" in err and "is missing" in err


def test_changed_voxels_fail_the_checksum(volumes_copy, capsys):
    path = volumes_copy / "volumes" / "vtk_headsq.zarr"
    store = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}, open=True).result()
    store[0, 0, 0].write(np.int16(1234)).result()
    assert verify_cli.main(["--dataset", str(volumes_copy)]) == 2
    err = capsys.readouterr().err
    assert "vtk_headsq.zarr: content sha256" in err and "differs from the manifest" in err


# --- 4. a dataset has one geometry -----------------------------------------------------------------------------

def test_ingest_at_another_spacing_is_refused(volumes_copy, ct_dir, capsys):
    def data(directory):  # everything but the (empty) lock file the ingest holds while it checks
        return {k: v for k, v in snapshot(directory).items() if k != ingest.LOCK_NAME}

    before = data(volumes_copy)
    code = run_cli(ingest.main, ["--input", str(ct_dir / "vtk_headsq.nii.gz"), "--output", str(volumes_copy),
                                 "--spacing", "2,2,2"])
    assert code == 1
    err = capsys.readouterr().err
    assert "made at spacing 4,4,4 mm, refusing to add volumes at 2,2,2" in err
    assert data(volumes_copy) == before
    assert json.loads((volumes_copy / volume_store.DATASET_FILE).read_text())["target_spacing"] == [4.0, 4.0, 4.0]


def test_slices_and_3d_pipeline_refuse_a_mixed_dataset(volumes_copy, tmp_path, capsys):
    manifest = volumes_copy / volume_store.MANIFEST_NAME
    lines = manifest.read_text().splitlines()
    entry = json.loads(lines[1])
    entry["spacing"] = [2.0, 2.0, 2.0]  # what the old ingest let a second run append
    manifest.write_text("\n".join([lines[0], json.dumps(entry)]) + "\n")
    assert run_cli(slices.main, ["--dataset", str(volumes_copy), "--output", str(tmp_path / "s")]) == 1
    assert f"volume {entry['id']!r} has spacing 2,2,2 mm but the dataset's is 4,4,4 mm" in capsys.readouterr().err
    with pytest.raises(ValueError, match="a dataset holds one geometry"):
        volume_source.VolumeSource(volumes_copy, (-1000.0, 1000.0))


# --- 2. bad records are survivable -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corrupt_slices(real_ct_slices, tmp_path_factory) -> tuple[pathlib.Path, list[int]]:
    """A copy of the real-CT slices dir with several records of its shard damaged in place."""
    directory = tmp_path_factory.mktemp("corrupt") / "slices"
    shutil.copytree(real_ct_slices, directory)
    shard = directory / slice_source.read_slice_index(directory)["shards"][0]
    bad = corrupt_shard(shard, [0.2, 0.35, 0.5, 0.65, 0.8])
    assert len(bad) >= 3, bad
    return directory, bad


def test_corrupt_record_names_shard_and_record(corrupt_slices):
    directory, bad = corrupt_slices
    config = tiny_config(directory)
    with pytest.raises(records.CorruptRecordError) as raised:
        take(datasets.build_dataset(config, process_index=0, process_count=1), 14)  # every record, ~once
    message = str(raised.value)
    shard = slice_source.read_slice_index(directory)["shards"][0]
    assert shard in message and any(f"record {i} " in message for i in bad)
    # What the train CLI prints for it: the line, and the two ways on.
    line = faults.one_line(raised.value, "runs/x")
    assert shard in line and "data_prep.verify" in line and "on_corrupt=skip" in line


def test_truncated_shard_is_refused_at_start_naming_it(real_ct_slices, tmp_path, capsys):
    directory = tmp_path / "slices"
    shutil.copytree(real_ct_slices, directory)
    shard = directory / slice_source.read_slice_index(directory)["shards"][0]
    os.truncate(shard, shard.stat().st_size // 2)  # a partial copy
    for on_corrupt in slice_source.ON_CORRUPT:  # skip cannot number the records after it either
        with pytest.raises(records.CorruptRecordError, match=f"{shard}: corrupt ArrayRecord shard, cannot be opened"):
            slice_source.open_slice_source(directory, on_corrupt)
    assert verify_cli.main(["--slices", str(directory)]) == 2
    assert f"broken: {shard}: corrupt ArrayRecord shard" in capsys.readouterr().err


def test_verify_lists_every_corrupt_record(corrupt_slices, real_ct_slices, capsys):
    directory, bad = corrupt_slices
    assert verify_cli.main(["--slices", str(real_ct_slices)]) == 0
    capsys.readouterr()
    assert verify_cli.main(["--slices", str(directory)]) == 2
    err = capsys.readouterr().err
    assert all(f": record {i} (record {i} of" in err for i in bad), err
    assert "sha256 differs from index.json's shard_sha256" in err


def _batches(directory, n, *, process_index=0, process_count=1, state=None):
    config = tiny_config(directory, **{"data.on_corrupt": "skip"})
    iterator = iter(datasets.build_dataset(config, process_index=process_index, process_count=process_count))
    if state is not None:
        iterator.set_state(state)
    return take(iterator, n), iterator


def test_skip_replaces_deterministically_across_processes_and_resume(corrupt_slices):
    directory, bad = corrupt_slices
    num_records = slice_source.read_slice_index(directory)["num_records"]
    assert num_records % BATCH == 0, num_records
    n = 2 * num_records // BATCH  # two epochs: every corrupt record is met twice
    whole, _ = _batches(directory, n)
    assert sum(int(b["records_replaced"].sum()) for b in whole) == 2 * len(bad)
    # Two processes: each builds its rows; together they are the one-process global batch, stand-ins included.
    halves = [_batches(directory, n, process_index=p, process_count=2)[0] for p in (0, 1)]
    for t in range(n):
        for key in ("global_crops", "index", "records_replaced"):
            np.testing.assert_array_equal(whole[t][key], np.concatenate([halves[0][t][key], halves[1][t][key]]))
    # A resume from a saved iterator position reads the same stand-ins.
    _, iterator = _batches(directory, 5)
    resumed, _ = _batches(directory, n - 5, state=iterator.get_state())
    for a, b in zip(whole[5:], resumed):
        np.testing.assert_array_equal(a["global_crops"], b["global_crops"])
        np.testing.assert_array_equal(a["records_replaced"], b["records_replaced"])


@pytest.fixture(scope="module")
def skip_run(corrupt_slices, tmp_path_factory) -> pathlib.Path:
    """Three tiny stage-1 steps on the corrupt slices with data.on_corrupt=skip (a checkpoint at step 3)."""
    directory, _ = corrupt_slices
    workdir = tmp_path_factory.mktemp("skip_run")
    assert trainer.train(tiny_config(directory, total_steps=3, **{"data.on_corrupt": "skip"}), str(workdir)) == 0
    return workdir


def test_training_with_skip_counts_replaced_records_in_the_metrics(skip_run, corrupt_slices):
    directory, _ = corrupt_slices
    rows = metrics(skip_run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    expected = [int(b["records_replaced"].sum()) for b in _batches(directory, 3)[0]]
    assert [r["data/records_replaced"] for r in rows] == expected


# --- 6. a refused start leaves the workdir as it was -----------------------------------------------------------

def test_refused_resume_leaves_every_file_as_it_was(skip_run, corrupt_slices):
    directory, _ = corrupt_slices
    before = snapshot(skip_run)
    config = tiny_config(directory, total_steps=6, **{"data.on_corrupt": "skip"})
    config.heads.num_prototypes = 256
    with pytest.raises(checkpointing.IncompatibleCheckpointError):
        trainer.train(config, str(skip_run))
    assert snapshot(skip_run) == before  # config.json too: it is written only once a run is accepted


# --- 7. one-line errors ----------------------------------------------------------------------------------------

def test_misspelt_config_key_is_one_line_with_the_closest_keys(tmp_path):
    proc = cli("--config=configs/stage1.py:tiny", f"--workdir={tmp_path}", "--config.totl_steps=5")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: --config.totl_steps: the config has no key 'totl_steps'; did you mean config.total_steps?"]
    proc = cli("--config=configs/stage1.py:tiny", f"--workdir={tmp_path}", "--config.data.on_corupt=skip")
    assert error_lines(proc.stderr) == [
        "error: --config.data.on_corupt: config.data has no key 'on_corupt'; did you mean config.data.on_corrupt?"]
    assert "Traceback" not in proc.stderr
    # --verbosity=1 adds the traceback.
    proc = cli("--config=configs/stage1.py:tiny", f"--workdir={tmp_path}", "--config.totl_steps=5", "--verbosity=1")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "did you mean config.total_steps" in proc.stderr
    assert not any(tmp_path.iterdir())


def test_unknown_config_variant_is_one_line(tmp_path):
    proc = cli("--config=configs/stage1.py:tny", f"--workdir={tmp_path}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    [line] = error_lines(proc.stderr)
    assert "unknown variant 'tny'; use base, demo or tiny" in line


def test_incompatible_checkpoint_is_one_line(skip_run, corrupt_slices):
    directory, _ = corrupt_slices
    before = snapshot(skip_run)
    proc = cli("--config=configs/stage1.py:tiny", f"--workdir={skip_run}", f"--config.data.dir={directory}",
               "--config.data.on_corrupt=skip", "--config.heads.num_prototypes=256", "--config.total_steps=6")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    [line] = error_lines(proc.stderr)
    assert f"refusing to resume from {skip_run / 'checkpoints' / '3'}" in line and "new --workdir" in line
    assert snapshot(skip_run) == before


@pytest.mark.skipif(not unshare_works(), reason="unprivileged user namespaces (unshare) are not available")
def test_read_only_workdir_is_one_line(real_ct_slices, tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("mine")
    before = snapshot(workdir)
    mount = f"mount --bind {workdir} {workdir} && mount -o remount,ro,bind {workdir} && exec \"$@\""
    proc = cli("--config=configs/stage1.py:tiny", f"--workdir={workdir}", f"--config.data.dir={real_ct_slices}",
               prefix=("unshare", "--user", "--map-root-user", "--mount", "sh", "-c", mount, "sh"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    [line] = error_lines(proc.stderr)
    assert f"cannot write {workdir}" in line and "Read-only file system" in line and "--workdir" in line
    assert snapshot(workdir) == before


@pytest.mark.skipif(not unshare_works(), reason="unprivileged user namespaces (unshare) are not available")
def test_disk_full_during_a_save_is_one_line_and_the_rerun_recovers(real_ct_slices, tmp_path):
    """The workdir on a 600 KiB tmpfs: config and metrics fit, the step-3 checkpoint (1.8 MB) does not; saved
    asynchronously (the default of real runs), so the error comes from Orbax's save threads. Then the disk grows
    and the same command runs again: the partial save left behind does not stop it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    script = (f"mount -t tmpfs -o size=600k tmpfs {disk} && \"$@\"; echo '--- rerun' >&2; "
              f"mount -o remount,size=50m {disk} && \"$@\" && ls {disk}/run/checkpoints >&2")
    proc = cli("--config=configs/stage1.py:tiny", f"--workdir={disk}/run", f"--config.data.dir={real_ct_slices}",
               *cli_overrides(ONE_VARIANT), "--config.total_steps=3",
               "--config.ckpt.async_save=True",
               prefix=("unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh"))
    full, rerun = proc.stderr.split("--- rerun")
    assert "Traceback" not in full, full[-3000:]
    [line] = error_lines(full)
    assert line.startswith(f"error: no space left on the device holding {disk}/run") and "resumes" in line
    assert full.strip().splitlines()[-1] == line  # last: nothing logged at shutdown buries it
    assert proc.returncode == 0, rerun[-3000:]
    # The rerun's checkpoint; the partial save set aside in corrupt/ (checkpointing.restore_latest).
    assert rerun.split()[-2:] == ["3", "corrupt"]
