"""Helpers shared by the end-to-end training and input-pipeline tests (imported by test files; not a test module)."""
from __future__ import annotations

import json
import os
import pathlib

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
from array_record.python.array_record_module import ArrayRecordWriter

from configs import stage1
from flexict_jax.data import records

REPO = pathlib.Path(__file__).resolve().parents[1]
# One patch size per run: each patch size is its own compiled train step, and patch 8 compiles ~1.7x longer than
# 16, so a tiny run with both costs about twice the compile time. Tests that check the per-step patch-size draw
# keep the configs' (16, 8).
ONE_VARIANT = {"patch_sizes": (16,), "patch_size_probs": (1.0,)}
# Runs compared across meshes or process counts: LayerScale 0.1 so the embeddings depend on the input at init;
# KoLeo off in the loss because its nearest-neighbour distances amplify float32 summation-order differences
# (see test_train.py's mesh test); one patch size (the variant draw itself is a pure function of (seed, step),
# flexict_jax/variants.py).
MESH_COMPARABLE = {"model.layerscale_init": 0.1, "loss.koleo_weight": 0.0, **ONE_VARIANT}


def run_cli(main, argv) -> int:
    """Exit code of a CLI `main(argv)`, whether it returns it or raises SystemExit."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return int(code or 0)


def config_with(get_config, arg: str, data_dir, **overrides):
    """`get_config(arg)` with data.dir set and dotted-key overrides, e.g. {"model.layerscale_init": 0.1}."""
    config = get_config(arg)
    config.data.dir = str(data_dir)
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config


def xla_env(devices: int, **extra: str) -> dict[str, str]:
    """The environment of a child process with `devices` fake CPU devices and this session's other XLA flags
    (conftest.py); XLA takes the last of a repeated flag."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    return dict(os.environ, XLA_FLAGS=flags, **extra)


def cli_overrides(overrides: dict) -> list[str]:
    """Dotted-key overrides as `--config.key=value` flags of the training CLI."""
    return [f"--config.{k}={v}".replace(" ", "") for k, v in overrides.items()]


def metrics(workdir) -> list[dict]:
    return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def checkpoint_steps(workdir) -> list[int]:
    return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


def saved_state(workdir, step) -> dict:
    return ocp.StandardCheckpointer().restore(pathlib.Path(workdir) / "checkpoints" / str(step) / "state")


def assert_trees_close(a, b, atol):
    flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0, err_msg=str(path))


