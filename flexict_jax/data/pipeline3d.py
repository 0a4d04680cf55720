"""Stage-2 (3D) Grain input pipeline, and the stage-3 image views: ingested volumes -> multi-crop examples.

The stream is the shared graph of `grain_common` over a `VolumeSource` (one element per manifest row): volumes
reshuffled every epoch, example i keyed by (seed, i), this host's rows of every global batch, Grain workers.
Per example (docs/recipe.md §7): clamp + z-score with the volume's own statistics, virtual padding to >= pad_to with the
minimum, one draw of the intensity augmentation, 2 global crops (independent random size per axis in
global_crop_extent, resized to G³) of which `flip_global_crops` get RandAxisFlip, 8 local crops (local_crop_extent
-> L³, every one flipped with flip_prob), and RCC-3D iBOT masks per patch size. Only the voxels each crop needs
are read (`crops3d`). With `view_region` > 0 (not the recipe: the CPU demo, docs/evaluation.md "Stage 2 on view
regions"), every crop of an example is drawn inside one random cube of that many voxels per axis, as every 2D crop
lies in one slice, instead of anywhere in the volume.

Stage 3 (docs/recipe.md §8) uses the same transform with `configs.stage3.STAGE3_IMAGE_VIEWS` applied to its data
config: one deterministic centre G³ crop, locals of [20, 40] voxels, no intensity augmentation and no flips.

Host cost at the recipe sizes (2 x 160³ + 8 x 80³, masks for p16 and p8), on the real test CTs at 2 mm (1-6 M
voxels each), single-threaded BLAS: ~70 ms per example on one core, 3x faster than upstream's per-sample NIfTI
load + resample (bench/bench_pipeline3d.py). Most of it is the trilinear resize to 2 x 160³; launchers should
export OPENBLAS_NUM_THREADS=1 as for stage 1.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from flexict_jax.data import grain_common
from flexict_jax.data.crops3d import PaddedVolume, VolumeCrops, random_box
from flexict_jax.data.grain_common import config_value
from flexict_jax.data.intensity import IntensityAugment
from flexict_jax.data.masking3d import RccMasking
from flexict_jax.data.volume_source import Volume, VolumeSource
from flexict_jax.errors import ConfigError


class VolumeViewsTransform(grain.transforms.MapWithIndex):
    """A `Volume` + its global example index -> one training example (numpy only).

    Output: global_crops float32 [n_global, G, G, G, 1], local_crops float32 [n_local, L, L, L, 1] (axes z, y, x
    of the LPS volume: superior, posterior, left), masks_p{p} bool [n_global, (G//p)**3] per patch size p (tokens
    in z, y, x order), index int64 (the global example index), volume_row int64 (the manifest row).
    """

    def __init__(self, *, seed: int, hu_window: tuple[float, float], pad_to: int,
                 intensity: IntensityAugment | None, global_crops: VolumeCrops, local_crops: VolumeCrops,
                 masking: RccMasking, patch_sizes: Sequence[int], view_region: int = 0):
        self.seed = seed
        self.hu_window = hu_window
        self.pad_to = pad_to
        self.intensity = intensity
        self.global_crops = global_crops
        self.local_crops = local_crops
        self.masking = masking
        self.patch_sizes = tuple(patch_sizes)
        self.view_region = view_region

    def map_with_index(self, index: int, volume: Volume) -> dict[str, np.ndarray]:
        # The region's stream comes last, so the other streams (and the recipe's examples) do not depend on it.
        intensity_rng, noise_rng, global_rng, local_rng, *mask_rngs, region_rng = grain_common.example_rngs(
            self.seed, index, 5 + len(self.patch_sizes))
        # One draw per example: every crop sees the same augmented volume, as upstream's whole-volume transforms.
        augment = None if self.intensity is None else self.intensity.draw(intensity_rng, 3)
        padded = PaddedVolume(volume, self.hu_window, self.pad_to, augment, noise_rng)
        region = random_box(region_rng, padded.shape, (self.view_region,) * 2) if self.view_region else None
        try:
            global_crops = self.global_crops(padded, global_rng, region)
            local_crops = self.local_crops(padded, local_rng, region)
        except Exception as e:  # a corrupt chunk or a missing file: name the example and the volume
            raise ValueError(f"3-D example {index} (seed {self.seed}): volume {volume.volume_id!r} "
                             f"(manifest row {volume.row}, {volume.path or 'in memory'}): {e}") from e
        example = {
            "global_crops": global_crops[..., None],
            "local_crops": local_crops[..., None],
            "index": np.int64(index),
            "volume_row": np.int64(volume.row),
        }
        for p, rng in zip(self.patch_sizes, mask_rngs):
            example[f"masks_p{p}"] = self.masking(rng, self.global_crops.n_crops, self.global_crops.size // p)
        return example


def build_volumes3d_dataset(data: ml_collections.ConfigDict, *, seed: int, batch_size: int,
                         patch_sizes: Sequence[int], process_index: int = 0,
                         process_count: int = 1, first_batch: int = 0) -> grain.IterDataset:
    """The infinite stage-2 stream of this process's batches (config `data`, docs/recipe.md §7).

    batch_size is the per-process batch (global // process_count). Each element is a dict of numpy arrays:
    global_crops float32 [b, n_global, G, G, G, 1], local_crops float32 [b, n_local, L, L, L, 1],
    masks_p{p} bool [b, n_global, (G//p)**3] for p in patch_sizes, index int64 [b], volume_row int64 [b].
    The stream starts at global batch `first_batch` (a resume, on any process count). data.dir is a dataset from
    `python -m data_prep.ingest --spacing 2,2,2` with `python -m data_prep.volume_stats` run on it.
    """
    grain_common.check_stream_args(seed, batch_size, process_index, process_count)
    transform = volume_views_transform(data, seed=seed, patch_sizes=patch_sizes)
    source = VolumeSource(config_value(data, "dir"), transform.hu_window)
    return grain_common.batched_stream(source, transform, data, seed=seed, batch_size=batch_size,
                                       process_index=process_index, process_count=process_count,
                                       first_batch=first_batch)


def volume_views_transform(data: Mapping[str, Any], *, seed: int,
                           patch_sizes: Sequence[int]) -> VolumeViewsTransform:
    """The per-example transform described by config `data`; bad values raise naming their config key."""
    global_size = grain_common.integer(config_value(data, "global_crop_size"), "data.global_crop_size")
    patch_sizes = grain_common.check_patch_sizes(patch_sizes, global_size, "data.global_crop_size")
    pad_to = grain_common.integer(config_value(data, "pad_to"), "data.pad_to")
    if pad_to < 1:
        raise ConfigError(f"data.pad_to must be >= 1, got {pad_to}")
    n_global = grain_common.integer(config_value(data, "n_global_crops"), "data.n_global_crops")
    flipped = config_value(data, "flip_global_crops")
    if not isinstance(flipped, (list, tuple)):
        raise ConfigError(f"config key data.flip_global_crops must be a list of global crop indices, got {flipped!r}")
    flipped = tuple(grain_common.integer(k, "data.flip_global_crops") for k in flipped)
    if any(not 0 <= k < n_global for k in flipped):
        raise ConfigError(f"data.flip_global_crops {flipped} must be indices of global crops in "
                         f"[0, data.n_global_crops={n_global})")
    # 0: crops anywhere in the volume (the recipe); stage 3's data config has no such key.
    view_region = grain_common.integer(data.get("view_region", 0), "data.view_region")
    if view_region < 0:
        raise ConfigError(f"data.view_region must be >= 0 voxels (0: the whole volume), got {view_region}")
    augment = grain_common.boolean(config_value(data, "intensity_augment"), "data.intensity_augment")
    intensity = grain_common.dataclass_from_config(IntensityAugment, config_value(data, "intensity"),
                                                   "data.intensity")
    return VolumeViewsTransform(
        seed=seed,
        hu_window=grain_common.hu_window(data),
        pad_to=pad_to,
        intensity=intensity if augment else None,
        global_crops=_volume_crops(data, "global", str(config_value(data, "global_crop_mode")), flipped),
        local_crops=_volume_crops(data, "local", "random", None),  # docs/recipe.md §7: every local crop may flip
        masking=grain_common.dataclass_from_config(RccMasking, config_value(data, "mask"), "data.mask"),
        patch_sizes=patch_sizes,
        view_region=view_region)


def _volume_crops(data: Mapping[str, Any], kind: str, mode: str, flip_crops: tuple[int, ...] | None) -> VolumeCrops:
    keys = (f"data.n_{kind}_crops", f"data.{kind}_crop_size", f"data.{kind}_crop_extent", "data.flip_prob")
    try:
        lo, hi = grain_common.number_pair(config_value(data, f"{kind}_crop_extent"), keys[2])
        return VolumeCrops(
            n_crops=grain_common.integer(config_value(data, f"n_{kind}_crops"), keys[0]),
            size=grain_common.integer(config_value(data, f"{kind}_crop_size"), keys[1]),
            extent=(grain_common.integer(lo, keys[2]), grain_common.integer(hi, keys[2])),
            mode=mode,
            flip_prob=grain_common.number(config_value(data, "flip_prob"), keys[3]),
            flip_crops=flip_crops)
    except ValueError as e:
        mode_key = ", data.global_crop_mode" if kind == "global" else ""
        raise ValueError(f"{kind} crops ({', '.join(keys)}{mode_key}): {e}") from e
