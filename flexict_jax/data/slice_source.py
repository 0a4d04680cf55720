"""Stage-1 slice records: validate a slices dir written by `python -m data_prep.slices` and open it for Grain.

A slices dir holds `index.json` plus ArrayRecord shards (`group_size:1`); every record is
`records.encode_array(int16 HU [S, S], meta)`. Reading goes through `grain.sources.ArrayRecordDataSource`, which
pickles into Grain workers and reopens the shards there.
"""
from __future__ import annotations

import json
import os
from typing import Any

import grain
import numpy as np

from flexict_jax.data import records

SLICES_FORMAT = "flexict_slices/1"
INDEX_FILE = "index.json"


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


def open_slice_source(slices_dir: str | os.PathLike) -> grain.sources.ArrayRecordDataSource:
    """Random-access source over every record of the slices dir, in index order."""
    slices_dir = os.fspath(slices_dir)
    index = read_slice_index(slices_dir)
    source = grain.sources.ArrayRecordDataSource([os.path.join(slices_dir, s) for s in index["shards"]])
    if len(source) != index["num_records"]:
        raise ValueError(f"{os.path.join(slices_dir, INDEX_FILE)}: key 'num_records' is {index['num_records']}, "
                         f"but the shards hold {len(source)} records")
    return source


def decode_slice(record: bytes) -> tuple[np.ndarray, dict[str, Any]]:
    """(int16 HU [S, S], meta) of one record; a record that is not a square 2-D slice is an error."""
    hu, meta = records.decode_array(record)
    if hu.ndim != 2 or hu.shape[0] != hu.shape[1] or hu.dtype != np.int16:
        raise ValueError(f"slice record {meta.get('volume_id', '?')!r} z_index={meta.get('z_index', '?')}: "
                         f"expected int16 [S, S] HU, got {hu.dtype} {list(hu.shape)}")
    return hu, meta
