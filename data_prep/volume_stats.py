"""Per-volume HU statistics of an ingested dataset, for the 3-D pipelines: writes DATASET_DIR/stats.json.

    python -m data_prep.volume_stats --dataset DATASET_DIR [--hu-window=-1000,1000] [--workers N]

Stages 2-3 z-score every crop with the mean and std of its whole volume after the HU clamp (docs/recipe.md §7).
Computing them once here lets the training pipeline read only the voxels each crop needs
(flexict_jax.data.volume_source documents the file). Each volume is read in z-slabs, so memory stays at one
slab whatever the volume size.

Re-running computes only volumes that lack statistics for this window or whose source_sha256 changed; other
entries (other windows, volumes no longer listed) are kept. stats.json is replaced atomically, every
`--save-every` volumes and at the end, so an interrupted run keeps what it finished. A volume that cannot be
read is reported with its path and the reason, and the rest go on. DATASET_DIR may be a gs:// URL
(data_prep/storage.py): volumes are read from the bucket and stats.json is uploaded at each save.
Exit status: 0 all volumes have statistics, 2 some could not be read, 1 fatal.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data_prep import beam, outputs, storage
from flexict_jax import parallel
from flexict_jax.data import volume_source, volume_store
from flexict_jax.progress import Progress

EXIT_OK, EXIT_FATAL, EXIT_FAILED = 0, 1, 2
LOCK_NAME = ".volume_stats.lock"
DEFAULT_WINDOW = (-1000.0, 1000.0)  # docs/recipe.md §7: HU clamp before the z-score
SLAB_DEPTH = volume_store.SHARD_SHAPE[0]  # one shard row of the zarr3 layout per read


def volume_statistics(path: storage.Location, window: tuple[float, float]) -> dict[str, float]:
    """count, mean, unbiased std, min and max of the volume at `path` clamped to `window`.

    Slabs are merged with Chan et al.'s pairwise update of (count, mean, M2), which stays exact in float64 for
    any number of voxels; the result equals `intensity.hu_stats` of the whole array.
    """
    store = volume_store.open_volume(path)
    count, mean, m2 = 0, 0.0, 0.0
    lo, hi = math.inf, -math.inf
    for z0 in range(0, store.shape[0], SLAB_DEPTH):
        z1 = min(z0 + SLAB_DEPTH, store.shape[0])  # TensorStore does not clip slices to the bounds
        slab = np.clip(store[z0:z1].read().result().astype(np.float64), window[0], window[1])
        n, slab_mean = slab.size, float(slab.mean())
        slab_m2 = float(((slab - slab_mean) ** 2).sum())
        delta, total = slab_mean - mean, count + n
        mean += delta * n / total
        m2 += slab_m2 + delta * delta * count * n / total
        count = total
        lo, hi = min(lo, float(slab.min())), max(hi, float(slab.max()))
    if count == 0:
        raise ValueError(f"{path}: empty volume")
    std = math.sqrt(m2 / (count - 1)) if count > 1 else 0.0
    return {"count": count, "mean": mean, "std": std, "min": lo, "max": hi}


def _job(args: tuple[str, str, str, tuple[float, float]]) -> tuple[str, dict | None, str | None]:
    """(volume id, statistics, None) or (volume id, None, "path: reason"); runs in a worker process."""
    volume_id, path, sha256, window = args
    try:
        return volume_id, {"source_sha256": sha256, **volume_statistics(path, window)}, None
    except Exception as e:  # a bad volume is reported and skipped; the batch goes on
        reason = str(e)
        return volume_id, None, reason if reason.startswith(path) else f"{path}: {type(e).__name__}: {reason}"


def write_stats_file(path: Path, document: dict) -> None:
    """Replaces `path` atomically (temporary file in the same folder, fsync, rename)."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(document, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())

    outputs.write_atomically(path, write)


