"""What every FlexiCT Grain pipeline shares: the stream graph, host sharding, per-example RNG, config checks.

Graph (docs/recipe.md §13 #6/#7):

    random-access source -> shuffle(seed), a new permutation every epoch -> repeat(None)
      -> per-example transform keyed by (seed, global example index)
      -> this host's rows of every global batch -> batch(b) [-> per-batch map] -> to_iter_dataset -> mp_prefetch

Example i of the infinite shuffled stream depends only on (seed, i), and global batch t is examples
[t·B, (t+1)·B) of that stream whatever the number of hosts or Grain workers. So the assembled global batch
is the same for any process count, and a stream started at global batch t (`first_batch`, what a resume
passes: the trainer saves the number of global batches consumed, not a per-host iterator state) continues it on
any number of hosts.
"""
from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from flexict_jax.errors import ConfigError


def example_rngs(seed: int, index: int, count: int) -> list[np.random.Generator]:
    """`count` independent generators for example `index` of the stream seeded by `seed`.

    One stream per component of an example, so e.g. changing the number of local crops leaves the global crops
    and masks of every example unchanged (docs/recipe.md §13 #7: randomness from (seed, index) only).
    """
    return [np.random.default_rng(s) for s in np.random.SeedSequence([seed, index]).spawn(count)]


def check_stream_args(seed: int, batch_size: int, process_index: int, process_count: int) -> None:
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    if batch_size < 1:
        raise ValueError(f"per-process batch_size must be positive, got {batch_size}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is outside [0, process_count={process_count})")


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


def batched_stream(source: Any, transform: grain.transforms.MapWithIndex, data: Mapping[str, Any], *, seed: int,
                   batch_size: int, process_index: int, process_count: int, first_batch: int = 0,
                   per_batch: Callable[[dict], dict] | None = None) -> grain.IterDataset:
    """The graph of the module docstring over a random-access `source` (`__len__`, `__getitem__`, picklable),
    from global batch `first_batch` on.

    Reads data.read_threads, data.prefetch_buffer_size, data.num_workers and data.worker_buffer_size.
    """
    check_stream_args(seed, batch_size, process_index, process_count)
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)  # reshuffled every epoch
    ds = ds.map_with_index(transform)  # before host sharding, so the index is the global example index
    ds = HostBatchShard(ds, batch_size=batch_size, process_index=process_index, process_count=process_count)
    ds = ds.batch(batch_size, drop_remainder=True)
    if first_batch:
        if first_batch < 0:
            raise ValueError(f"first_batch must be non-negative, got {first_batch}")
        ds = ds[first_batch:]  # a lazy index shift: element t of the slice is global batch first_batch + t
    if per_batch is not None:
        ds = ds.map(per_batch)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=int(config_value(data, "read_threads")),
                                              prefetch_buffer_size=int(config_value(data, "prefetch_buffer_size"))))
    num_workers = int(config_value(data, "num_workers"))
    if num_workers > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=num_workers, per_worker_buffer_size=int(config_value(data, "worker_buffer_size"))))
    return ds


def config_value(config: Mapping[str, Any], key: str, prefix: str = "data") -> Any:
    """config[key]; a missing or unset key raises ConfigError naming `prefix.key`."""
    if key not in config or config[key] is None:
        raise ConfigError(f"config key {prefix}.{key} is missing")
    return config[key]


def number_pair(value: Any, name: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config key {name} must be a pair of numbers, got {value!r}") from e
    return lo, hi


def number(value: Any, name: str) -> float:
    """`value` as a float; anything else is an error naming config key `name`."""
    try:
        return float(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config key {name} must be a number, got {value!r}") from e


def integer(value: Any, name: str) -> int:
    """`value` as an int; a bool or a number with a fractional part is an error naming config key `name`."""
    try:
        whole = not isinstance(value, bool) and float(value).is_integer()
    except (TypeError, ValueError):
        whole = False
    if not whole:
        raise ConfigError(f"config key {name} must be an integer, got {value!r}")
    return int(value)


def boolean(value: Any, name: str) -> bool:
    """`value` as a bool; anything but True/False is an error naming config key `name`."""
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"config key {name} must be True or False, got {value!r}")
    return bool(value)


def dataclass_from_config(cls: type, config: Mapping[str, Any], prefix: str):
    """cls(**config), every field required, unknown keys rejected, values converted to the field's type.

    Field types: tuple (a pair of numbers), bool, int, str, or float (anything else).
    """
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(config.keys()) - set(fields))
    if unknown:
        raise ConfigError(f"config {prefix} has unknown key(s) {unknown}; known: {sorted(fields)}")
    kwargs = {}
    for name in fields:
        value, hint, key = config_value(config, name, prefix), hints[name], f"{prefix}.{name}"
        if typing.get_origin(hint) is tuple:
            kwargs[name] = number_pair(value, key)
        elif hint is bool:
            kwargs[name] = boolean(value, key)
        elif hint is int:
            kwargs[name] = integer(value, key)
        elif hint is str:
            kwargs[name] = str(value)
        else:
            kwargs[name] = number(value, key)
    return cls(**kwargs)


def check_patch_sizes(patch_sizes: Sequence[int], global_size: int, size_key: str) -> tuple[int, ...]:
    """The patch sizes as ints; each must be positive and at most the global crop size (config `size_key`)."""
    patch_sizes = tuple(int(p) for p in patch_sizes)
    if not patch_sizes or any(p < 1 or global_size // p < 1 for p in patch_sizes):
        raise ConfigError(f"config patch_sizes {patch_sizes} must be positive and at most the global crop size "
                         f"({size_key} = {global_size})")
    return patch_sizes


def hu_window(data: Mapping[str, Any]) -> tuple[float, float]:
    """Config data.hu_window as (low, high) HU, low < high."""
    window = number_pair(config_value(data, "hu_window"), "data.hu_window")
    if not window[0] < window[1]:
        raise ConfigError(f"config key data.hu_window must satisfy low < high, got {window}")
    return window
