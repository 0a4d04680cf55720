"""Test-session setup: 8 fake CPU devices, a persistent compile cache, absl flags, shared-data paths.

The environment variables must be set before anything imports jax, which is why they live at the top of
conftest.py (pytest imports it first).
"""
from __future__ import annotations

import os
import pathlib

# XLA:CPU aborts the process when the 8 fake devices do not all reach a collective within its rendezvous
# timeout, which a loaded 2-core machine can exceed; the tests want correctness, not that watchdog.
COLLECTIVE_TIMEOUTS = ("--xla_cpu_collective_timeout_seconds=1800 "
                       "--xla_cpu_collective_call_terminate_timeout_seconds=1800")
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {COLLECTIVE_TIMEOUTS}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# No persistent compilation cache: stage-3 steps on 8 CPU devices loaded from it were seen to hang in their
# collectives (see trainer.enable_compilation_cache), and a test must not depend on an earlier run's files.
os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("FLEXICT_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def pytest_configure(config):
    # Grain's multiprocessing workers read absl flags; outside absl.app.run they are unparsed
    # (google/grain#1360), so mark them parsed for the whole session.
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """../shared/data with the real CT; tests that need it skip with a reason when it is absent."""
    if not (SHARED_DATA / "ct").is_dir():
        pytest.skip(f"real CT data not found at {SHARED_DATA} (set FLEXICT_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ct_dir(shared_data) -> pathlib.Path:
    return shared_data / "ct"


@pytest.fixture(scope="session")
def dicom_dir(shared_data) -> pathlib.Path:
    return shared_data / "dicom"


@pytest.fixture(scope="session")
def real_ct_slices(tmp_path_factory, ct_dir) -> pathlib.Path:
    """Axial slices of a real abdomen/pelvis CT (ts_example_ct, 3 mm), built with the offline tools."""
    from data_prep import ingest, slices
    from run_utils import run_cli
    root = tmp_path_factory.mktemp("stage1_real_ct")
    assert run_cli(ingest.main, ["--input", str(ct_dir / "ts_example_ct.nii.gz"), "--output", str(root / "dataset"),
                                 "--spacing", "3,3,3"]) == 0
    assert run_cli(slices.main, ["--dataset", str(root / "dataset"), "--output", str(root / "slices"),
                                 "--size", "64"]) == 0
    return root / "slices"


@pytest.fixture(scope="session")
def real_ct_volumes(tmp_path_factory, ct_dir) -> pathlib.Path:
    """An ingested dataset of two real CT volumes at 4 mm (small enough for tiny 3D crops of 32³)."""
    from data_prep import ingest, volume_stats
    from run_utils import run_cli
    root = tmp_path_factory.mktemp("stage2_real_ct") / "dataset"
    inputs = [str(ct_dir / name) for name in ("ts_example_ct.nii.gz", "vtk_headsq.nii.gz")]
    assert run_cli(ingest.main, ["--input", *inputs, "--output", str(root), "--spacing", "4,4,4"]) == 0
    assert run_cli(volume_stats.main, ["--dataset", str(root)]) == 0
    return root