def parse_window(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--hu-window {text!r}: expected LOW,HIGH in HU, e.g. -1000,1000") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise argparse.ArgumentTypeError(f"--hu-window {text!r}: need finite LOW < HIGH")
    return lo, hi


def build_parser() -> argparse.ArgumentParser:
    parser = outputs.ExitOneParser(
        prog="python -m data_prep.volume_stats", description=__doc__.split("\n\n")[0],
        epilog="Exit status: 0 all volumes have statistics, 2 some could not be read, 1 fatal.")
    parser.add_argument("--dataset", required=True, metavar="DATASET_DIR",
                        help="an ingested dataset (manifest.jsonl + volumes/) from `python -m data_prep.ingest`, "
                             "local or gs://")
    parser.add_argument("--hu-window", type=parse_window, default=DEFAULT_WINDOW, metavar="LOW,HIGH",
                        help="HU clamp applied before the statistics, as the pipeline's data.hu_window "
                             "(default -1000,1000, docs/recipe.md §7; write it as --hu-window=-1000,1000)")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="worker processes, one volume each (default 1: in this process)")
    parser.add_argument("--save-every", type=int, default=100, metavar="N",
                        help="rewrite stats.json after every N new volumes (default 100)")
    beam.add_runner_argument(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    dataset = storage.location(args.dataset)
    if args.workers < 1 or args.save_every < 1:
        raise ValueError(f"--workers and --save-every must be >= 1, got {args.workers} and {args.save_every}")
    key = volume_source.window_key(args.hu_window)
    failed = 0
    with contextlib.ExitStack() as stack:
        # For a gs:// dataset: the manifest and stats.json in a local folder, stats.json uploaded at each save.
        mirror = stack.enter_context(storage.Mirror(dataset, (volume_store.MANIFEST_NAME, volume_source.STATS_NAME),
                                                    required=(volume_store.MANIFEST_NAME,)))
        dataset_dir = mirror.local
        entries = volume_store.read_manifest(dataset_dir)
        stats_path = dataset_dir / volume_source.STATS_NAME

        def save() -> None:
            write_stats_file(stats_path, document)
            mirror.push(volume_source.STATS_NAME)

        # One volume_stats run per dataset: stats.json has a single writer.
        stack.enter_context(outputs.exclusive(dataset_dir, LOCK_NAME,
                                              "another volume_stats run is writing stats.json"))
        document = volume_source.read_stats_file(stats_path)
        section = document["windows"].setdefault(key, {})
        jobs = [(e["id"], str(storage.join(dataset, e["path"])), e["source_sha256"], args.hu_window) for e in entries
                if section.get(e["id"], {}).get("source_sha256") != e["source_sha256"]]
        pool = None
        if args.workers > 1 and len(jobs) > 1 and args.pipeline_args is None:
            pool = parallel.process_pool(args.workers)
            stack.callback(pool.shutdown, wait=True, cancel_futures=True)
        if args.pipeline_args is not None:
            results = outputs.ordered_map(_job, jobs, 1, args.pipeline_args, "volume_stats")
        else:
            results = map(_job, jobs) if pool is None else pool.map(_job, jobs)
        progress = Progress(len(jobs), f"volume_stats {key}")
        unsaved = 0
        try:
            for volume_id, stats, error in results:
                if error is None:
                    section[volume_id] = stats
                    unsaved += 1
                else:
                    outputs.report(f"failed: {error}")
                    failed += 1
                if unsaved >= args.save_every:
                    save()
                    unsaved = 0
                progress.advance(1, volume_id)
        finally:  # also on Ctrl-C: keep what was computed
            if unsaved:
                save()
            progress.close()
    print(f"volume_stats: {len(jobs) - failed} computed, {len(entries) - len(jobs)} already present, "
          f"{failed} failed -> {storage.join(dataset, volume_source.STATS_NAME)} (window {key})")
    return EXIT_FAILED if failed else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = beam.parse_args(build_parser(), argv)
    # ValueError, OSError, RuntimeError: no manifest, a corrupt stats.json, a held lock.
    return outputs.run_tool("volume_stats", lambda: run(args), (ValueError, OSError, RuntimeError),
                            "finished volumes are saved, re-run to continue")


if __name__ == "__main__":
    sys.exit(main())
