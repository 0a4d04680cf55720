"""Per-step schedules (LR, weight decay, EMA momentum, teacher temperature) as precomputed tables.

Every schedule is a numpy table with one value per training step, indexed by the step inside the jitted train
step (docs/recipe.md §14.1 "Schedules"). One function shape covers all of them (docs/recipe.md §4): a linear warm-up, a
half-cosine, then a constant tail. The cosine may go *up* (stage 1.1's LR ramps 0 → 5e-5, docs/recipe.md §6).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flexict_jax.errors import ConfigError

SCHEDULE_KEYS = ("start", "peak", "end", "warmup_steps", "cosine_steps")
SCHEDULE_NAMES = ("lr", "weight_decay", "momentum", "teacher_temperature")  # the sections of config.schedules


def linear_warmup_cosine_decay(*, start: float, peak: float, end: float, warmup_steps: int, total_steps: int,
                               cosine_steps: int | None = None) -> np.ndarray:
    """float64 table of length `total_steps` (docs/recipe.md §4 `linear_warmup_cosine_decay`), truncated if shorter.

    Steps [0, warmup): linear start → peak, endpoint excluded. Then `cosine_steps` (default: the rest) of a
    half-cosine peak → end sampled at `np.linspace(0, π, cosine_steps)` — endpoint included, so its last value is
    exactly `end`, as upstream's. Then constant `end`.
    """
    for name, value in (("start", start), ("peak", peak), ("end", end)):
        if not math.isfinite(value):
            raise ValueError(f"schedule {name} must be finite, got {value}")
    if total_steps <= 0:
        raise ValueError(f"schedule total_steps must be positive, got {total_steps}")
    if warmup_steps < 0:
        raise ValueError(f"schedule warmup_steps must be >= 0, got {warmup_steps}")
    if cosine_steps is None:
        cosine_steps = max(total_steps - warmup_steps, 0)
    if cosine_steps < 0:
        raise ValueError(f"schedule cosine_steps must be >= 0, got {cosine_steps}")
    # A run shorter than warmup + cosine (a debug run, a test) sees the planned schedule cut off, the way an
    # interrupted upstream run would; the values at a given step never depend on where the run stops.
    length = max(total_steps, warmup_steps + cosine_steps)
    warmup = np.linspace(start, peak, warmup_steps, endpoint=False)
    cosine = end + (peak - end) * 0.5 * (1.0 + np.cos(np.linspace(0.0, np.pi, cosine_steps)))
    constant = np.full(length - warmup_steps - cosine_steps, end, dtype=np.float64)
    return np.concatenate([warmup, cosine, constant]).astype(np.float64)[:total_steps]


def table_from_config(section: ml_collections.ConfigDict, total_steps: int, *, name: str = "schedule") -> np.ndarray:
    """A float32 host table from a config section with keys start, peak, end, warmup_steps, cosine_steps.

    `cosine_steps` may be None for "the rest of training". `name` is the section's config path (e.g.
    "schedules.lr"), used in error messages.
    """
    missing = [key for key in SCHEDULE_KEYS if key not in section]
    if missing:
        raise ConfigError(f"config {name} lacks key(s) {missing}; a schedule needs {list(SCHEDULE_KEYS)}")
    try:
        table = linear_warmup_cosine_decay(
            start=float(section.start), peak=float(section.peak), end=float(section.end),
            warmup_steps=int(section.warmup_steps), total_steps=int(total_steps),
            cosine_steps=None if section.cosine_steps is None else int(section.cosine_steps))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config {name}: {e}") from None
    # numpy, not a device array: a jitted step embeds it as a constant either way, and creating a device array
    # would fail while a compile-only mesh (`plan --topology`, TPU devices without a TPU) is active.
    return table.astype(np.float32)


def validate(schedules_config: ml_collections.ConfigDict, total_steps: int) -> None:
    """Every section of config.schedules builds a table (cheap: numpy); ConfigError names the bad key."""
    missing = [name for name in SCHEDULE_NAMES if name not in schedules_config]
    if missing:
        raise ConfigError(f"config.schedules lacks section(s) {missing}")
    for name in SCHEDULE_NAMES:
        table_from_config(schedules_config[name], total_steps, name=f"schedules.{name}")


def value_at(table: np.ndarray | jax.Array, step: jax.Array | int) -> jax.Array:
    """The table's value at `step`; steps past the end keep the last value (jit-friendly)."""
    return jnp.asarray(table)[jnp.clip(step, 0, table.shape[0] - 1)]
