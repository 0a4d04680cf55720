"""Every check of a run's config, in one place, before anything is built or written.

`validate(config)` fails with one `ConfigError` naming the key and the fix, instead of deep inside jit, the data
pipeline or a half-written work directory. Each layer contributes the checks of its own keys (`datasets.validate`,
`schedules.validate`, `optim.validate`, the task's `validate`, `handoff.validate`); the keys every run has are
checked here.
"""
from __future__ import annotations

import difflib

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
                          f"and the process count ({processes}): every device takes an equal share of each global "
                          f"batch. A resume keeps the global batch (the data order depends on it): run on a device "
                          f"count that divides it")
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


def unknown_key_message(config: mlc.ConfigDict, key: str) -> str | None:
    """Why dotted `key` (e.g. "data.on_corupt") is not a key of `config`, naming the closest valid ones; None
    when it is one."""
    node, path = config, []
    for part in key.split("."):
        if not isinstance(node, mlc.ConfigDict):
            return f"config.{'.'.join(path)} is a value, not a section: --config.{key} does not exist"
        if part not in node:
            where = f"config.{'.'.join(path)}" if path else "the config"
            close = difflib.get_close_matches(part, [str(k) for k in node.keys()], n=3, cutoff=0.6)
            hint = (f"did you mean {', '.join('config.' + '.'.join([*path, c]) for c in close)}?" if close
                    else f"{where} has {', '.join(sorted(str(k) for k in node.keys()))}")
            return f"--config.{key}: {where} has no key {part!r}; {hint}"
        node = node[part]
        path.append(part)
    return None
