"""Test-session setup: 8 fake CPU devices, absl flags, shared-data paths, trained runs shared by all workers.

The environment variables must be set before anything imports jax, which is why they live at the top of
conftest.py (pytest imports it first).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
import shutil
from collections.abc import Callable, Iterator

# XLA:CPU aborts the process when the 8 fake devices do not all reach a collective within its rendezvous
# timeout, which a loaded 2-core machine can exceed; the tests want correctness, not that watchdog.
COLLECTIVE_TIMEOUTS = ("--xla_cpu_collective_timeout_seconds=1800 "
                       "--xla_cpu_collective_call_terminate_timeout_seconds=1800")
# Most of a tiny test run's time is XLA:CPU compiling its steps, and most of that is LLVM optimising the
# generated code: without it a tiny stage-1 step compiles in 7.5 s instead of 10.3 s (user time -36%), and the
# tiny models run as fast. Numerics are the same IEEE float32 (only code generation changes); child processes
# get the same flags (run_utils.xla_env, launch/local_multiprocess.sh appends to XLA_FLAGS).
UNOPTIMISED_CODEGEN = "--xla_backend_optimization_level=0"
os.environ.setdefault("XLA_FLAGS",
                      f"--xla_force_host_platform_device_count=8 {COLLECTIVE_TIMEOUTS} {UNOPTIMISED_CODEGEN}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# No persistent compilation cache: stage-3 steps on 8 CPU devices loaded from it were seen to hang in their
# collectives (see trainer.enable_compilation_cache), and a test must not depend on an earlier run's files.
os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("FLEXICT_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


# The files that take longest (a --durations profile of the full suite, 2026-12-05), first: with `--dist loadfile
# --no-loadscope-reorder` (pyproject.toml) the workers take files in this order, so the long ones start early and
# the short ones fill in at the end, instead of one worker finishing a long file alone.
LONGEST_FIRST = ("test_train", "test_stage3", "test_ckpt_fallback", "test_elastic", "test_plan", "test_faults",
                 "test_stages", "test_evaluate", "test_mixed_precision", "test_torch_parity", "test_multiprocess",
                 "test_text_towers", "test_export")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: file order kept otherwise


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
def real_ct_3mm(tmp_path_factory, ct_dir) -> dict[str, pathlib.Path]:
    """A real abdomen/pelvis CT (ts_example_ct) built with the offline tools: ingested at 3 mm with its HU
    statistics ("dataset", stage-2 layout) and cut into 64-px axial slices ("slices", stage 1)."""
    from run_utils import run_cli

    from data_prep import ingest, slices, volume_stats
    root = tmp_path_factory.mktemp("real_ct_3mm")
    for main, argv in ((ingest.main, ["--input", str(ct_dir / "ts_example_ct.nii.gz"), "--output",
                                      str(root / "dataset"), "--spacing", "3,3,3"]),
                       (volume_stats.main, ["--dataset", str(root / "dataset")]),
                       (slices.main, ["--dataset", str(root / "dataset"), "--output", str(root / "slices"),
                                      "--size", "64"])):
        assert run_cli(main, argv) == 0
    return {"slices": root / "slices", "dataset": root / "dataset"}


@pytest.fixture(scope="session")
def real_ct_slices(real_ct_3mm) -> pathlib.Path:
    """Axial slices of a real abdomen/pelvis CT (ts_example_ct, 3 mm), built with the offline tools."""
    return real_ct_3mm["slices"]


@pytest.fixture(scope="session")
def real_ct_volumes(tmp_path_factory, ct_dir) -> pathlib.Path:
    """An ingested dataset of two real CT volumes at 4 mm (small enough for tiny 3D crops of 32³)."""
    from run_utils import run_cli

    from data_prep import ingest, volume_stats
    root = tmp_path_factory.mktemp("stage2_real_ct") / "dataset"
    inputs = [str(ct_dir / name) for name in ("ts_example_ct.nii.gz", "vtk_headsq.nii.gz")]
    assert run_cli(ingest.main, ["--input", *inputs, "--output", str(root), "--spacing", "4,4,4"]) == 0
    assert run_cli(volume_stats.main, ["--dataset", str(root)]) == 0
    return root


def built_once(tmp_path_factory, name: str, build: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """A directory built by `build(dir)` once per pytest invocation and shared by all its xdist workers (each
    worker is its own session, so a session fixture alone would build it once per worker). The first worker to
    get here builds it under a file lock; the others wait and reuse it. Consumers only read it (copy it before
    training on it)."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "built_once"
    root.mkdir(exist_ok=True)
    target, complete = root / name, root / f"{name}.complete"
    with _exclusive(root / f"{name}.lock"):
        if not complete.exists():
            shutil.rmtree(target, ignore_errors=True)  # a build that failed in another worker
            build(target)
            complete.touch()
    return target


