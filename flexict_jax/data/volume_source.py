"""Random access to the volumes of an ingested dataset (`data_prep.ingest`), for the 3-D Grain pipelines.

Item `row` of a `VolumeSource` is manifest row `row` as a `Volume`: its id, shape, per-volume HU statistics and
a reader for any box of voxels. Nothing is read until a crop asks for its box
(`volume.read(start, stop)` -> `store[z0:z1, y0:y1, x0:x1].read().result()`), so a sample costs the voxels its
crops cover, not the whole volume. TensorStore handles are opened lazily in each process (Grain workers get a
pickled source without handles) and kept in a small per-process cache.

The z-score of stages 2-3 uses the statistics of the whole volume (docs/recipe.md §7). Reading whole volumes per sample
would defeat region reads, and a per-worker cache would still read every volume once per worker, so the
statistics are computed once, offline, into a side-car `DATASET_DIR/stats.json` (`python -m
data_prep.volume_stats --dataset DATASET_DIR`):

    {"format": "flexict_volume_stats/1",
     "windows": {"-1000,1000": {"<volume id>": {"source_sha256": ..., "count": ..., "mean": ..., "std": ...,
                                               "min": ..., "max": ...}, ...}}}

keyed by the HU window (the clamp changes every statistic) and checked against the manifest's source_sha256,
so statistics of a different or re-ingested volume are never used.
"""
from __future__ import annotations

import collections
import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts

from flexict_jax.data import volume_store
from flexict_jax.data.intensity import HuStats, hu_stats

STATS_NAME = "stats.json"
STATS_FORMAT = "flexict_volume_stats/1"
STATS_KEYS = ("source_sha256", "count", "mean", "std", "min", "max")
# Open TensorStore handles kept per process; each holds metadata only (no chunk cache), so this bounds open
# files rather than memory.
_OPEN_STORES = 64


def window_key(window: tuple[float, float]) -> str:
    """The stats.json key of an HU window, e.g. "-1000,1000"."""
    return f"{float(window[0]):g},{float(window[1]):g}"


def stats_command(dataset_dir: str | os.PathLike, window: tuple[float, float]) -> str:
    return f"python -m data_prep.volume_stats --dataset {dataset_dir} --hu-window={window_key(window)}"


