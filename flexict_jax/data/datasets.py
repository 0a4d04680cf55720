"""The one place that maps `config.data.kind` to a Grain pipeline, so the trainer is stage-agnostic."""
from __future__ import annotations

import json
import os
from collections.abc import Callable

import grain
import ml_collections as mlc
from absl import logging
from etils import epath

from flexict_jax import variants
from flexict_jax.data import volume_store
from flexict_jax.errors import ConfigError


def validate(config: mlc.ConfigDict) -> None:
    """The data keys every stage has: a known data.kind, an existing data.dir, crop sizes the patch sizes fit."""
    if config.data.get("kind") not in BUILDERS:
        raise ConfigError(f"config.data.kind={config.data.get('kind')!r} is not one of {KINDS}")
    if not config.data.dir:
        raise ConfigError("config.data.dir is not set: pass --config.data.dir=DIR (slices from "
                          "`python -m data_prep.slices` for 2D stages, a dataset from `python -m data_prep.ingest` "
                          "for 3D stages, reports from `python -m data_prep.reports` for stage 3)")
    if not epath.Path(config.data.dir).exists():
        raise ConfigError(f"config.data.dir={config.data.dir!r} does not exist")
    for global_size, local_size in crop_sizes(config):
        for p in config.patch_sizes:
            if global_size % p:  # the iBOT mask grid must cover the global crop exactly
                raise ConfigError(f"config.patch_sizes contains {p}, which does not divide the global crop size "
                                  f"{global_size}")
            if local_size % p:
                logging.warning("local crop size %d is not a multiple of patch size %d: the last %d pixels are "
                                "dropped, as upstream does (docs/recipe.md §2.3)", local_size, p, local_size % p)


def _slices2d(config: mlc.ConfigDict, **common) -> grain.IterDataset:
    from flexict_jax.data import pipeline2d
    return pipeline2d.build_slices2d_dataset(config.data, **common)


def _slices2d_hires(config: mlc.ConfigDict, **common) -> grain.IterDataset:
    from flexict_jax.data import pipeline2d
    return pipeline2d.build_slices2d_hires_dataset(
        config.data, patch_size_probs=config.patch_size_probs, resolutions=config.data.resolutions,
        resolution_probs=config.data.resolution_probs, **common)


def _volumes3d(config: mlc.ConfigDict, **common) -> grain.IterDataset:
    from flexict_jax.data import pipeline3d
    return pipeline3d.build_volumes3d_dataset(config.data, **common)


def _reports3d(config: mlc.ConfigDict, **common) -> grain.IterDataset:
    from flexict_jax.data import pipeline_align
    return pipeline_align.build_reports3d_dataset(config.data, config.text, **common)


# config.data.kind -> its pipeline (imported on use: each pulls in its own dependencies).
BUILDERS: dict[str, Callable[..., grain.IterDataset]] = {
    "slices2d": _slices2d, "slices2d_hires": _slices2d_hires, "volumes3d": _volumes3d, "reports3d": _reports3d}
KINDS = tuple(BUILDERS)


def build_dataset(config: mlc.ConfigDict, *, process_index: int, process_count: int,
                  first_batch: int = 0) -> grain.IterDataset:
    """The training stream of `config.data.kind`: global batch t is examples [t·B, (t+1)·B); this process's rows
    of global batches first_batch, first_batch + 1, ..."""
    if config.data.kind not in BUILDERS:
        raise ConfigError(f"config.data.kind={config.data.kind!r} is not one of {KINDS}")
    return BUILDERS[config.data.kind](
        config, seed=config.seed, batch_size=config.global_batch_size // process_count,
        patch_sizes=config.patch_sizes, process_index=process_index, process_count=process_count,
        first_batch=first_batch)


def provenance(config: mlc.ConfigDict) -> dict | None:
    """The training data's volume count, sources and licences (`volume_store.provenance`) as recorded by
    data preparation in the index of `config.data.dir` (the manifest itself for volumes); None when the index
    predates that record."""
    if config.data.kind == "volumes3d":
        return volume_store.provenance(volume_store.read_manifest(config.data.dir))
    with open(os.path.join(config.data.dir, "index.json")) as f:  # slices and reports dirs alike
        return json.load(f).get("provenance")


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
