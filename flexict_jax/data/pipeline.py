"""Stage-1 (2D) Grain input pipeline: slice records -> z-scored, augmented multi-crop examples with iBOT masks.

Graph (recipe §5, §13 #6/#7):

    ArrayRecord slices -> shuffle(seed), a new permutation every epoch -> repeat(None)
      -> per-example transform keyed by (seed, global example index)
      -> this host's rows of every global batch -> batch(b) -> to_iter_dataset -> mp_prefetch

Example i of the infinite shuffled stream depends only on (seed, i), and global batch t is examples
[t·B, (t+1)·B) of that stream whatever the number of hosts or Grain workers. So the assembled global batch
is the same for any process count, and resuming from a saved iterator state continues the same stream.

Host cost is ~7-9 ms per example at the recipe sizes (384-px slices, 2x256 + 8x112 crops) with warm resize
caches and single-threaded BLAS; multi-threaded BLAS in every data process oversubscribes the cores (the crop
resizes are small matrix products), so launchers should export OPENBLAS_NUM_THREADS=1 (bench/bench_pipeline2d.py).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from flexict_jax.data import slice_source
from flexict_jax.data.crops2d import MultiCrop
from flexict_jax.data.intensity import IntensityAugment, normalize_hu
from flexict_jax.data.masking import IbotMasking


class Stage1Transform(grain.transforms.MapWithIndex):
    """Record bytes of one slice + its global example index -> one training example (numpy only).

    Output: global_crops float32 [n_global, G, G, 1], local_crops float32 [n_local, L, L, 1],
    masks_p{p} bool [n_global, (G//p)**2] per patch size p, index int64 (the global example index).
    """

    def __init__(self, *, seed: int, hu_window: tuple[float, float], intensity: IntensityAugment,
                 global_crops: MultiCrop, local_crops: MultiCrop, masking: IbotMasking,
                 patch_sizes: Sequence[int]):
        self.seed = seed
        self.hu_window = hu_window
        self.intensity = intensity
        self.global_crops = global_crops
        self.local_crops = local_crops
        self.masking = masking
        self.patch_sizes = tuple(patch_sizes)

    def map_with_index(self, index: int, record: bytes) -> dict[str, np.ndarray]:
        try:
            hu, _ = slice_source.decode_slice(record)
        except ValueError as e:
            raise ValueError(f"stage-1 example {index} (seed {self.seed}): bad slice record: {e}") from e
        # One independent stream per component, so e.g. changing the number of local crops leaves the global
        # crops and masks of every example unchanged (recipe §13 #7: randomness from (seed, index) only).
        streams = np.random.SeedSequence([self.seed, index]).spawn(3 + len(self.patch_sizes))
        intensity_rng, global_rng, local_rng, *mask_rngs = (np.random.default_rng(s) for s in streams)
        # Intensity augmentations run once per slice, before cropping, so all views share them (recipe §5).
        image = self.intensity(normalize_hu(hu, self.hu_window), intensity_rng)
        example = {
            "global_crops": self.global_crops(image, global_rng)[..., None],
            "local_crops": self.local_crops(image, local_rng)[..., None],
            "index": np.int64(index),
        }
        for p, rng in zip(self.patch_sizes, mask_rngs):
            example[f"masks_p{p}"] = self.masking(rng, self.global_crops.n_crops, self.global_crops.size // p)
        return example


class HostBatchShard(grain.MapDataset):
    """This process's rows of every global batch, as contiguous blocks.

    Global batch t is parent elements [t·B, (t+1)·B), B = batch_size·process_count; process p gets rows
    [p·b, (p+1)·b) of it. Concatenating the process batches in process order therefore rebuilds the global
    batch (`ds[p::n]` would interleave instead, so the global batch would depend on the process count).
    """

    def __init__(self, parent: grain.MapDataset, *, batch_size: int, process_index: int, process_count: int):
        super().__init__(parent)
        self._batch_size = batch_size
        self._process_index = process_index
        self._process_count = process_count

    def __len__(self) -> int:
        global_batch = self._batch_size * self._process_count
        return len(self._parent) // global_batch * self._batch_size

    def __str__(self) -> str:
        return f"HostBatchShard(batch_size={self._batch_size}, process {self._process_index}/{self._process_count})"

    def _parent_index(self, index: int) -> int:
        step, row = divmod(index, self._batch_size)
        return (step * self._process_count + self._process_index) * self._batch_size + row

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._parent_index(index)]

    def _getitems(self, indices: Sequence[int]):
        return self._parent._getitems([self._parent_index(i) for i in indices])  # pylint: disable=protected-access


def build_stage1_dataset(data: ml_collections.ConfigDict, *, seed: int, batch_size: int,
                         patch_sizes: Sequence[int], process_index: int = 0,
                         process_count: int = 1) -> grain.IterDataset:
    """The infinite stage-1 stream of this process's batches (config `data`, recipe §5).

    batch_size is the per-process batch (global // process_count). Each element is a dict of numpy arrays:
    global_crops float32 [b, n_global, G, G, 1], local_crops float32 [b, n_local, L, L, 1],
    masks_p{p} bool [b, n_global, (G//p)**2] for p in patch_sizes, index int64 [b].
    `iter(ds)` supports get_state()/set_state() for checkpointing.
    """
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    if batch_size < 1:
        raise ValueError(f"per-process batch_size must be positive, got {batch_size}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is outside [0, process_count={process_count})")
    transform = stage1_transform(data, seed=seed, patch_sizes=patch_sizes)
    source = slice_source.open_slice_source(_key(data, "dir", "data"))

    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)  # reshuffled every epoch
    ds = ds.map_with_index(transform)  # before host sharding, so the index is the global example index
    ds = HostBatchShard(ds, batch_size=batch_size, process_index=process_index, process_count=process_count)
    ds = ds.batch(batch_size, drop_remainder=True)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=int(_key(data, "read_threads", "data")),
                                              prefetch_buffer_size=int(_key(data, "prefetch_buffer_size", "data"))))
    num_workers = int(_key(data, "num_workers", "data"))
    if num_workers > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=num_workers, per_worker_buffer_size=int(_key(data, "worker_buffer_size", "data"))))
    return ds


def stage1_transform(data: ml_collections.ConfigDict, *, seed: int, patch_sizes: Sequence[int]) -> Stage1Transform:
    """The per-example transform described by config `data`; bad values raise naming their config key."""
    global_size = int(_key(data, "global_crop_size", "data"))
    patch_sizes = tuple(int(p) for p in patch_sizes)
    if not patch_sizes or any(p < 1 or global_size // p < 1 for p in patch_sizes):
        raise ValueError(f"patch_sizes {patch_sizes} must be positive and at most data.global_crop_size "
                         f"({global_size})")
    hu_window = _pair(_key(data, "hu_window", "data"), "data.hu_window")
    if not hu_window[0] < hu_window[1]:
        raise ValueError(f"data.hu_window must satisfy low < high, got {hu_window}")
    return Stage1Transform(
        seed=seed,
        hu_window=hu_window,
        intensity=_dataclass_from_config(IntensityAugment, _key(data, "intensity", "data"), "data.intensity"),
        global_crops=_multi_crop(data, "global"),
        local_crops=_multi_crop(data, "local"),
        masking=_dataclass_from_config(IbotMasking, _key(data, "mask", "data"), "data.mask"),
        patch_sizes=patch_sizes)


def _multi_crop(data: ml_collections.ConfigDict, kind: str) -> MultiCrop:
    try:
        return MultiCrop(n_crops=int(_key(data, f"n_{kind}_crops", "data")),
                         size=int(_key(data, f"{kind}_crop_size", "data")),
                         scale=_pair(_key(data, f"{kind}_crop_scale", "data"), f"data.{kind}_crop_scale"),
                         ratio=_pair(_key(data, "crop_ratio", "data"), "data.crop_ratio"),
                         hflip_prob=float(_key(data, "hflip_prob", "data")))
    except ValueError as e:
        raise ValueError(f"{kind} crops (data.n_{kind}_crops, data.{kind}_crop_size, data.{kind}_crop_scale): "
                         f"{e}") from e


def _key(config: Mapping[str, Any], key: str, prefix: str) -> Any:
    if key not in config or config[key] is None:
        raise KeyError(f"config key {prefix}.{key} is missing")
    return config[key]


def _pair(value: Any, name: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config key {name} must be a pair of numbers, got {value!r}") from e
    return lo, hi


def _dataclass_from_config(cls: type, config: Mapping[str, Any], prefix: str):
    """cls(**config), every field required, unknown keys rejected; tuple-valued fields are number pairs."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(config.keys()) - set(fields))
    if unknown:
        raise KeyError(f"config {prefix} has unknown key(s) {unknown}; known: {sorted(fields)}")
    kwargs = {}
    for name, field in fields.items():
        value = _key(config, name, prefix)
        kwargs[name] = _pair(value, f"{prefix}.{name}") if isinstance(field.default, tuple) else float(value)
    return cls(**kwargs)