def read_stats_file(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed stats.json (format checked); `{"format": ..., "windows": {}}` when the file does not exist."""
    path = Path(path)
    if not path.exists():
        return {"format": STATS_FORMAT, "windows": {}}
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from e
    if not isinstance(document, dict) or document.get("format") != STATS_FORMAT \
            or not isinstance(document.get("windows"), dict):
        raise ValueError(f"{path}: not a {STATS_FORMAT} file (expected keys 'format' and 'windows')")
    return document


def read_volume_stats(dataset_dir: str | os.PathLike, window: tuple[float, float],
                      entries: list[dict]) -> list[HuStats]:
    """The statistics of every manifest entry for `window`, in manifest order; missing or stale ones are errors."""
    path = Path(dataset_dir) / STATS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; compute the per-volume HU statistics with "
                                f"`{stats_command(dataset_dir, window)}`")
    section = read_stats_file(path)["windows"].get(window_key(window), {})
    out = []
    for entry in entries:
        record = section.get(entry["id"])
        if record is None or any(k not in record for k in STATS_KEYS):
            raise ValueError(f"{path}: no statistics for volume {entry['id']!r} with HU window "
                             f"{window_key(window)}; run `{stats_command(dataset_dir, window)}`")
        if record["source_sha256"] != entry["source_sha256"]:
            raise ValueError(f"{path}: statistics of volume {entry['id']!r} were computed for other content "
                             f"(source_sha256 differs from the manifest); run `{stats_command(dataset_dir, window)}`")
        out.append(HuStats(mean=float(record["mean"]), std=float(record["std"]), min=float(record["min"]),
                           max=float(record["max"])))
    return out


class Volume:
    """One volume: manifest row, id, shape (z, y, x), HU statistics and region reads of its int16 HU."""

    def __init__(self, row: int, volume_id: str, shape: tuple[int, int, int], stats: HuStats,
                 array: ts.TensorStore | np.ndarray, path: str = ""):
        self.row = row
        self.volume_id = volume_id
        self.shape = tuple(int(n) for n in shape)
        self.stats = stats
        self.path = path
        self._array = array

    @classmethod
    def from_array(cls, hu: np.ndarray, window: tuple[float, float], row: int = 0,
                   volume_id: str = "in-memory") -> Volume:
        """A volume held in memory (tests, the naive benchmark path), with statistics of its own voxels."""
        hu = np.asarray(hu)
        if hu.ndim != 3:
            raise ValueError(f"volume {volume_id!r}: expected a (z, y, x) array, got shape {hu.shape}")
        return cls(row, volume_id, hu.shape, hu_stats(hu, window), hu)

    def read(self, start: tuple[int, int, int], stop: tuple[int, int, int]) -> np.ndarray:
        """int16 HU of voxels [start, stop) (z, y, x); the box must lie inside the volume."""
        if any(not 0 <= a < b <= n for a, b, n in zip(start, stop, self.shape)):
            raise ValueError(f"volume {self.volume_id!r}: box {tuple(start)}..{tuple(stop)} is not inside its "
                             f"shape {self.shape}")
        region = self._array[tuple(slice(a, b) for a, b in zip(start, stop))]
        if isinstance(region, ts.TensorStore):
            region = region.read().result()
        return np.asarray(region)


class VolumeSource:
    """Grain random-access source: item `row` = manifest row `row` of `dataset_dir` as a lazily read `Volume`."""

    def __init__(self, dataset_dir: str | os.PathLike, window: tuple[float, float]):
        dataset_dir = Path(dataset_dir)
        if not dataset_dir.is_dir():
            raise FileNotFoundError(f"dataset dir {str(dataset_dir)!r} does not exist (config key data.dir)")
        self.dataset_dir = dataset_dir
        self.entries = volume_store.read_manifest(dataset_dir)
        if not self.entries:
            raise ValueError(f"{dataset_dir / volume_store.MANIFEST_NAME}: lists no volume")
        for entry in self.entries:
            shape = entry["shape"]
            if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(n, int) and n > 0 for n in shape)):
                raise ValueError(f"{dataset_dir / volume_store.MANIFEST_NAME}: volume {entry['id']!r} has shape "
                                 f"{shape!r}, expected three positive integers (z, y, x)")
        volume_store.check_one_geometry(dataset_dir, self.entries)  # a crop of N voxels covers the same mm in all
        self.stats = read_volume_stats(dataset_dir, window, self.entries)
        self._stores: collections.OrderedDict[int, ts.TensorStore] = collections.OrderedDict()
        self._lock = threading.Lock()  # Grain's read threads share the source

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, row: int) -> Volume:
        entry = self.entries[row]
        path = str(self.dataset_dir / entry["path"])
        return Volume(row, entry["id"], tuple(entry["shape"]), self.stats[row], self._store(row, path), path)

    def _store(self, row: int, path: str) -> ts.TensorStore:
        with self._lock:
            store = self._stores.pop(row, None)
        if store is None:
            store = volume_store.open_volume(path)
            shape = tuple(int(n) for n in store.shape)
            if shape != tuple(self.entries[row]["shape"]):
                raise ValueError(f"{path}: array shape {shape} differs from its manifest shape "
                                 f"{tuple(self.entries[row]['shape'])}")
        with self._lock:
            self._stores[row] = store  # most recently used last
            if len(self._stores) > _OPEN_STORES:
                self._stores.popitem(last=False)
        return store

    def __getstate__(self) -> dict:
        # Grain pickles the source into each worker; every process opens its own handles.
        return {k: v for k, v in self.__dict__.items() if k not in ("_stores", "_lock")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _stores=collections.OrderedDict(), _lock=threading.Lock())

    def __repr__(self) -> str:
        return f"VolumeSource({str(self.dataset_dir)!r}, {len(self)} volumes)"
