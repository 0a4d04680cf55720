"""Stage-1 slice builder: ingested CT volumes -> ArrayRecord shards of fixed-field-of-view axial slices.

`python -m data_prep.slices --dataset DATASET_DIR --output SLICES_DIR` reads the volumes listed in
`DATASET_DIR/manifest.jsonl` (written by `python -m data_prep.ingest`: int16 HU, axes (z, y, x) in LPS) and
writes every axial slice that contains enough body as one record of `SLICES_DIR/slices-NNNNN-of-MMMMM.array_record`,
plus `SLICES_DIR/index.json`.

What a slice is (docs/recipe.md §5, named honestly per §13 #11). Upstream resamples volumes to 1.5 mm, centre-crops
or pads each slice to 228 px (a 342 mm field of view, padding -1000 HU) and resizes that to 384 px, under a
flag called "resize-to-256". Here the field of view (`--fov-mm`, default 342) and the stored size (`--size`,
default 384) are the parameters, and each slice is resampled once, straight from the volume's native
spacing (anisotropic in-plane spacing included) to `fov_mm / size` mm per pixel, with an antialiased
(area-aware) linear filter computed in float; the stored values are int16 HU and every record carries its
pixel spacing and field of view. The square field of view is centred on the centre of the volume's body
bounding box (voxels above -500 HU over the whole volume, so all slices of a volume share one frame and
anatomy does not jitter from slice to slice); whatever falls outside the volume is -1000 HU (air).

Body filter. Upstream keeps only slices that TotalSegmentator assigns a body region (it drops "none"). We
have no such labels in general, so a body-content threshold replaces it: a slice is kept when at least
`--min-body-fraction` of its field of view is above -500 HU.

DATASET_DIR and SLICES_DIR may be gs:// URLs (data_prep/storage.py): volumes are read from the bucket by
TensorStore, the shards are written locally (ArrayRecord writes local files only) and uploaded, index.json last.

Output is written into a temporary directory beside SLICES_DIR and renamed into place at the end; record
order is deterministic (manifest order, then z). A volume that cannot be read is reported, skipped and
listed under "skipped" in index.json. Exit status: 0 when every volume was processed, 2 when some were
skipped, 1 on a fatal error (no manifest, no slices written, refused output directory, ...).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorstore as ts

from data_prep import beam, outputs, storage
from flexict_jax.data import records, volume_store
from flexict_jax.data.slice_source import INDEX_FILE, SLICES_FORMAT
from flexict_jax.imaging import readers
from flexict_jax.progress import Progress

BODY_HU = -500.0  # above this a voxel is body tissue (air is about -1000 HU, fat about -100 HU)
PAD_HU = -1000.0  # air, what upstream pads with (docs/recipe.md §5)
READ_CHUNK_Z = 32  # slices read from the store at a time; bounds memory on large volumes
SHARD_PREFIX = "slices"


@dataclasses.dataclass(frozen=True)
class SliceOptions:
    fov_mm: float = 342.0  # docs/recipe.md §5: 228 px at 1.5 mm
    size: int = 384  # docs/recipe.md §5
    min_body_fraction: float = 0.05
    every: int = 1  # keep axial slices with z_index % every == 0

    @property
    def pixel_spacing_mm(self) -> float:
        return self.fov_mm / self.size

    def validate(self) -> None:
        if not (math.isfinite(self.fov_mm) and self.fov_mm > 0):
            raise ValueError(f"--fov-mm must be a positive number of mm, got {self.fov_mm}")
        if self.size < 8:
            raise ValueError(f"--size must be >= 8 pixels, got {self.size}")
        if not 0.0 <= self.min_body_fraction <= 1.0:
            raise ValueError(f"--min-body-fraction must be in [0, 1], got {self.min_body_fraction}")
        if self.every < 1:
            raise ValueError(f"--every must be >= 1, got {self.every}")


@dataclasses.dataclass
class VolumeSlices:
    """What one volume contributed: encoded records in z order, or the reason it was skipped."""

    volume_id: str
    subject: str | None
    records: list[bytes] = dataclasses.field(default_factory=list)
    dropped: int = 0  # slices below the body-content threshold
    error: str | None = None


def fov_weights(n_in: int, spacing_in: float, centre_mm: float, fov_mm: float, size: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """1-D resampling of `n_in` samples at `spacing_in` mm onto `size` pixels covering `fov_mm` around `centre_mm`.

    Positions are in mm from the centre of input sample 0. Returns (W [size, n_in], inside [size]): output
    pixel r is `W[r] @ samples + (1 - inside[r]) * pad`, i.e. the input is extended with the pad value, so
    a pixel half outside the volume is an honest mix of tissue and air. The kernel is a triangle stretched
    to the output pixel when downsampling (antialiasing: every input sample contributes in proportion to
    its overlap) and plain linear interpolation when upsampling.
    """
    out_spacing = fov_mm / size
    support = max(1.0, out_spacing / spacing_in)  # in input samples
    centres = centre_mm + (np.arange(size) + 0.5 - size / 2.0) * out_spacing
    u = centres / spacing_in  # output pixel centres in input-sample coordinates
    taps = np.arange(math.floor(u.min() - support), math.ceil(u.max() + support) + 1)
    weights = np.maximum(0.0, 1.0 - np.abs(taps[None, :] - u[:, None]) / support)
    weights /= weights.sum(axis=1, keepdims=True)  # normalised over the pad-extended input
    in_volume = (taps >= 0) & (taps < n_in)
    matrix = np.zeros((size, n_in))
    matrix[:, taps[in_volume]] = weights[:, in_volume]
    return matrix, matrix.sum(axis=1)


def body_centre(volume: ts.TensorStore, shape: Sequence[int], spacing: Sequence[float]) -> tuple[float, float]:
    """(y, x) mm of the centre of the body bounding box over all slices; the grid centre if there is no body."""
    nz, ny, nx = shape
    footprint = np.zeros((ny, nx), bool)
    for z0 in range(0, nz, READ_CHUNK_Z):
        chunk = volume[z0:min(z0 + READ_CHUNK_Z, nz)].read().result()  # TensorStore does not clip
        footprint |= (chunk > BODY_HU).any(axis=0)
    centre = []
    for axis, n, step in ((1, ny, spacing[1]), (0, nx, spacing[2])):
        hits = np.flatnonzero(footprint.any(axis=axis))
        middle = (hits[0] + hits[-1]) / 2.0 if hits.size else (n - 1) / 2.0
        centre.append(middle * step)
    return centre[0], centre[1]


def _checked_geometry(entry: dict, volume: ts.TensorStore, path: storage.Location
                      ) -> tuple[tuple[int, int, int], tuple[float, float, float], float]:
    """(shape, spacing, S of z_index 0) of a manifest entry, checked against the stored array at `path`."""
    shape = tuple(int(n) for n in volume.shape)
    if volume.dtype.numpy_dtype != np.int16 or len(shape) != 3:
        raise ValueError(f"{path}: expected an int16 (z, y, x) volume, "
                         f"found {volume.dtype.numpy_dtype} {list(shape)}")
    if list(shape) != list(entry["shape"]):
        raise ValueError(f"{path}: stored shape {list(shape)} differs from the manifest shape {entry['shape']}")
    spacing = tuple(float(s) for s in entry["spacing"])
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"{path}: manifest spacing {entry['spacing']} is not three positive mm values")
    origin = [float(o) for o in entry["origin_lps"]]
    if len(origin) != 3 or not all(math.isfinite(o) for o in origin):
        raise ValueError(f"{path}: manifest origin_lps {entry['origin_lps']} is not three finite mm values")
    return shape, spacing, origin[2]


def volume_slices(dataset_dir: storage.Location, entry: dict, options: SliceOptions) -> VolumeSlices:
    """Resamples and filters the axial slices of one manifest entry; never raises for a bad volume."""
    result = VolumeSlices(volume_id=str(entry.get("id")), subject=entry.get("subject"))
    try:
        path = storage.join(dataset_dir, entry["path"])
        volume = volume_store.open_volume(path)
        shape, spacing, s_origin = _checked_geometry(entry, volume, path)
        centre_y, centre_x = body_centre(volume, shape, spacing)
        wy, inside_y = fov_weights(shape[1], spacing[1], centre_y, options.fov_mm, options.size)
        wx, inside_x = fov_weights(shape[2], spacing[2], centre_x, options.fov_mm, options.size)
        wy, wx = wy.astype(np.float32), wx.astype(np.float32)
        padding = (PAD_HU * (1.0 - np.outer(inside_y, inside_x))).astype(np.float32)
        for z0 in range(0, shape[0], READ_CHUNK_Z):
            z_indices = [z for z in range(z0, min(z0 + READ_CHUNK_Z, shape[0])) if z % options.every == 0]
            if not z_indices:
                continue
            chunk = volume[z_indices[0]:z_indices[-1] + 1].read().result()[::options.every]
            resampled = wy @ chunk.astype(np.float32) @ wx.T + padding
            for z, image in zip(z_indices, resampled):
                body_fraction = float(np.mean(image > BODY_HU))
                if body_fraction < options.min_body_fraction:
                    result.dropped += 1
                    continue
                meta = {
                    "volume_id": result.volume_id, "subject": result.subject, "z_index": z,
                    "z_mm": s_origin + z * spacing[0], "pixel_spacing_mm": options.pixel_spacing_mm,
                    "fov_mm": options.fov_mm, "body_fraction": round(body_fraction, 4),
                    "split": entry.get("split"),
                }
                # Triangle weights are a convex combination of int16 inputs and the pad, so no overflow.
                result.records.append(records.encode_array(np.rint(image).astype(np.int16), meta))
    except Exception as e:  # a batch job reports a bad volume and carries on (house rules)
        result.records.clear()
        result.error = f"{type(e).__name__}: {e}"
    return result


def build_slices(dataset_dir: storage.Location, output: storage.Location, options: SliceOptions = SliceOptions(),
                 split: str | None = None, records_per_shard: int = 1024, workers: int = 1,
                 overwrite: bool = False, progress: bool = True, pipeline_args: list[str] | None = None
                 ) -> dict[str, Any]:
    """Builds the slices dir and returns its index (the content of index.json).

    Raises on fatal problems (no or corrupt manifest, no volume selected, no slice written, refused output
    directory); volumes that cannot be read are listed under index["skipped"] instead.
    """
    options.validate()
    if records_per_shard < 1:
        raise ValueError(f"--records-per-shard must be >= 1, got {records_per_shard}")
    dataset_dir, output = (p if storage.is_url(p) else pathlib.Path(p).resolve() for p in (dataset_dir, output))
    with storage.Mirror(dataset_dir, (volume_store.MANIFEST_NAME, volume_store.DATASET_FILE),
                        required=(volume_store.MANIFEST_NAME,)) as mirror:
        entries = volume_store.read_manifest(mirror.local)
        dataset_spacing = volume_store.check_one_geometry(mirror.local, entries)
        manifest_sha256 = readers.file_sha256(mirror.local / volume_store.MANIFEST_NAME)
    if split is not None:
        entries = [e for e in entries if e.get("split") == split]
    if not entries:
        raise ValueError(f"{storage.join(dataset_dir, volume_store.MANIFEST_NAME)}: no volumes"
                         + (f" with split {split!r}" if split is not None else ""))
    outputs.check_output(output, overwrite, kind="slices dir", index_file=INDEX_FILE, index_format=SLICES_FORMAT)

    with outputs.staged_dir(output, INDEX_FILE) as tmp:
        writer = outputs.ShardWriter(tmp, records_per_shard, SHARD_PREFIX)
        volumes, skipped, dropped = {}, [], 0
        bar = Progress(len(entries), "slices") if progress else None
        work = ((dataset_dir, entry, options) for entry in entries)
        for result in outputs.ordered_map(_volume_slices_star, work, workers, pipeline_args, "slices"):
            if result.error is not None:
                skipped.append({"id": result.volume_id, "reason": result.error})
                outputs.report(f"skipped volume {result.volume_id}: {result.error}")
            else:
                volumes[result.volume_id] = {"subject": result.subject, "num_slices": len(result.records),
                                             "first_record": writer.num_records}
                for record in result.records:
                    writer.write(record)
                dropped += result.dropped
            if bar:
                bar.advance(1, f"{result.volume_id}: {len(result.records)} slices")
        if bar:
            bar.close()
        shards = writer.finish()
        if writer.num_records == 0:
            reasons = "; ".join(f"{s['id']}: {s['reason']}" for s in skipped[:3])
            raise RuntimeError(f"no slice written from {len(entries)} volume(s) ({len(skipped)} unreadable"
                               f"{', e.g. ' + reasons if reasons else ''}; {dropped} below --min-body-fraction "
                               f"{options.min_body_fraction})")
        index = {
            "format": SLICES_FORMAT, "shards": shards, "num_records": writer.num_records,
            "size": options.size, "fov_mm": options.fov_mm, "pixel_spacing_mm": options.pixel_spacing_mm,
            "min_body_fraction": options.min_body_fraction, "every": options.every, "split": split,
            "shard_sha256": {name: readers.file_sha256(tmp / name) for name in shards},  # data_prep.verify
            "dataset": str(dataset_dir), "dataset_spacing": dataset_spacing, "manifest_sha256": manifest_sha256,
            "slices_below_body_fraction": dropped,
            "volumes": volumes, "skipped": skipped,
            "provenance": volume_store.provenance([e for e in entries if e["id"] in volumes]),
        }
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
    return index


def _volume_slices_star(args: tuple) -> VolumeSlices:
    return volume_slices(*args)  # a module-level function, so spawned workers can unpickle it


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.slices", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, type=storage.location,
                        help="ingested dataset dir (manifest.jsonl), local or gs://")
    parser.add_argument("--output", required=True, type=storage.location, help="slices dir to create, local or gs://")
    defaults = SliceOptions()
    parser.add_argument("--fov-mm", type=float, default=defaults.fov_mm,
                        help="side of the square field of view in mm (default %(default)s, docs/recipe.md §5)")
    parser.add_argument("--size", type=int, default=defaults.size, help="stored pixels per side (default %(default)s)")
    parser.add_argument("--min-body-fraction", type=float, default=defaults.min_body_fraction,
                        help="keep slices whose field of view is at least this fraction > -500 HU "
                             "(default %(default)s)")
    parser.add_argument("--every", type=int, default=defaults.every,
                        help="keep every K-th axial slice, z_index %% K == 0 (default %(default)s)")
    parser.add_argument("--split", default=None, help="only volumes whose manifest split is this (default: all)")
    parser.add_argument("--records-per-shard", type=int, default=1024, help="records per shard (default %(default)s)")
    parser.add_argument("--workers", type=int, default=1, help="volumes processed in parallel (default %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing slices dir at --output")
    beam.add_runner_argument(parser)
    args = beam.parse_args(parser, argv)
    options = SliceOptions(args.fov_mm, args.size, args.min_body_fraction, args.every)
    try:
        index = build_slices(args.dataset, args.output, options, split=args.split,
                             records_per_shard=args.records_per_shard, workers=args.workers,
                             overwrite=args.overwrite, pipeline_args=args.pipeline_args)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"slices: {index['num_records']} records in {len(index['shards'])} shard(s) from {len(index['volumes'])} "
          f"volume(s) -> {args.output}; {len(index['skipped'])} volume(s) skipped, "
          f"{index['slices_below_body_fraction']} slices below --min-body-fraction")
    return 2 if index["skipped"] else 0


if __name__ == "__main__":
    sys.exit(main())
