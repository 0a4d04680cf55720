"""Host-side throughput of the stage-1 input pipeline at the recipe sizes (docs/recipe.md §5).

Writes synthetic 384-px int16 HU slices to a temporary slices dir, then measures samples/s of
  * the per-example transform called directly (one core, no Grain),
  * the Grain pipeline with 0 workers (in-process), and
  * the Grain pipeline with N worker processes (after their start-up),
each with `--read-threads` threads per process, and prints one JSON line (also written to `--out`).
Rates are steady-state: the per-process resize-matrix caches are warmed and worker start-up is excluded.
BLAS runs single-threaded unless OPENBLAS_NUM_THREADS / OMP_NUM_THREADS say otherwise (bench/common.py says why).

    python bench/bench_pipeline2d.py --workers 4 --out pipeline2d.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import common  # bench/common.py: this script's folder is first on sys.path

common.single_threaded_blas()  # before numpy loads OpenBLAS

import numpy as np  # noqa: E402
from array_record.python.array_record_module import ArrayRecordWriter  # noqa: E402

from configs import stage1  # noqa: E402
from flexict_jax.data import pipeline2d, records, slice_source  # noqa: E402
from flexict_jax.progress import Progress  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--workers", type=int, default=2, help="Grain worker processes for the N-worker run")
    parser.add_argument("--batch-size", type=int, default=16, help="per-process batch size")
    parser.add_argument("--batches", type=int, default=8, help="timed batches per pipeline run")
    parser.add_argument("--records", type=int, default=64, help="synthetic slice records to write")
    parser.add_argument("--slice-size", type=int, default=384, help="slice side in pixels (docs/recipe.md §5: 384)")
    parser.add_argument("--read-threads", type=int, default=1, help="Grain read threads per process")
    return common.parse_args(parser, argv, ("workers", "batch_size", "batches", "records", "slice_size",
                                            "read_threads"))


def write_synthetic_slices(path: str, num_records: int, size: int) -> None:
    """Ellipse bodies (40 HU) with lung-like regions (-850 HU) in air (-1000 HU), sizes varying per record."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size] / size
    name = "slices-00000-of-00001.arrayrecord"
    writer = ArrayRecordWriter(os.path.join(path, name), "group_size:1")
    for k in range(num_records):
        hu = np.full((size, size), -1000, np.int16)
        ry, rx = rng.uniform(0.3, 0.45, size=2)
        hu[((yy - 0.5) / ry) ** 2 + ((xx - 0.5) / rx) ** 2 < 1] = 40
        hu[((yy - 0.5) / (ry / 2)) ** 2 + ((xx - 0.4) / (rx / 3)) ** 2 < 1] = -850
        hu += rng.normal(0, 20, size=hu.shape).astype(np.int16)
        writer.write(records.encode_array(hu, dict(volume_id=f"synthetic{k}", subject=f"s{k}", z_index=0,
                                                   z_mm=0.0, pixel_spacing_mm=0.89, fov_mm=342.0,
                                                   body_fraction=0.6, split="train")))
    writer.close()
    with open(os.path.join(path, "index.json"), "w") as f:
        json.dump(dict(format="flexict_slices/1", shards=[name], num_records=num_records, size=size,
                       fov_mm=342.0, pixel_spacing_mm=0.89), f)


def time_transform(data, args, progress: Progress) -> float:
    """samples/s of the bare per-example transform on this core."""
    transform = pipeline2d.stage1_transform(data, seed=args.seed, patch_sizes=(16, 8))
    source = slice_source.open_slice_source(data.dir)
    n = args.batches * args.batch_size
    for i in range(n):  # warm the resize-matrix caches, as in a long-running worker
        transform.map_with_index(n + i, source[i % len(source)])
        progress.advance(1, "transform warm-up")
    start = time.perf_counter()
    for i in range(n):
        transform.map_with_index(i, source[i % len(source)])
        progress.advance(1, "transform")
    return n / (time.perf_counter() - start)


def time_pipeline(data, args, progress: Progress, note: str) -> float:
    """samples/s of the Grain pipeline after a warm-up of two batches per process (start-up, caches)."""
    it = iter(pipeline2d.build_slices2d_dataset(data, seed=args.seed, batch_size=args.batch_size, patch_sizes=(16, 8)))
    return common.time_batches(it, args.batch_size, 2 * max(1, data.num_workers), args.batches, progress, note)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.mark_flags_parsed()
    per_run = args.batches * args.batch_size
    warmup = 2 * (1 + args.workers) * args.batch_size
    progress = Progress(2 * per_run + 2 * per_run + warmup, "bench_pipeline2d")
    with tempfile.TemporaryDirectory(prefix="bench_pipeline2d_") as tmp:
        write_synthetic_slices(tmp, args.records, args.slice_size)
        data = stage1.get_config().data  # recipe sizes: 2 x 256 + 8 x 112 crops, masks for p16 and p8
        data.dir = tmp
        data.read_threads = args.read_threads
        transform_rate = time_transform(data, args, progress)
        data.num_workers = 0
        rate_0 = time_pipeline(data, args, progress, "0 workers")
        data.num_workers = args.workers
        rate_n = time_pipeline(data, args, progress, f"{args.workers} workers")
    progress.close()
    result = dict(
        bench="pipeline2d", slice_size=args.slice_size, global_crops=f"{data.n_global_crops}x{data.global_crop_size}",
        local_crops=f"{data.n_local_crops}x{data.local_crop_size}", batch_size=args.batch_size,
        read_threads=args.read_threads, transform_samples_per_s=round(transform_rate, 2),
        workers0_samples_per_s=round(rate_0, 2), workers=args.workers,
        workersN_samples_per_s=round(rate_n, 2), workersN_samples_per_s_per_worker=round(rate_n / args.workers, 2))
    common.write_result(result, args.out)
    return 0


if __name__ == "__main__":  # Grain workers are spawned: they re-import this file
    sys.exit(main())
