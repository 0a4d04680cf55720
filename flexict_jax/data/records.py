"""Byte layout of the ArrayRecord records written by data_prep and read by the Grain pipelines.

A record is `MAGIC | uint32 header length | JSON header | raw C-order array bytes`. The header carries the
array dtype and shape plus free-form metadata (volume id, slice position, pixel spacing, ...), so a record
is self-describing and readable without the index. Compression is left to ArrayRecord (zstd per record).
"""
from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import Any

import numpy as np

MAGIC = b"FXR1"
_HEADER_LEN = struct.Struct("<I")


def encode_array(array: np.ndarray, meta: dict[str, Any]) -> bytes:
    array = np.ascontiguousarray(array)
    header = dict(meta, dtype=array.dtype.str, shape=list(array.shape))
    header_bytes = json.dumps(header, sort_keys=True).encode()
    return MAGIC + _HEADER_LEN.pack(len(header_bytes)) + header_bytes + array.tobytes()


def decode_array(record: bytes) -> tuple[np.ndarray, dict[str, Any]]:
    if record[:4] != MAGIC:
        raise ValueError(f"not a flexict_jax record (magic {record[:4]!r}, expected {MAGIC!r})")
    (n,) = _HEADER_LEN.unpack_from(record, 4)
    start = 4 + _HEADER_LEN.size
    meta = json.loads(record[start:start + n])
    dtype, shape = np.dtype(meta.pop("dtype")), tuple(meta.pop("shape"))
    payload = memoryview(record)[start + n:]
    if len(payload) != dtype.itemsize * int(np.prod(shape)):
        raise ValueError(f"record payload has {len(payload)} bytes, header says {shape} {dtype}")
    return np.frombuffer(payload, dtype=dtype).reshape(shape), meta


class CorruptRecordError(RuntimeError):
    """A record (or a whole shard) that cannot be read or decoded; the message names the shard file and record."""


class ShardedRecords:
    """Random access over the records of ArrayRecord shards, in shard order (a Grain source: `__len__`,
    `__getitem__`, picklable), whose read errors name the shard file and the record index within it.

    `check(record)` runs on every record read (e.g. a decode of its header), so a record whose bytes pass
    ArrayRecord's checksums but do not decode is reported the same way. A shard that cannot be opened at all
    fails here, at construction: without its record count the global record numbering is unknown.
    """

    def __init__(self, paths: list[str], check: Callable[[bytes], object] | None = None):
        import grain  # only the training pipelines need it

        self.paths = list(paths)
        self.check = check
        self._shards = []
        for path in self.paths:
            try:
                self._shards.append(grain.sources.ArrayRecordDataSource([path]))
            except Exception as e:  # Riegeli reports a damaged footer or header as RuntimeError
                raise CorruptRecordError(f"{path}: corrupt ArrayRecord shard, cannot be opened ({e}); rebuild it "
                                         f"or restore it from a copy") from e
        self._starts = np.cumsum([0] + [len(s) for s in self._shards])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """(shard number, record index within that shard) of global record `index`."""
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        return shard, index - int(self._starts[shard])

    def __getitem__(self, index: int) -> bytes:
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} is outside [0, {len(self)})")
        shard, position = self.locate(index)
        path = self.paths[shard]
        try:
            record = self._shards[shard][position]
            if self.check is not None:
                self.check(record)
        except Exception as e:  # Riegeli hash mismatch (RuntimeError), bad header or payload (ValueError)
            raise CorruptRecordError(f"{path}: record {position} (record {index} of {len(self)}) is corrupt: "
                                     f"{e}") from e
        return record
