"""On-disk format of ingested CT volumes: TensorStore zarr3 arrays plus a JSONL manifest.

A dataset directory holds

    manifest.jsonl        one JSON object per volume (see `MANIFEST_KEYS`), appended only after its arrays
                          are committed, so every listed volume is complete
    volumes/<id>.zarr     int16 HU, axes (z, y, x), canonical orientation LPS
    labels/<id>.zarr      uint8 label map on the same grid (only when the source had one)

Geometry: x increases toward patient Left, y toward Posterior, z toward Superior, so `vol[z]` is an axial slice
in radiological display (anterior at the top, patient left on the image right). The LPS position (mm) of the
centre of voxel (z, y, x) is `origin_lps + (x*sx, y*sy, z*sz)`; the array attributes carry `spacing`
[sz, sy, sx], `origin_lps` [L, P, S] and the equivalent 4x4 `affine_zyx_to_lps`.

Arrays are written whole by a single writer into a temporary directory that is renamed into place (zarr3
shards must not be written concurrently: jax_stack.md §A5/§A6).
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts

MANIFEST_NAME = "manifest.jsonl"
VOLUMES_DIR = "volumes"
LABELS_DIR = "labels"
# Prefix of in-progress arrays; readers never see them and the ingest removes stale ones.
TMP_PREFIX = ".tmp-"
# Keys every manifest line must carry; `licence` and `split` are optional.
MANIFEST_KEYS = ("id", "path", "label_path", "shape", "spacing", "origin_lps", "subject", "source",
                 "source_sha256")

# Shard = one file per 64x256x256 block; inner chunk = the unit a crop read decompresses (jax_stack.md §A5).
SHARD_SHAPE = (64, 256, 256)
CHUNK_SHAPE = (16, 64, 64)
ZSTD_LEVEL = 3
# Value of never-written chunks; ingest writes every voxel, so this only matters for a corrupt store.
FILL_VALUE = {np.dtype(np.int16): -1024, np.dtype(np.uint8): 0}


def affine_zyx_to_lps(spacing: tuple[float, float, float] | list[float],
                      origin_lps: tuple[float, float, float] | list[float]) -> np.ndarray:
    """4x4 matrix mapping a voxel index (z, y, x, 1) to its LPS position (L, P, S, 1) in mm."""
    sz, sy, sx = (float(s) for s in spacing)
    return np.array([[0.0, 0.0, sx, origin_lps[0]],
                     [0.0, sy, 0.0, origin_lps[1]],
                     [sz, 0.0, 0.0, origin_lps[2]],
                     [0.0, 0.0, 0.0, 1.0]])


def _kvstore(path: Path | str) -> dict[str, Any] | str:
    # URLs (gs://bucket/..., file:///...) go to TensorStore as they are; anything else is a local path.
    text = str(path)
    return text if "://" in text else {"driver": "file", "path": text}


def _storage_layout(shape: tuple[int, ...]) -> tuple[list[int], list[int]]:
    """(shard, chunk) shapes for a volume: chunk clipped to the volume, shard a multiple of the chunk."""
    chunk = [min(c, n) for c, n in zip(CHUNK_SHAPE, shape)]
    shard = [min(s, -(-n // c) * c) for s, c, n in zip(SHARD_SHAPE, chunk, shape)]
    return shard, chunk


def _zarr3_spec(path: Path | str, shape: tuple[int, ...], dtype: np.dtype, attributes: dict) -> dict:
    shard, chunk = _storage_layout(shape)
    return {
        "driver": "zarr3",
        "kvstore": _kvstore(path),
        "metadata": {
            "shape": list(shape),
            "data_type": dtype.name,
            "dimension_names": ["z", "y", "x"],
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": shard}},
            "codecs": [{
                "name": "sharding_indexed",
                "configuration": {
                    "chunk_shape": chunk,
                    "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                               {"name": "zstd", "configuration": {"level": ZSTD_LEVEL}}],
                    "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                                     {"name": "crc32c"}],
                },
            }],
            "fill_value": FILL_VALUE[dtype],
            "attributes": attributes,
        },
        "create": True,
    }


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_volume(path: Path, array: np.ndarray, attributes: dict) -> None:
    """Writes a (z, y, x) int16 volume or uint8 label map to `path` (a local `<id>.zarr` directory).

    Atomic: the array is written under a temporary name in the same directory and renamed into place, so
    `path` either does not exist or is complete. Refuses to replace an existing `path` (never overwrites data).
    """
    path = Path(path)
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"{path}: a volume must be 3D (z, y, x), got shape {array.shape}")
    if array.dtype not in FILL_VALUE:
        raise ValueError(f"{path}: dtype {array.dtype} not stored; use int16 (HU) or uint8 (labels)")
    if path.exists():
        raise FileExistsError(f"{path}: already exists; refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{TMP_PREFIX}{path.name}-{uuid.uuid4().hex[:12]}"
    attributes = json.loads(json.dumps(attributes))  # fails early on non-JSON values, normalises tuples
    store = ts.open(_zarr3_spec(tmp, array.shape, array.dtype, attributes)).result()
    # TensorStore's file kvstore fsyncs each file it writes (context option `file_io_sync`, on by default).
    store.write(array).result()
    os.rename(tmp, path)
    _fsync_dir(path.parent)


def open_volume(path: Path | str) -> ts.TensorStore:
    """Opens a stored volume lazily for reading; `vol[z0:z1, y0:y1, x0:x1].read().result()` gives numpy."""
    try:
        return ts.open({"driver": "zarr3", "kvstore": _kvstore(path)}, read=True, open=True).result()
    except ValueError as e:  # TensorStore reports a missing or malformed array as ValueError
        raise ValueError(f"{path}: not a readable zarr3 volume ({e})") from e


def read_attributes(path: Path | str) -> dict:
    """The attributes (spacing, origin_lps, affine_zyx_to_lps, source, ...) of a stored volume."""
    return open_volume(path).spec().to_json()["metadata"].get("attributes", {})


def provenance(entries: list[dict]) -> dict[str, Any]:
    """What a model card says about the training data of these manifest entries: how many volumes, from where
    (the directories of their sources) and under which licences (ingest `--licence`; "unrecorded" without one).
    It travels from the manifest through the slices / reports index into the checkpoint metadata."""
    def counts(values: list[str]) -> dict[str, int]:
        return {v: values.count(v) for v in sorted(set(values))}
    return {"volumes": len(entries),
            "sources": counts([os.path.dirname(str(e["source"]).rstrip("/")) or "." for e in entries]),
            "licences": counts([str(e.get("licence") or "unrecorded") for e in entries])}


def read_manifest(dataset_dir: Path | str) -> list[dict]:
    """All manifest entries of a dataset, in the order they were appended."""
    manifest = Path(dataset_dir) / MANIFEST_NAME
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: no manifest (not an ingested dataset directory?)")
    entries, seen = [], {}
    with open(manifest, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{manifest}:{line_no}: corrupt manifest line ({e.msg})") from e
            if not isinstance(entry, dict):
                raise ValueError(f"{manifest}:{line_no}: expected a JSON object, got {type(entry).__name__}")
            missing = [k for k in MANIFEST_KEYS if k not in entry]
            if missing:
                raise ValueError(f"{manifest}:{line_no}: manifest entry lacks {missing}")
            if entry["id"] in seen:
                raise ValueError(f"{manifest}:{line_no}: duplicate volume id {entry['id']!r} "
                                 f"(first on line {seen[entry['id']]})")
            seen[entry["id"]] = line_no
            entries.append(entry)
    return entries


def append_manifest(dataset_dir: Path | str, entry: dict) -> None:
    """Appends one volume to the manifest; call only after its arrays are committed by `write_volume`.

    The line goes out in a single `write` on an O_APPEND descriptor and is fsynced, so a crash leaves either
    the whole line or none of it. Single writer: only the ingest's parent process appends.
    """
    dataset_dir = Path(dataset_dir)
    missing = [k for k in MANIFEST_KEYS if k not in entry]
    if missing:
        raise ValueError(f"manifest entry {entry.get('id')!r} lacks {missing}")
    for key in ("path", "label_path"):
        if entry[key] is not None and not (dataset_dir / entry[key] / "zarr.json").is_file():
            raise FileNotFoundError(f"{dataset_dir / entry[key]}: not committed; write the array before "
                                    f"listing it in the manifest")
    line = (json.dumps(entry, sort_keys=True) + "\n").encode("utf-8")
    fd = os.open(dataset_dir / MANIFEST_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if os.write(fd, line) != len(line):
            raise OSError(f"{dataset_dir / MANIFEST_NAME}: short write while appending {entry['id']!r}")
        os.fsync(fd)
    finally:
        os.close(fd)
