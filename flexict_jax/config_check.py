"""Every check of a run's config, in one place, before anything is built or written.

`validate(config)` fails with one `ConfigError` naming the key and the fix, instead of deep inside jit, the data
pipeline or a half-written work directory. Each layer contributes the checks of its own keys (`datasets.validate`,
`schedules.validate`, `optim.validate`, the task's `validate`, `handoff.validate`); the keys every run has are
checked here.
"""
from __future__ import annotations

import jax
import ml_collections as mlc

from flexict_jax import handoff, optim, schedules, tasks
from flexict_jax.data import datasets
from flexict_jax.errors import ConfigError


def validate(config: mlc.ConfigDict) -> None:
    """Raises ConfigError for the first problem found; returns None for a usable config."""
    datasets.validate(config)
    batch, devices, processes = config.global_batch_size, jax.device_count(), jax.process_count()
    if batch % devices or batch % processes:
        raise ConfigError(f"config.global_batch_size={batch} must be divisible by the device count ({devices}) "
                          f"and the process count ({processes})")
    for key in ("loss.koleo_group_size", "model.drop_path_group_size"):
        section, name = key.split(".")
        group = config[section].get(name)
        if group and batch % group:
            raise ConfigError(f"config.{key}={group} must divide config.global_batch_size={batch}")
    if len(config.patch_sizes) != len(config.patch_size_probs) or abs(sum(config.patch_size_probs) - 1) > 1e-6:
        raise ConfigError(f"config.patch_size_probs={config.patch_size_probs} must have one probability per "
                          f"entry of config.patch_sizes={config.patch_sizes} and sum to 1")
    if config.total_steps <= 0:
        raise ConfigError(f"config.total_steps={config.total_steps} must be positive")
    schedules.validate(config.schedules, config.total_steps)
    optim.validate(config.optim)
    tasks.get(config).validate(config)
    handoff.validate(config)
