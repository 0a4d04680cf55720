"""Ingest throughput per worker: the local path (one process) against the same work as an Apache Beam pipeline
on the DirectRunner (one worker), on the same sources, into fresh datasets.

Times `python -m data_prep.ingest` end to end (discovery, hashing, reading, reorienting, resampling to
--spacing, int16 zarr3 writes, manifest) and reports volumes/s and seconds per source megavoxel (the cost grows
with the voxels read and written), from which docs/benchmarks.md estimates a FlexiCT-scale run. Both outputs
are checked to be the same manifest. Needs apache-beam for the Beam row (`pip install 'flexict_jax[beam]'`).

    python bench/bench_ingest.py --input ../shared/data/ct/*.nii.gz --spacing 1.5 --out ingest_cpu.json
"""
from __future__ import annotations

import pathlib
import sys
import tempfile
import time

import common  # bench/common.py: this script's folder is first on sys.path

common.single_threaded_blas()  # before numpy loads OpenBLAS

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_prep import ingest  # noqa: E402
from flexict_jax.data import volume_store  # noqa: E402


def timed_ingest(inputs: list[str], output: pathlib.Path, spacing: str, extra: list[str]) -> float:
    start = time.perf_counter()
    code = ingest.main(["--input", *inputs, "--output", str(output), "--spacing", spacing, *extra])
    seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"ingest exited {code} on {output}")
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--input", nargs="+", required=True, help="NIfTI files (label maps beside them come too)")
    parser.add_argument("--spacing", default="1.5", help="ingest --spacing (the recipe's 1.5 mm)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per path; the fastest counts")
    args = common.parse_args(parser, argv, at_least_one=["repeats"])
    images = [p for p in args.input if not any(p.endswith(s + ".nii.gz") for s in ("_label", "_seg"))]
    megavoxels = sum(float(np.prod(nib.load(p).shape[:3])) for p in images) / 1e6
    paths = {"local": [], "beam_direct": ["--runner=DirectRunner", "--direct_num_workers=1"]}
    seconds, manifests = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in paths.items():
            runs = []
            for r in range(args.repeats):
                output = pathlib.Path(tmp) / f"{name}_{r}"
                runs.append(timed_ingest(images, output, args.spacing, extra))
                manifests[name] = volume_store.read_manifest(output)
            seconds[name] = min(runs)
    same = manifests["local"] == manifests["beam_direct"]
    result = {"bench": "ingest", "volumes": len(images), "source_megavoxels": round(megavoxels, 2),
              "spacing": args.spacing, "same_manifest": same}
    for name, s in seconds.items():
        result[name] = {"seconds": round(s, 2), "volumes_per_s": round(len(images) / s, 3),
                        "s_per_volume": round(s / len(images), 2), "s_per_megavoxel": round(s / megavoxels, 3)}
    result["beam_over_local"] = round(seconds["beam_direct"] / seconds["local"], 2)
    common.write_result(result, args.out)


if __name__ == "__main__":
    main()
