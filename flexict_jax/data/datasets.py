"""The one place that maps `config.data.kind` to a Grain pipeline, so the trainer is stage-agnostic."""
from __future__ import annotations

import grain
import ml_collections as mlc

from flexict_jax import variants


def build_dataset(config: mlc.ConfigDict, *, process_index: int, process_count: int,
                  first_batch: int = 0) -> grain.IterDataset:
    """This process's rows of global batches first_batch, first_batch + 1, ... of the stage's stream."""
    data, kind = config.data, config.data.kind
    common = dict(seed=config.seed, batch_size=config.global_batch_size // process_count,
                  patch_sizes=config.patch_sizes, process_index=process_index, process_count=process_count,
                  first_batch=first_batch)
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


class GlobalBatches:
    """This process's rows of successive global batches of `dataset` (built with `first_batch=position`).

    `position` is the index of the next global batch: the same on every host, it is what a checkpoint saves,
    so a resume on any process count starts each host at its rows of that batch.
    """

    def __init__(self, dataset: grain.IterDataset, position: int):
        self._iterator = iter(dataset)
        self.position = position

    def __iter__(self) -> GlobalBatches:
        return self

    def __next__(self) -> dict:
        batch = next(self._iterator)
        self.position += 1
        return batch


def global_batches(config: mlc.ConfigDict, *, process_index: int, process_count: int,
                   position: int = 0) -> GlobalBatches:
    """This process's part of the stage's global batches `position`, `position` + 1, ..."""
    dataset = build_dataset(config, process_index=process_index, process_count=process_count, first_batch=position)
    return GlobalBatches(dataset, position)


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
