"""Byte layout of the ArrayRecord records written by data_prep and read by the Grain pipelines.

A record is `MAGIC | uint32 header length | JSON header | raw C-order array bytes`. The header carries the
array dtype and shape plus free-form metadata (volume id, slice position, pixel spacing, ...), so a record
is self-describing and readable without the index. Compression is left to ArrayRecord (zstd per record).
"""
from __future__ import annotations

import json
import struct
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
