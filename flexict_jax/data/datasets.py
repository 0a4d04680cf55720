"""The one place that maps `config.data.kind` to a Grain pipeline, so the trainer is stage-agnostic."""
from __future__ import annotations

import grain
import ml_collections as mlc

from flexict_jax import variants


def build_dataset(config: mlc.ConfigDict, *, process_index: int, process_count: int) -> grain.IterDataset:
    data, kind = config.data, config.data.kind
    common = dict(seed=config.seed, batch_size=config.global_batch_size // process_count,
                  patch_sizes=config.patch_sizes, process_index=process_index, process_count=process_count)
    if kind == "slices2d":
        from flexict_jax.data import pipeline
        return pipeline.build_stage1_dataset(data, **common)
    if kind == "volumes3d":
        from flexict_jax.data import pipeline3d
        return pipeline3d.build_stage2_dataset(data, **common)
    raise ValueError(f"config.data.kind={kind!r} is not one of: slices2d, volumes3d")


def spatial_dims(config: mlc.ConfigDict) -> int:
    return 3 if config.data.kind == "volumes3d" else 2


def step_variants(config: mlc.ConfigDict) -> list[variants.Variant]:
    return variants.all_variants(config.patch_sizes)


def variant_for_step(config: mlc.ConfigDict, step: int) -> variants.Variant:
    return variants.variant_for_step(config.seed, step, config.patch_sizes, config.patch_size_probs)
