"""Integrity checks of the offline data a pod run reads: an ingested dataset or a slices dir.

`verify_dataset` reads every voxel of every listed volume (and label map) and checks it against the manifest:
the array is there, opens, has the manifest shape and dtype, has no missing chunk (volumes are opened with
`fill_missing_data_reads` off, see `volume_store`) and hashes to the manifest's `content_sha256`; the dataset has
one geometry (`volume_store.check_one_geometry`). `verify_slices` reads every record of a slices dir: each shard
is there and opens, hashes to its `shard_sha256` in index.json, the shards hold `num_records` records, every
record passes ArrayRecord's chunk hashes and decodes as a [size, size] int16 slice, and the records of each
volume listed in the index carry that volume's id.

Both return a `Report` (what was checked, and one "path: reason" line per problem) instead of raising, so an
operator sees everything that is broken in one pass; `python -m data_prep.verify` is the command line.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from flexict_jax.data import records, slice_source, volume_store
from flexict_jax.imaging.readers import file_sha256
from flexict_jax.progress import Progress


@dataclasses.dataclass
class Report:
    """What was checked and what is broken ("path: reason", one per problem)."""
    checked: str
    items: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _array_problems(dataset_dir: Path, entry: dict, key: str, sha_key: str, dtype: np.dtype) -> list[str]:
    path = dataset_dir / entry[key]
    if not (path / "zarr.json").is_file():
        return [f"{path}: missing (volume {entry['id']!r} is listed in the manifest)"]
    try:
        store = volume_store.open_volume(path)
        shape = [int(n) for n in store.shape]
        if shape != list(entry["shape"]) or store.dtype.numpy_dtype != dtype:
            return [f"{path}: stored {store.dtype.numpy_dtype} {shape}, the manifest says {dtype} {entry['shape']}"]
        attributes = store.spec().to_json()["metadata"].get("attributes", {})
        content = volume_store.content_sha256(store)  # reads every chunk: a missing one raises
    except (ValueError, OSError) as e:
        return [f"{path}: unreadable ({e})"]
    expected = entry.get(sha_key)
    if expected is None or not attributes.get(volume_store.EVERY_CHUNK_STORED):
        return [f"{path}: no {sha_key} in the manifest or written before every chunk was stored (ingested by an "
                f"older version), so lost chunks cannot be told from air; re-ingest into a new dataset"]
    if content != expected:
        return [f"{path}: content sha256 {content[:12]}... differs from the manifest's {expected[:12]}... "
                f"(the voxels changed after ingest); restore the array from a copy or re-ingest the volume"]
    return []


def _entry_problems(dataset_dir: Path, entry: dict) -> list[str]:
    problems = _array_problems(dataset_dir, entry, "path", "content_sha256", np.dtype(np.int16))
    if entry.get("label_path"):
        problems += _array_problems(dataset_dir, entry, "label_path", "label_content_sha256", np.dtype(np.uint8))
    return problems


def _run(items: list, check: Callable, label: str, workers: int, progress: bool, note: Callable) -> Iterable:
    """check(item) over items on `workers` threads (TensorStore reads and hashing release the GIL), results in
    order, with a progress line."""
    bar = Progress(len(items), label) if progress else None
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        for item, result in zip(items, pool.map(check, items)):
            if bar:
                bar.advance(1, note(item))
            yield result
    if bar:
        bar.close()


def verify_dataset(dataset_dir: str | os.PathLike, *, workers: int = 1, progress: bool = True) -> Report:
    """Checks an ingested dataset (see the module docstring)."""
    dataset_dir = Path(dataset_dir)
    report = Report(checked=f"dataset {dataset_dir}")
    try:
        entries = volume_store.read_manifest(dataset_dir)
    except (OSError, ValueError) as e:
        report.problems.append(str(e))
        return report
    try:
        volume_store.check_one_geometry(dataset_dir, entries)
    except ValueError as e:
        report.problems.append(str(e))
    report.items = len(entries)
    for problems in _run(entries, lambda e: _entry_problems(dataset_dir, e), "verify volumes", workers, progress,
                         lambda e: e["id"]):
        report.problems += problems
    return report


def _shard_problems(slices_dir: Path, index: dict, name: str) -> tuple[list[str], list[list]]:
    """(problems, runs) of one shard: runs are [volume id, record count] of consecutive records of one volume
    (id None for unreadable records), so a pod-sized slices dir does not hold one id per record."""
    path = slices_dir / name
    problems = []
    expected_sha = index.get("shard_sha256", {}).get(name)
    if expected_sha is not None and file_sha256(path) != expected_sha:
        problems.append(f"{path}: sha256 differs from index.json's shard_sha256 (the file changed after it was "
                        f"written)")
    try:
        shard = records.ShardedRecords([str(path)])
    except records.CorruptRecordError as e:
        return problems + [str(e)], []
    runs: list[list] = []
    for i in range(len(shard)):
        volume_id = None
        try:
            hu, meta = slice_source.decode_slice(shard[i])
            if hu.shape != (index["size"], index["size"]):
                raise ValueError(f"slice of shape {list(hu.shape)}, index.json's size is {index['size']}")
            volume_id = meta.get("volume_id")
        except records.CorruptRecordError as e:
            problems.append(str(e))
        except ValueError as e:
            problems.append(f"{path}: record {i}: {e}")
        if runs and runs[-1][0] == volume_id:
            runs[-1][1] += 1
        else:
            runs.append([volume_id, 1])
    return problems, runs


def verify_slices(slices_dir: str | os.PathLike, *, workers: int = 1, progress: bool = True) -> Report:
    """Checks a slices dir written by `python -m data_prep.slices` (see the module docstring)."""
    slices_dir = Path(slices_dir)
    index_path = slices_dir / slice_source.INDEX_FILE
    report = Report(checked=f"slices dir {slices_dir}")
    try:
        index = slice_source.read_slice_index(slices_dir)
    except (OSError, ValueError) as e:  # also a shard listed in the index but missing
        report.problems.append(str(e))
        return report
    report.items = len(index["shards"])
    ranges: dict[str | None, list[tuple[int, int]]] = {}  # volume id -> (first record, count) of its runs
    total, unopened = 0, 0
    for problems, runs in _run(index["shards"], lambda s: _shard_problems(slices_dir, index, s), "verify shards",
                               workers, progress, str):
        report.problems += problems
        unopened += not runs
        for volume_id, count in runs:
            ranges.setdefault(volume_id, []).append((total, count))
            total += count
    if unopened:  # records after an unopenable shard cannot be placed: it is reported, the placement is not checked
        return report
    if total != index["num_records"]:
        report.problems.append(f"{index_path}: 'num_records' is {index['num_records']} but the shards hold {total} "
                               f"readable or damaged records")
    for volume_id, info in index.get("volumes", {}).items():
        expected = (info["first_record"], info["num_slices"])
        found = _merge(ranges.get(volume_id, []))
        if found != [expected] and not _covered_with_damage(expected, found, ranges.get(None, [])):
            report.problems.append(f"{index_path}: volume {volume_id!r} should be records {expected[0]}.."
                                   f"{sum(expected) - 1}, the shards hold it at {found or 'no record'}")
    return report


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(first, count) spans with adjacent ones joined (a volume's records may cross a shard boundary)."""
    merged: list[tuple[int, int]] = []
    for first, count in spans:
        if merged and sum(merged[-1]) == first:
            merged[-1] = (merged[-1][0], merged[-1][1] + count)
        else:
            merged.append((first, count))
    return merged


def _covered_with_damage(expected: tuple[int, int], found: list[tuple[int, int]],
                         damaged: list[tuple[int, int]]) -> bool:
    """Whether a volume's records are where the index says once its damaged records (reported already) are
    counted as its own."""
    return _merge(sorted(found + [d for d in damaged if expected[0] <= d[0] < sum(expected)])) == [expected]
