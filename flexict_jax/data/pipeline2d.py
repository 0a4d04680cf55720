"""Stage-1 (2D) Grain input pipeline: slice records -> z-scored, augmented multi-crop examples with iBOT masks.

The stream graph, host sharding and per-example RNG are `flexict_jax.data.grain_common`'s (docs/recipe.md §13 #6/#7):
example i depends only on (seed, i), global batch t is examples [t·B, (t+1)·B) whatever the number of hosts or
Grain workers, and a restored iterator state continues the same stream. This module adds the slice transform
(docs/recipe.md §5).

Stage 1.1 (`build_slices2d_hires_dataset`, docs/recipe.md §6) uses the same graph, but every batch has the resolution of
the training step it feeds. Contract: batch t of the stream is consumed by training step t, which holds when a
run starts at step 0 and, on resume, because the checkpoint restores the iterator state with the step. Example i
belongs to batch t = i // (global batch) and takes its resolution from `variants.variant_for_step(seed, t, ...)`,
the very draw the trainer makes for step t, so the resolution is a pure function of (seed, t) like the rest of
the example. Each batch carries its resolution index so the trainer can check it against its own draw.

Host cost is ~7-9 ms per example at the recipe sizes (384-px slices, 2x256 + 8x112 crops) with warm resize
caches and single-threaded BLAS; multi-threaded BLAS in every data process oversubscribes the cores (the crop
resizes are small matrix products), so launchers should export OPENBLAS_NUM_THREADS=1 (bench/bench_pipeline2d.py).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import grain
import ml_collections
import numpy as np

from flexict_jax import variants
from flexict_jax.data import grain_common, records, slice_source
from flexict_jax.data.crops2d import MultiCrop, resize_crops
from flexict_jax.data.intensity import IntensityAugment, normalize_hu
from flexict_jax.data.masking2d import IbotMasking
from flexict_jax.errors import ConfigError


class Stage1Transform(grain.transforms.MapWithIndex):
    """Record bytes of one slice + its global example index -> one training example (numpy only).

    Output: global_crops float32 [n_global, G, G, 1], local_crops float32 [n_local, L, L, 1],
    masks_p{p} bool [n_global, (G//p)**2] per patch size p, index int64 (the global example index); with a
    `gram_crop_size` Gg also gram_crops float32 [n_global, Gg, Gg, 1] (stage 1.1, docs/recipe.md §6); for a
    `slice_source.SliceRecord` also records_replaced int32 (data.on_corrupt=skip).
    """

    def __init__(self, *, seed: int, hu_window: tuple[float, float], intensity: IntensityAugment,
                 global_crops: MultiCrop, local_crops: MultiCrop, masking: IbotMasking,
                 patch_sizes: Sequence[int], gram_crop_size: int | None = None):
        self.seed = seed
        self.hu_window = hu_window
        self.intensity = intensity
        self.global_crops = global_crops
        self.local_crops = local_crops
        self.masking = masking
        self.patch_sizes = tuple(patch_sizes)
        self.gram_crop_size = gram_crop_size
        if gram_crop_size is not None:
            # Recipe §6: one RandomResizedCrop (and flip) at max(global, Gram) size, then a bicubic resize to
            # each size, so the Gram teacher sees the student's field of view at a higher resolution.
            self._view_crops = dataclasses.replace(global_crops, size=max(global_crops.size, gram_crop_size))

    def map_with_index(self, index: int, record: bytes | slice_source.SliceRecord) -> dict[str, np.ndarray]:
        # A skipping source (data.on_corrupt=skip) gives SliceRecords: the example then says whether it was
        # built from a stand-in for a corrupt record, so the trainer can count them.
        replaced = record.replaced if isinstance(record, slice_source.SliceRecord) else None
        try:
            hu, _ = slice_source.decode_slice(record if replaced is None else record.data)
        except ValueError as e:
            raise ValueError(f"stage-1 example {index} (seed {self.seed}): bad slice record: {e}") from e
        intensity_rng, global_rng, local_rng, *mask_rngs = grain_common.example_rngs(
            self.seed, index, 3 + len(self.patch_sizes))
        # Intensity augmentations run once per slice, before cropping, so all views share them (docs/recipe.md §5).
        image = self.intensity(normalize_hu(hu, self.hu_window), intensity_rng)
        example = {
            **self._global_views(image, global_rng),
            "local_crops": self.local_crops(image, local_rng)[..., None],
            "index": np.int64(index),
        }
        if replaced is not None:
            example["records_replaced"] = np.int32(replaced)
        for p, rng in zip(self.patch_sizes, mask_rngs):
            example[f"masks_p{p}"] = self.masking(rng, self.global_crops.n_crops, self.global_crops.size // p)
        return example

    def _global_views(self, image: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        if self.gram_crop_size is None:
            return {"global_crops": self.global_crops(image, rng)[..., None]}
        views = self._view_crops(image, rng)
        return {"global_crops": resize_crops(views, self.global_crops.size)[..., None],
                "gram_crops": resize_crops(views, self.gram_crop_size)[..., None]}


class Stage1HiresTransform(grain.transforms.MapWithIndex):
    """Stage 1.1: an example at the resolution of the training step its batch feeds (see the module docstring).

    Output: the `Stage1Transform` output of that resolution plus resolution_index int32.
    """

    def __init__(self, per_resolution: Sequence[Stage1Transform], *, resolution_for_step: Callable[[int], int],
                 global_batch_size: int):
        self.per_resolution = tuple(per_resolution)
        self.resolution_for_step = resolution_for_step
        self.global_batch_size = global_batch_size

    def map_with_index(self, index: int, record: bytes | slice_source.SliceRecord) -> dict[str, np.ndarray]:
        resolution = self.resolution_for_step(index // self.global_batch_size)
        example = self.per_resolution[resolution].map_with_index(index, record)
        example["resolution_index"] = np.int32(resolution)
        return example


def _resolution_for_step(step: int, *, seed: int, patch_sizes: Sequence[int], patch_size_probs: Sequence[float],
                         resolution_probs: Sequence[float]) -> int:
    # The trainer's own draw (flexict_jax.variants): data and step cannot disagree on a step's resolution.
    return variants.variant_for_step(seed, step, patch_sizes, patch_size_probs, resolution_probs).resolution_index


def _one_resolution_per_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Stacked per-example resolution indices [b] -> the batch's scalar (they agree by construction)."""
    resolution = batch["resolution_index"]
    if (resolution != resolution[0]).any():
        raise RuntimeError(f"a stage-1.1 batch mixes resolutions {sorted(set(resolution.tolist()))} "
                           f"(examples {batch['index'].tolist()}); batches must align with training steps")
    return {**batch, "resolution_index": np.asarray(resolution[0])}


def build_slices2d_dataset(data: ml_collections.ConfigDict, *, seed: int, batch_size: int,
                         patch_sizes: Sequence[int], process_index: int = 0,
                         process_count: int = 1, first_batch: int = 0) -> grain.IterDataset:
    """The infinite stage-1 stream of this process's batches (config `data`, docs/recipe.md §5).

    batch_size is the per-process batch (global // process_count). Each element is a dict of numpy arrays:
    global_crops float32 [b, n_global, G, G, 1], local_crops float32 [b, n_local, L, L, 1],
    masks_p{p} bool [b, n_global, (G//p)**2] for p in patch_sizes, index int64 [b], and with
    data.on_corrupt=skip records_replaced int32 [b] (1 where a corrupt record's stand-in was used).
    The stream starts at global batch `first_batch` (a resume, on any process count).
    """
    return grain_common.batched_stream(
        _slices(data), stage1_transform(data, seed=seed, patch_sizes=patch_sizes), data, seed=seed,
        batch_size=batch_size, process_index=process_index, process_count=process_count,
        first_batch=first_batch)


def build_slices2d_hires_dataset(data: ml_collections.ConfigDict, *, seed: int, batch_size: int,
                               patch_sizes: Sequence[int], patch_size_probs: Sequence[float],
                               resolutions: Sequence[Sequence[int]], resolution_probs: Sequence[float],
                               process_index: int = 0, process_count: int = 1,
                               first_batch: int = 0) -> grain.IterDataset:
    """The infinite stage-1.1 stream of this process's batches (docs/recipe.md §6), batch t at the resolution of step t.

    resolutions: (global, local, Gram) crop sizes (config data.resolutions); they replace data.global_crop_size
      and data.local_crop_size, which are not read. resolution_probs (data.resolution_probs), seed, patch_sizes
      and patch_size_probs must be the values the trainer draws its step variants with
      (`flexict_jax.variants.variant_for_step`), since batch t takes the resolution of that draw for step t.

    Each element is a dict of numpy arrays, with (G, L, Gg) = resolutions[r]:
    global_crops float32 [b, n_global, G, G, 1], gram_crops float32 [b, n_global, Gg, Gg, 1] (the same field
    of view as global_crops), local_crops float32 [b, n_local, L, L, 1], masks_p{p} bool [b, n_global, (G//p)**2]
    for p in patch_sizes, index int64 [b], and resolution_index int32 scalar r.
    The stream starts at global batch `first_batch` (a resume, on any process count).
    """
    if (len(patch_size_probs) != len(patch_sizes) or min(patch_size_probs) < 0
            or abs(sum(patch_size_probs) - 1.0) > 1e-6):
        raise ConfigError(f"config patch_size_probs {tuple(patch_size_probs)} must give one non-negative "
                         f"probability per patch size {tuple(patch_sizes)}, summing to 1")
    resolutions = _resolutions(resolutions, resolution_probs)
    per_resolution = [stage1_transform(data, seed=seed, patch_sizes=patch_sizes, resolution=r,
                                       resolution_key=f"data.resolutions[{i}]")
                      for i, r in enumerate(resolutions)]
    resolution_for_step = functools.partial(
        _resolution_for_step, seed=seed, patch_sizes=tuple(patch_sizes), patch_size_probs=tuple(patch_size_probs),
        resolution_probs=tuple(resolution_probs))
    transform = Stage1HiresTransform(per_resolution, resolution_for_step=resolution_for_step,
                                     global_batch_size=batch_size * process_count)
    return grain_common.batched_stream(
        _slices(data), transform, data, seed=seed, batch_size=batch_size, process_index=process_index,
        process_count=process_count, first_batch=first_batch, per_batch=_one_resolution_per_batch)


def _slices(data: ml_collections.ConfigDict) -> records.ShardedRecords | slice_source.SkipCorrupt:
    return slice_source.open_slice_source(grain_common.config_value(data, "dir"),
                                          str(grain_common.config_value(data, "on_corrupt")))


def stage1_transform(data: ml_collections.ConfigDict, *, seed: int, patch_sizes: Sequence[int],
                     resolution: tuple[int, int, int] | None = None,
                     resolution_key: str = "data.resolutions") -> Stage1Transform:
    """The per-example transform described by config `data`; bad values raise naming their config key.

    resolution: stage 1.1's (global, local, Gram) crop sizes, from config key `resolution_key`; None reads the
      crop sizes from data.global_crop_size and data.local_crop_size and makes no Gram crops.
    """
    if resolution is None:
        global_size = int(grain_common.config_value(data, "global_crop_size"))
        local_size = int(grain_common.config_value(data, "local_crop_size"))
        gram_size, size_keys = None, ("data.global_crop_size", "data.local_crop_size")
    else:
        global_size, local_size, gram_size = resolution
        size_keys = (resolution_key, resolution_key)
    return Stage1Transform(
        seed=seed,
        hu_window=grain_common.hu_window(data),
        intensity=grain_common.dataclass_from_config(
            IntensityAugment, grain_common.config_value(data, "intensity"), "data.intensity"),
        global_crops=_multi_crop(data, "global", global_size, size_keys[0]),
        local_crops=_multi_crop(data, "local", local_size, size_keys[1]),
        masking=grain_common.dataclass_from_config(IbotMasking, grain_common.config_value(data, "mask"),
                                                   "data.mask"),
        patch_sizes=grain_common.check_patch_sizes(patch_sizes, global_size, size_keys[0]),
        gram_crop_size=gram_size)


def _resolutions(resolutions: Sequence[Sequence[int]], probs: Sequence[float]) -> list[tuple[int, int, int]]:
    """Validated (global, local, Gram) triples of config data.resolutions, one per data.resolution_probs."""
    try:
        triples = [tuple(int(n) for n in r) for r in resolutions]
        probs = [float(p) for p in probs]
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config data.resolutions must be (global, local, Gram) size triples and "
                         f"data.resolution_probs numbers, got {resolutions!r} and {probs!r}") from e
    for i, triple in enumerate(triples):
        if len(triple) != 3 or min(triple) < 1:
            raise ConfigError(f"config data.resolutions[{i}] must be three positive sizes (global, local, Gram), "
                             f"got {resolutions[i]!r}")
    if not triples or len(probs) != len(triples):
        raise ConfigError(f"config data.resolution_probs {tuple(probs)} must give one probability per entry of "
                         f"data.resolutions ({len(triples)})")
    if min(probs) < 0 or abs(sum(probs) - 1.0) > 1e-6:
        raise ConfigError(f"config data.resolution_probs {tuple(probs)} must be non-negative and sum to 1")
    return triples


def _multi_crop(data: ml_collections.ConfigDict, kind: str, size: int, size_key: str) -> MultiCrop:
    try:
        return MultiCrop(n_crops=int(grain_common.config_value(data, f"n_{kind}_crops")),
                         size=size,
                         scale=grain_common.number_pair(grain_common.config_value(data, f"{kind}_crop_scale"),
                                                        f"data.{kind}_crop_scale"),
                         ratio=grain_common.number_pair(grain_common.config_value(data, "crop_ratio"),
                                                        "data.crop_ratio"),
                         hflip_prob=float(grain_common.config_value(data, "hflip_prob")))
    except ValueError as e:
        raise ValueError(f"{kind} crops (data.n_{kind}_crops, {size_key}, data.{kind}_crop_scale): "
                         f"{e}") from e
