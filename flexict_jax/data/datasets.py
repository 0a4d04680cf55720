"""The one place that maps `config.data.kind` to a Grain pipeline, so the trainer is stage-agnostic."""
from __future__ import annotations

import json
import os

import grain
import ml_collections as mlc

from flexict_jax import variants
from flexict_jax.data import volume_store


def build_dataset(config: mlc.ConfigDict, *, process_index: int, process_count: int) -> grain.IterDataset:
    data, kind = config.data, config.data.kind
    common = dict(seed=config.seed, batch_size=config.global_batch_size // process_count,
                  patch_sizes=config.patch_sizes, process_index=process_index, process_count=process_count)
    if kind == "slices2d":
        from flexict_jax.data import pipeline
        return pipeline.build_stage1_dataset(data, **common)
    if kind == "slices2d_hires":
        from flexict_jax.data import pipeline
        return pipeline.build_stage1_hires_dataset(
            data, patch_size_probs=config.patch_size_probs, resolutions=data.resolutions,
            resolution_probs=data.resolution_probs, **common)
    if kind == "volumes3d":
        from flexict_jax.data import pipeline3d
        return pipeline3d.build_stage2_dataset(data, **common)
    if kind == "reports3d":
        from flexict_jax.data import pipeline_align
        return pipeline_align.build_align_dataset(data, config.text, **common)
    raise ValueError(f"config.data.kind={kind!r} is not one of: slices2d, slices2d_hires, volumes3d, reports3d")


def provenance(config: mlc.ConfigDict) -> dict | None:
    """The training data's volume count, sources and licences (`volume_store.provenance`) as recorded by
    data preparation in the index of `config.data.dir` (the manifest itself for volumes); None when the index
    predates that record."""
    if config.data.kind == "volumes3d":
        return volume_store.provenance(volume_store.read_manifest(config.data.dir))
    with open(os.path.join(config.data.dir, "index.json")) as f:  # slices and reports dirs alike
        return json.load(f).get("provenance")


def _resolution_probs(config: mlc.ConfigDict) -> tuple[float, ...]:
    return tuple(config.data.get("resolution_probs", None) or (1.0,))


def step_variants(config: mlc.ConfigDict) -> list[variants.Variant]:
    return variants.all_variants(config.patch_sizes, _resolution_probs(config))


def variant_for_step(config: mlc.ConfigDict, step: int) -> variants.Variant:
    return variants.variant_for_step(config.seed, step, config.patch_sizes, config.patch_size_probs,
                                     _resolution_probs(config))


def crop_sizes(config: mlc.ConfigDict) -> list[tuple[int, int]]:
    """(global, local) crop sizes of every resolution the stage trains at."""
    if config.data.get("resolutions", None):
        return [(int(r[0]), int(r[1])) for r in config.data.resolutions]
    return [(config.data.global_crop_size, config.data.local_crop_size)]
