"""On-disk format of ingested CT volumes: TensorStore zarr3 arrays plus a JSONL manifest.

A dataset directory holds

    manifest.jsonl        one JSON object per volume (see `MANIFEST_KEYS`), appended only after its arrays
                          are committed, so every listed volume is complete; `content_sha256` (and
                          `label_content_sha256`) is the `content_sha256` of the stored array
    dataset.json          the dataset's one geometry: {"format": DATASET_FORMAT, "target_spacing": [sz, sy, sx]
                          or "native"}, written by the first ingest and checked by every later one
    volumes/<id>.zarr     int16 HU, axes (z, y, x), canonical orientation LPS
    labels/<id>.zarr      uint8 label map on the same grid (only when the source had one)

Geometry: x increases toward patient Left, y toward Posterior, z toward Superior, so `vol[z]` is an axial slice
in radiological display (anterior at the top, patient left on the image right). The LPS position (mm) of the
centre of voxel (z, y, x) is `origin_lps + (x*sx, y*sy, z*sz)`; the array attributes carry `spacing`
[sz, sy, sx], `origin_lps` [L, P, S] and the equivalent 4x4 `affine_zyx_to_lps`.

Arrays are written whole by a single writer into a temporary directory that is renamed into place (zarr3
shards must not be written concurrently: docs/jax_notes.md §A5/§A6).

Reads never invent data: every chunk is stored, even one that equals the fill value (TensorStore's zarr3 option
`store_data_equal_to_fill_value`), and volumes are opened with `fill_missing_data_reads` off, so a chunk lost
from a copy is an error naming the chunk and its file, not a block of -1024 HU. Volumes written before this
(attribute `every_chunk_stored` absent) omit air-only chunks and are still read with fill, with a warning;
`python -m data_prep.verify` reports them.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts
from absl import logging

MANIFEST_NAME = "manifest.jsonl"
DATASET_FILE = "dataset.json"
DATASET_FORMAT = "flexict_dataset/1"
# Written into the attributes of every array whose chunks are all stored (see the module docstring).
EVERY_CHUNK_STORED = "every_chunk_stored"
_WARNED_LEGACY: set[str] = set()
VOLUMES_DIR = "volumes"
LABELS_DIR = "labels"
# Prefix of in-progress arrays; readers never see them and the ingest removes stale ones.
TMP_PREFIX = ".tmp-"
# Keys every manifest line must carry; `licence` and `split` are optional.
MANIFEST_KEYS = ("id", "path", "label_path", "shape", "spacing", "origin_lps", "subject", "source",
                 "source_sha256")

# Shard = one file per 64x256x256 block; inner chunk = the unit a crop read decompresses (docs/jax_notes.md §A5).
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
            "attributes": {**attributes, EVERY_CHUNK_STORED: True},
        },
        "store_data_equal_to_fill_value": True,  # an all-air chunk is stored too, so none may be missing
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
    """Opens a stored volume lazily for reading; `vol[z0:z1, y0:y1, x0:x1].read().result()` gives numpy, and a
    missing chunk raises ValueError naming the chunk and its file (see the module docstring)."""
    spec = {"driver": "zarr3", "kvstore": _kvstore(path), "fill_missing_data_reads": False}
    try:
        store = ts.open(spec, read=True, open=True).result()
        if not store.spec().to_json()["metadata"].get("attributes", {}).get(EVERY_CHUNK_STORED):
            dataset_dir = str(Path(str(path)).parent.parent)
            if dataset_dir not in _WARNED_LEGACY:  # once per dataset and process, not once per volume
                _WARNED_LEGACY.add(dataset_dir)
                logging.warning("%s: volumes written before every chunk was stored, so a missing chunk reads as the "
                                "fill value; re-ingest to have lost chunks detected", dataset_dir)
            store = ts.open(dict(spec, fill_missing_data_reads=True), read=True, open=True).result()
        return store
    except ValueError as e:  # TensorStore reports a missing or malformed array as ValueError
        raise ValueError(f"{path}: not a readable zarr3 volume ({e})") from e


def content_sha256(volume: ts.TensorStore | np.ndarray) -> str:
    """sha256 of a volume's voxels: its values in C order as little-endian bytes of its dtype, so the hash of
    an array and of the store written from it agree. A store is read one shard row of z at a time."""
    digest = hashlib.sha256()
    for z0 in range(0, volume.shape[0], SHARD_SHAPE[0]):
        slab = volume[z0:min(z0 + SHARD_SHAPE[0], volume.shape[0])]  # TensorStore does not clip slices
        slab = np.asarray(slab.read().result() if isinstance(slab, ts.TensorStore) else slab)
        digest.update(np.ascontiguousarray(slab, dtype=slab.dtype.newbyteorder("<")).tobytes())
    return digest.hexdigest()


def read_target_spacing(dataset_dir: Path | str) -> list[float] | str | None:
    """The dataset's target spacing (mm, z, y, x) or "native"; None for a dataset without volumes.

    From dataset.json; for a dataset ingested before that file existed, from the attributes of its first
    readable volume (ingest records in every array the target spacing it was resampled to).
    """
    dataset_dir = Path(dataset_dir)
    path = dataset_dir / DATASET_FILE
    if path.is_file():
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a readable JSON file ({e})") from e
        if not isinstance(document, dict) or document.get("format") != DATASET_FORMAT \
                or "target_spacing" not in document:
            raise ValueError(f"{path}: not a {DATASET_FORMAT} file (expected keys 'format' and 'target_spacing')")
        return document["target_spacing"]
    for entry in read_manifest(dataset_dir) if (dataset_dir / MANIFEST_NAME).is_file() else []:
        try:
            return read_attributes(dataset_dir / entry["path"]).get("target_spacing")
        except ValueError:  # a broken array is reported by whoever reads it; the next one tells the geometry
            continue
    return None


def spacing_text(spacing: list[float] | tuple[float, ...] | str | None) -> str:
    return "native" if spacing in (None, "native") else ",".join(f"{float(s):g}" for s in spacing)


def claim_target_spacing(dataset_dir: Path | str, spacing: tuple[float, float, float] | None) -> None:
    """Records `spacing` (None = native) as the dataset's geometry, or refuses one that differs from the
    recorded one: a dataset holds volumes of one geometry. Call under the ingest lock."""
    dataset_dir = Path(dataset_dir)
    wanted = "native" if spacing is None else [float(s) for s in spacing]
    recorded = read_target_spacing(dataset_dir)
    if recorded is not None and recorded != wanted:
        raise ValueError(f"{dataset_dir}: the dataset was made at spacing {spacing_text(recorded)} mm, refusing "
                         f"to add volumes at {spacing_text(wanted)}: one dataset holds one geometry; ingest into "
                         f"another --output or pass --spacing {spacing_text(recorded)}")
    if not (dataset_dir / DATASET_FILE).is_file():
        document = json.dumps({"format": DATASET_FORMAT, "target_spacing": wanted}, indent=1) + "\n"
        tmp = dataset_dir / f"{TMP_PREFIX}{DATASET_FILE}-{uuid.uuid4().hex[:12]}"
        tmp.write_text(document, encoding="utf-8")
        os.replace(tmp, dataset_dir / DATASET_FILE)
        _fsync_dir(dataset_dir)


def check_one_geometry(dataset_dir: Path | str, entries: list[dict]) -> list[float] | str | None:
    """The dataset's target spacing (see `read_target_spacing`), after checking that every manifest entry was
    stored at it; a volume at another spacing is refused, naming it. A "native" dataset keeps each source's
    spacing by design, and one whose arrays record no target spacing cannot be checked: both pass."""
    target = read_target_spacing(dataset_dir)
    if target in (None, "native"):
        return target
    for entry in entries:
        if not np.allclose(entry["spacing"], target, rtol=0, atol=1e-6):
            raise ValueError(f"{Path(dataset_dir) / MANIFEST_NAME}: volume {entry['id']!r} has spacing "
                             f"{spacing_text(entry['spacing'])} mm but the dataset's is {spacing_text(target)} mm; "
                             f"a dataset holds one geometry: re-ingest the odd volumes into their own dataset")
    return target


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
