"""Host-side throughput of the stage-2 (3D) input pipeline at the recipe sizes, against upstream's naive path.

Ingests the given NIfTI volumes at 2 mm into a temporary dataset (zarr3 + stats.json), then measures in one run
  * zarr3: the per-example transform on one core, reading only each crop's region from TensorStore
    (= samples/s per Grain worker), with the voxels read per sample;
  * naive: what upstream's `CT3D` does per sample -- load the whole NIfTI with nibabel, resample it to 2 mm
    (linear; upstream uses SimpleITK, scipy's `ndimage.zoom(order=1)` here), z-score it with its own statistics
    -- followed by the same crop transform on the in-memory volume (upstream also augments the whole padded
    volume, so this is a lower bound of its cost);
  * the Grain pipeline over zarr3 with N worker processes (after their start-up).
Crops: 2 x 160³ + 8 x 80³ with RCC masks for p16 and p8 (configs/stage2.py defaults). Prints one JSON line
(also written to `--out`). BLAS runs single-threaded unless OPENBLAS_NUM_THREADS says otherwise (bench/common.py
says why).

    python bench/bench_pipeline3d.py --input ../shared/data/ct/*.nii.gz --workers 2 --out pipeline3d.json
"""
from __future__ import annotations

import argparse
import glob
import os
import pathlib
import sys
import tempfile
import time

import common  # bench/common.py: this script's folder is first on sys.path

common.single_threaded_blas()  # before numpy loads OpenBLAS

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import scipy.ndimage  # noqa: E402

from configs import stage2  # noqa: E402
from data_prep import ingest, volume_stats  # noqa: E402
from flexict_jax.data import pipeline3d  # noqa: E402
from flexict_jax.data.volume_source import Volume, VolumeSource  # noqa: E402
from flexict_jax.imaging import readers  # noqa: E402
from flexict_jax.progress import Progress  # noqa: E402

SHARED_CT = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "ct"
PATCH_SIZES = (16, 8)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--input", nargs="+", metavar="NIFTI",
                        help=f"CT volumes (.nii/.nii.gz; label maps are skipped); default: every image in "
                             f"{SHARED_CT}")
    parser.add_argument("--spacing", type=float, default=2.0, help="isotropic target spacing in mm (docs/recipe.md §7)")
    parser.add_argument("--samples", type=int, default=12, help="timed samples per in-process path")
    parser.add_argument("--workers", type=int, default=2, help="Grain worker processes for the N-worker run")
    parser.add_argument("--batch-size", type=int, default=4, help="per-process batch size of the Grain run")
    parser.add_argument("--batches", type=int, default=4, help="timed batches of the Grain run")
    args = common.parse_args(parser, argv, ("samples", "workers", "batch_size", "batches"))
    if not args.spacing > 0:
        parser.error(f"--spacing must be positive, got {args.spacing}")
    if args.input is None:
        args.input = sorted(glob.glob(str(SHARED_CT / "*.nii.gz")))
    args.input = [p for p in args.input if readers.is_nifti(p) and not readers.is_label_name(p)]
    if not args.input:
        parser.error("no CT NIfTI volume given (--input) or found")
    missing = [p for p in args.input if not os.path.isfile(p)]
    if missing:
        parser.error(f"--input: no such file {missing[0]}")
    return args


class CountingVolume:
    """A `Volume` that counts the voxels read through it."""

    def __init__(self, volume: Volume):
        self._volume = volume
        self.voxels_read = 0

    def __getattr__(self, name):
        return getattr(self._volume, name)

    def read(self, start, stop):
        self.voxels_read += int(np.prod([b - a for a, b in zip(start, stop)]))
        return self._volume.read(start, stop)


def naive_volume(path: str, spacing: float, window: tuple[float, float], row: int) -> Volume:
    """Upstream's per-sample load: the whole NIfTI, linearly resampled to `spacing`, statistics of all voxels.

    Like upstream (docs/recipe.md §7) there is no reorientation and the resampled voxels keep the input's integer type.
    """
    image = nib.load(path)
    array = np.asarray(image.dataobj)
    zooms = np.array(image.header.get_zooms()[:3], dtype=np.float64) / spacing
    resampled = scipy.ndimage.zoom(array, zooms, order=1).astype(array.dtype)
    return Volume.from_array(np.ascontiguousarray(resampled.transpose(2, 1, 0)), window, row=row,
                             volume_id=os.path.basename(path))