def take(ds_or_iter, n) -> list:
    """The first `n` elements (batches) of a dataset or iterator."""
    it = iter(ds_or_iter)
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    """Two lists of batches (dicts of arrays) are equal, key by key."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def take_closing(ds, n) -> list:
    """`take` from a fresh iterator of `ds`, closed afterwards: it stops the Grain worker processes."""
    it = iter(ds)
    try:
        return take(it, n)
    finally:
        it.close()


def assemble_process_batches(parts) -> list:
    """Per-process lists of batches (process 0 first) joined into the global batches, batch by batch."""
    return [{k: np.concatenate([part[t][k] for part in parts]) for k in parts[0][t]} for t in range(len(parts[0]))]


def assert_resumes(build, skip: int, n: int = 2):
    """An iterator of the dataset `build()`, saved after `skip` batches and restored into a fresh iterator,
    continues with the same `n` batches."""
    it = iter(build())
    take(it, skip)
    state = it.get_state()
    expected = take(it, n)
    fresh = iter(build())
    fresh.set_state(state)
    assert_batches_equal(take(fresh, n), expected)


def last_bf16_bit_flipped(periods: np.ndarray, index: int) -> np.ndarray:
    """bf16 periods with entry `index` moved to the next bf16 value up (what another device's rounding gives)."""
    bits = periods.view(np.uint16).copy()
    bits[index] += 1
    return bits.view(ml_dtypes.bfloat16)


# --- synthetic 2D slices (stage-1 and stage-1.1 pipeline tests) ------------------------------------------------

SLICE_SIZE, SLICE_GLOBAL, SLICE_LOCAL = 64, 32, 16  # slice, global crop and local crop sizes (px)
NUM_RECORDS = 24
CELL = 8  # record k carries a 1000 HU marker in cell k of an 8x8 grid of 8-px cells


def synthetic_slice(k: int) -> np.ndarray:
    """int16 HU: ellipse body (40 HU) with a lung-like region (-850 HU) in air, plus record k's marker cell."""
    size = SLICE_SIZE
    rng = np.random.default_rng(k)
    yy, xx = np.mgrid[:size, :size] / size
    ry, rx = rng.uniform(0.3, 0.45), rng.uniform(0.25, 0.4)
    hu = np.full((size, size), -1000, np.int16)
    hu[((yy - 0.5) / ry) ** 2 + ((xx - 0.5) / rx) ** 2 < 1] = 40
    hu[((yy - 0.55) / 0.15) ** 2 + ((xx - 0.4) / 0.1) ** 2 < 1] = -850
    r, c = divmod(k, size // CELL)
    hu[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL] = 1000
    return hu


def write_slices_dir(path, num_records: int = NUM_RECORDS, num_shards: int = 3, corrupt: int | None = None,
                     slices=None):
    """A slices dir in the data_prep contract; `slices` (int16 HU [n, SLICE_SIZE, SLICE_SIZE]) replaces the
    synthetic ones."""
    os.makedirs(path, exist_ok=True)
    if slices is not None:
        num_records = len(slices)
    names = [f"slices-{i:05d}-of-{num_shards:05d}.arrayrecord" for i in range(num_shards)]
    writers = [ArrayRecordWriter(os.path.join(path, n), "group_size:1") for n in names]
    for k in range(num_records):
        meta = dict(volume_id=f"vol{k // 8}", subject=f"sub{k // 8}", z_index=k % 8, z_mm=1.5 * (k % 8),
                    pixel_spacing_mm=1.0, fov_mm=float(SLICE_SIZE), body_fraction=0.5, split="train")
        hu = synthetic_slice(k) if slices is None else slices[k]
        record = b"garbage" if k == corrupt else records.encode_array(hu, meta)
        writers[k * num_shards // num_records].write(record)
    for w in writers:
        w.close()
    index = dict(format="flexict_slices/1", shards=names, num_records=num_records, size=SLICE_SIZE,
                 fov_mm=float(SLICE_SIZE), pixel_spacing_mm=1.0)
    with open(os.path.join(path, "index.json"), "w") as f:
        json.dump(index, f)
    return path


def slices_data_config(slices_dir, **overrides):
    """The tiny stage-1 data config over a synthetic slices dir."""
    data = stage1.get_config("tiny").data  # the lead's config: the key names are the contract
    data.dir = str(slices_dir)
    data.update(dict(global_crop_size=SLICE_GLOBAL, local_crop_size=SLICE_LOCAL, n_global_crops=2,
                     n_local_crops=3, num_workers=0, read_threads=1, prefetch_buffer_size=2))
    data.update(overrides)
    return data


def unaugmented(data):
    """Global crops = the whole slice, no flip, no intensity augmentation (in place; returns `data`)."""
    data.update(dict(global_crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip_prob=0.0))
    data.intensity.update(dict(noise_prob=0.0, smooth_prob=0.0, scale_prob=0.0, lowres_prob=0.0,
                               contrast_prob=0.0))
    return data


# --- stage-3 data (test_stage3, test_export) --------------------------------------------------------------------

PHANTOM_SHAPE = (24, 40, 40)
# A Qwen3 config.json small enough for a test: the local Hugging Face folder of the `qwen3_folder` fixture.
QWEN3_TINY = dict(model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=1e6)


def ingest_split(raw: pathlib.Path, dataset: pathlib.Path, split: str) -> None:
    """Ingests the NIfTI files of `raw` into `dataset` at 6 mm as split `split`."""
    from data_prep import ingest
    assert run_cli(ingest.main, ["--input", str(raw), "--output", str(dataset), "--spacing", "6,6,6",
                                 "--split", split]) == 0


def restore_latest(workdir, config):
    """`Checkpointer.restore_latest` of a run's checkpoints onto `config`'s mesh and abstract state, without
    training (no step compiled); returns checkpointing.Restored or None."""
    from flexict_jax import checkpointing, sharding, train_step
    mesh = sharding.make_mesh(config.mesh)
    with sharding.activate(mesh, config.sharding_rules):
        program = train_step.build_program(config, mesh)
        ckpt = checkpointing.Checkpointer(pathlib.Path(workdir) / "checkpoints", **config.ckpt.to_dict())
        try:
            return ckpt.restore_latest(program.abstract_state, global_batch_size=config.global_batch_size,
                                       topology=checkpointing.topology(mesh))
        finally:
            ckpt.close()


def read_meta(workdir, step) -> dict:
    return json.loads((pathlib.Path(workdir) / "checkpoints" / str(step) / "meta" / "metadata").read_text())