@contextlib.contextmanager
def _exclusive(lock_path: pathlib.Path) -> Iterator[None]:
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def stage1_tiny_run(tmp_path_factory, real_ct_slices) -> pathlib.Path:
    """`configs/stage1.py:tiny` on the real-CT slices, patch 16 only: 6 steps, checkpoints 3 and 6. Shared by
    the checkpoint, stage hand-off and stage-3 tests (read-only: copy it to train on)."""
    def build(workdir: pathlib.Path) -> None:
        from run_utils import ONE_VARIANT, config_with

        from configs import stage1
        from flexict_jax import trainer
        assert trainer.train(config_with(stage1.get_config, "tiny", real_ct_slices, **ONE_VARIANT), str(workdir)) == 0
    return built_once(tmp_path_factory, "stage1_tiny", build)


@pytest.fixture(scope="session")
def stage2_tiny_run(tmp_path_factory, real_ct_volumes, stage1_tiny_run) -> pathlib.Path:
    """`configs/stage2.py:tiny` from `stage1_tiny_run` (the one-time inflation) on two real CT volumes, patch 16
    only, 6 steps. Shared like `stage1_tiny_run`."""
    def build(workdir: pathlib.Path) -> None:
        from run_utils import ONE_VARIANT, config_with

        from configs import stage2
        from flexict_jax import trainer
        config = config_with(stage2.get_config, "tiny", real_ct_volumes,
                             **{"init.from_workdir": str(stage1_tiny_run), **ONE_VARIANT})
        assert trainer.train(config, str(workdir)) == 0
    return built_once(tmp_path_factory, "stage2_tiny", build)


@pytest.fixture(scope="module")
def batch_sharding():
    """Leading (batch) axis split over the 8 fake devices of a 2×4 (data, fsdp) mesh."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from flexict_jax.sharding import make_mesh
    return NamedSharding(make_mesh((2, 4, 1)), P(("data", "fsdp")))


@pytest.fixture(scope="session")
def ctrate_csv(shared_data) -> pathlib.Path:
    path = shared_data / "reports" / "ctrate_reports.csv"
    if not path.is_file():
        pytest.skip(f"CT-RATE reports not found at {path}")
    return path


@pytest.fixture(scope="session")
def ctrate_rows(ctrate_csv) -> list[dict]:
    """The rows of the 1,000 CT-RATE reports of the shared data."""
    import csv
    with open(ctrate_csv, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def phantom_reports(tmp_path_factory) -> pathlib.Path:
    """Reports dir over 6 training phantoms (with lesions) and 4 validation phantoms (2 with, 2 without
    lesions, so the "lesion" finding has both classes), ingested at 6 mm, with its sentencepiece tokenizer."""
    from run_utils import PHANTOM_SHAPE, ingest_split, run_cli

    from data_prep import reports as build_reports
    from data_prep import synthetic, volume_stats
    from data_prep import tokenizer as build_tokenizer
    root = tmp_path_factory.mktemp("stage3_data")
    synthetic.write_phantoms(root / "train", count=6, seed=0, shape=PHANTOM_SHAPE, progress=False)
    synthetic.write_phantoms(root / "val_lesions", count=2, seed=1, shape=PHANTOM_SHAPE, progress=False)
    synthetic.write_phantoms(root / "val_clean", count=2, seed=2, shape=PHANTOM_SHAPE, lesions=False,
                             progress=False)
    dataset = root / "dataset"
    ingest_split(root / "train", dataset, "train")
    ingest_split(root / "val_lesions", dataset, "val")
    ingest_split(root / "val_clean", dataset, "val")
    assert run_cli(volume_stats.main, ["--dataset", str(dataset)]) == 0
    assert run_cli(build_reports.main, ["--dataset", str(dataset), "--output", str(root / "reports")]) == 0
    assert run_cli(build_tokenizer.main, ["--corpus", str(root / "reports"), "--vocab-size", "200"]) == 0
    return root / "reports"


@pytest.fixture(scope="module")
def qwen3_folder(tmp_path_factory) -> tuple[pathlib.Path, dict]:
    """A local Hugging Face folder: config.json, model.safetensors (random weights) and a word-level
    tokenizer.json with a pad token; returns it and the weights as our params."""
    import jax
    import numpy as np
    from flax import nnx
    from run_utils import QWEN3_TINY

    from flexict_jax.models import qwen3
    tokenizers = pytest.importorskip("tokenizers")
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    folder = tmp_path_factory.mktemp("qwen3")
    config = qwen3.Qwen3Config.from_hf_dict(QWEN3_TINY)
    encoder = qwen3.qwen3_encoder(config, rngs=nnx.Rngs(7))
    params = nnx.to_pure_dict(nnx.state(encoder, nnx.Param))
    safetensors_numpy.save_file(qwen3.params_to_hf_state_dict(params), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(QWEN3_TINY))
    words = ["<|endoftext|>", "<unk>", "the", "liver", "is", "present", "no", "lesion", ".", "ml"]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="$A <|endoftext|>",
                                                                  special_tokens=[("<|endoftext|>", 0)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|endoftext|>"}))
    return folder, jax.tree.map(np.asarray, params)
