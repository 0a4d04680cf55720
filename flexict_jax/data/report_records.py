"""Stage-3 report records on disk: the record codec, `index.json` and the per-split OSL pool.

A reports directory (written by `python -m data_prep.reports`) holds ArrayRecord shards of report records (see
`report_rules` for their fields), `index.json` and `positive_pool.json`.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from flexict_jax.data import records

REPORTS_FORMAT = "flexict_reports/1"
INDEX_FILE = "index.json"
POOL_FILE = "positive_pool.json"


def encode_report(record: Mapping[str, Any]) -> bytes:
    """One report record in the project's record layout (`records.encode_array`, an empty payload)."""
    return records.encode_array(np.zeros(0, np.uint8), dict(record))


def decode_report(record: bytes) -> dict[str, Any]:
    _, meta = records.decode_array(record)
    missing = [k for k in ("volume_id", "findings", "findings_sections", "sections") if k not in meta]
    if missing:
        raise ValueError(f"report record {meta.get('volume_id', '?')!r}: missing keys {missing}")
    return meta


def read_report_index(reports_dir: str | os.PathLike) -> dict[str, Any]:
    """Loads and checks `REPORTS_DIR/index.json` (written by `python -m data_prep.reports`)."""
    path = os.path.join(os.fspath(reports_dir), INDEX_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing; a reports dir is written by `python -m data_prep.reports`")
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(index, dict) or index.get("format") != REPORTS_FORMAT:
        raise ValueError(f"{path}: key 'format' is not {REPORTS_FORMAT!r}")
    for key in ("shards", "num_records", "volumes"):
        if key not in index:
            raise ValueError(f"{path}: missing key {key!r}")
    missing = [s for s in index["shards"] if not os.path.isfile(os.path.join(os.fspath(reports_dir), s))]
    if missing:
        raise FileNotFoundError(f"{path}: key 'shards' lists missing file(s), e.g. {missing[0]!r}")
    return index


def open_report_source(reports_dir: str | os.PathLike) -> records.ShardedRecords:
    """Random-access Grain source over the report records (bytes; `decode_report` each), in index order; a
    corrupt record is a `records.CorruptRecordError` naming its shard file and record index."""
    index = read_report_index(reports_dir)
    source = records.ShardedRecords([os.path.join(os.fspath(reports_dir), s) for s in index["shards"]],
                                    check=decode_report)
    if len(source) != index["num_records"]:
        raise ValueError(f"{os.path.join(os.fspath(reports_dir), INDEX_FILE)}: key 'num_records' is "
                         f"{index['num_records']}, but the shards hold {len(source)} records")
    return source


def split_key(split: str | None) -> str:
    """Key of a split in positive_pool.json (records without a split share the key "")."""
    return split or ""


def read_positive_pool(reports_dir: str | os.PathLike, split: str | None) -> dict[str, list[str]]:
    """The OSL pool of one split: section -> positive findings of that split's records."""
    path = os.path.join(os.fspath(reports_dir), POOL_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            pools = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the OSL positive pool ({e})") from e
    if split_key(split) not in pools:
        raise ValueError(f"{path}: no pool for split {split!r} (has {sorted(pools)})")
    return pools[split_key(split)]