def time_zarr(transform, source: VolumeSource, args, progress: Progress) -> tuple[float, float]:
    """(samples/s, mean voxels read per sample) of the transform over region reads, one core."""
    for i in range(len(source)):  # warm the resize caches and open every store, as a long-running worker
        transform.map_with_index(10_000 + i, source[i])
        progress.advance(1, "zarr3 warm-up")
    voxels, start = 0, time.perf_counter()
    for i in range(args.samples):
        volume = CountingVolume(source[i % len(source)])
        transform.map_with_index(i, volume)
        voxels += volume.voxels_read
        progress.advance(1, "zarr3")
    return args.samples / (time.perf_counter() - start), voxels / args.samples


def time_naive(transform, args, window, progress: Progress) -> tuple[float, float]:
    """(samples/s, share of the time spent loading + resampling) of upstream's per-sample whole-volume load."""
    load, start = 0.0, time.perf_counter()
    for i in range(args.samples):
        t0 = time.perf_counter()
        volume = naive_volume(args.input[i % len(args.input)], args.spacing, window, i % len(args.input))
        load += time.perf_counter() - t0
        transform.map_with_index(i, volume)
        progress.advance(1, "naive")
    total = time.perf_counter() - start
    return args.samples / total, load / total


def time_grain(data, args, progress: Progress) -> float:
    """samples/s of the Grain pipeline with `--workers` processes, after two batches per worker of warm-up."""
    it = iter(pipeline3d.build_volumes3d_dataset(data, seed=args.seed, batch_size=args.batch_size,
                                              patch_sizes=PATCH_SIZES))
    return common.time_batches(it, args.batch_size, 2 * data.num_workers, args.batches, progress,
                               f"grain {data.num_workers} workers")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.mark_flags_parsed()
    with tempfile.TemporaryDirectory(prefix="bench_pipeline3d_") as tmp:
        dataset = os.path.join(tmp, "ds")
        spacing = f"{args.spacing:g}"
        if ingest.main(["--input", *args.input, "--output", dataset, "--spacing", spacing]) != 0:
            print("bench_pipeline3d: ingest failed", file=sys.stderr)
            return 1
        if volume_stats.main(["--dataset", dataset]) != 0:
            print("bench_pipeline3d: volume_stats failed", file=sys.stderr)
            return 1
        data = stage2.get_config().data  # recipe sizes: 2 x 160³ + 8 x 80³, RCC masks
        data.dir = dataset
        data.read_threads = 1
        transform = pipeline3d.volume_views_transform(data, seed=args.seed, patch_sizes=PATCH_SIZES)
        source = VolumeSource(dataset, transform.hu_window)
        grain_samples = (2 * args.workers + args.batches) * args.batch_size
        progress = Progress(len(source) + 2 * args.samples + grain_samples, "bench_pipeline3d")
        zarr_rate, voxels = time_zarr(transform, source, args, progress)
        naive_rate, load_share = time_naive(transform, args, transform.hu_window, progress)
        data.num_workers = args.workers
        grain_rate = time_grain(data, args, progress)
        progress.close()
        mean_volume = float(np.mean([np.prod(e["shape"]) for e in source.entries]))
        shapes = {e["id"]: e["shape"] for e in source.entries}
    result = dict(
        bench="pipeline3d", volumes=shapes, spacing_mm=args.spacing,
        global_crops=f"{data.n_global_crops}x{data.global_crop_size}^3",
        local_crops=f"{data.n_local_crops}x{data.local_crop_size}^3", patch_sizes=list(PATCH_SIZES),
        zarr3_samples_per_s_per_worker=round(zarr_rate, 2),
        zarr3_voxels_read_per_sample=int(voxels), mean_volume_voxels=int(mean_volume),
        naive_samples_per_s_per_worker=round(naive_rate, 3),
        naive_load_resample_share=round(load_share, 3),
        speedup=round(zarr_rate / naive_rate, 1),
        grain_workers=args.workers, grain_batch_size=args.batch_size,
        grain_samples_per_s=round(grain_rate, 2),
        grain_samples_per_s_per_worker=round(grain_rate / args.workers, 2))
    common.write_result(result, args.out)
    return 0


if __name__ == "__main__":  # Grain workers are spawned: they re-import this file
    sys.exit(main())
