"""Stage-1 slice records: validate a slices dir written by `python -m data_prep.slices` and open it for Grain.

A slices dir holds `index.json` plus ArrayRecord shards (`group_size:1`); every record is
`records.encode_array(int16 HU [S, S], meta)`. Reading goes through `records.ShardedRecords` (ArrayRecord data
sources, one per shard), which pickles into Grain workers and reopens the shards there.

A record that cannot be read or decoded is a `records.CorruptRecordError` naming its shard file and record
index (config data.on_corrupt=fail, the default). With data.on_corrupt=skip it is logged and replaced by the
next readable record after it in index order: the choice depends only on the files, so every host and a resumed
run read the same stand-in, and each example says whether it is one (`records_replaced`, counted in the
metrics by the trainer).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np
from absl import logging

from flexict_jax.data import records

SLICES_FORMAT = "flexict_slices/1"
INDEX_FILE = "index.json"
ON_CORRUPT = ("fail", "skip")


def read_slice_index(slices_dir: str | os.PathLike) -> dict[str, Any]:
    """Loads and checks `SLICES_DIR/index.json`; every error names the file and the offending key."""
    slices_dir = os.fspath(slices_dir)
    if not os.path.isdir(slices_dir):
        raise FileNotFoundError(f"slices dir {slices_dir!r} does not exist (config key data.dir)")
    path = os.path.join(slices_dir, INDEX_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing; a slices dir is written by `python -m data_prep.slices`")
    try:
        with open(path) as f:
            index = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(index, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(index).__name__}")
    for key in ("format", "shards", "num_records", "size"):
        if key not in index:
            raise ValueError(f"{path}: missing key {key!r}")
    if index["format"] != SLICES_FORMAT:
        raise ValueError(f"{path}: key 'format' is {index['format']!r}, expected {SLICES_FORMAT!r}")
    shards = index["shards"]
    if not isinstance(shards, list) or not shards or not all(isinstance(s, str) for s in shards):
        raise ValueError(f"{path}: key 'shards' must be a non-empty list of file names, got {shards!r}")
    missing = [s for s in shards if not os.path.isfile(os.path.join(slices_dir, s))]
    if missing:
        raise FileNotFoundError(f"{path}: key 'shards' lists {len(missing)} missing file(s), e.g. {missing[0]!r}")
    num_records = index["num_records"]
    if not isinstance(num_records, int) or num_records <= 0:
        raise ValueError(f"{path}: key 'num_records' must be a positive integer, got {num_records!r}")
    size = index["size"]
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"{path}: key 'size' must be a positive integer, got {size!r}")
    return index


def open_slice_source(slices_dir: str | os.PathLike,
                      on_corrupt: str = "fail") -> records.ShardedRecords | SkipCorrupt:
    """Random-access source over every record of the slices dir, in index order: record bytes that decode as a
    slice (on_corrupt="fail"), or a `SliceRecord` per item (on_corrupt="skip", see the module docstring)."""
    if on_corrupt not in ON_CORRUPT:
        raise ValueError(f"config key data.on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
    slices_dir = os.fspath(slices_dir)
    index = read_slice_index(slices_dir)
    source = records.ShardedRecords([os.path.join(slices_dir, s) for s in index["shards"]], check=decode_slice)
    if len(source) != index["num_records"]:
        raise ValueError(f"{os.path.join(slices_dir, INDEX_FILE)}: key 'num_records' is {index['num_records']}, "
                         f"but the shards hold {len(source)} records")
    return SkipCorrupt(source) if on_corrupt == "skip" else source


@dataclasses.dataclass(frozen=True)
class SliceRecord:
    """An item of a skipping source: the record bytes, and whether they stand in for a corrupt record."""
    data: bytes
    replaced: bool


class SkipCorrupt:
    """data.on_corrupt=skip: item i is record i, or when that is corrupt the next readable record after it (in
    index order, wrapping around), logged with the shard file and record index of the corrupt one."""

    def __init__(self, source: records.ShardedRecords):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> SliceRecord:
        try:
            return SliceRecord(self.source[index], replaced=False)
        except records.CorruptRecordError as corrupt:
            for offset in range(1, len(self.source)):
                stand_in = (index + offset) % len(self.source)
                try:
                    record = self.source[stand_in]
                except records.CorruptRecordError:
                    continue
                logging.warning("%s; data.on_corrupt=skip: record %d stands in for it", corrupt, stand_in)
                return SliceRecord(record, replaced=True)
            raise records.CorruptRecordError(f"{corrupt}; data.on_corrupt=skip found no readable record to stand "
                                             f"in for it") from corrupt


def decode_slice(record: bytes) -> tuple[np.ndarray, dict[str, Any]]:
    """(int16 HU [S, S], meta) of one record; a record that is not a square 2-D slice is an error."""
    hu, meta = records.decode_array(record)
    if hu.ndim != 2 or hu.shape[0] != hu.shape[1] or hu.dtype != np.int16:
        raise ValueError(f"slice record {meta.get('volume_id', '?')!r} z_index={meta.get('z_index', '?')}: "
                         f"expected int16 [S, S] HU, got {hu.dtype} {list(hu.shape)}")
    return hu, meta
