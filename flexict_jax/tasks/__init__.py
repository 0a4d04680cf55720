"""Stage-specific pieces behind one typed protocol, chosen by `config.task`.

A task is a module (`dino`: stages 1, 1.1 and 2; `align`: stage 3) satisfying `Task`: the trainer, the hand-off
and the config check ask it everything that differs between stages, and know nothing else about it. Helpers the
tasks share are public in `flexict_jax.tasks.common`.
"""
from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, Protocol, cast

import jax
import ml_collections as mlc
import numpy as np
from flax import nnx

from flexict_jax.errors import ConfigError
from flexict_jax.variants import Variant

Params = dict[str, Any]
TASKS = {"dino": "flexict_jax.tasks.dino", "align": "flexict_jax.tasks.align"}


class Task(Protocol):
    """What a task provides. Every function is pure over pytrees of parameters (`Params`, pure dicts)."""

    # The `config.init.mode` hand-offs this task can start from (see `flexict_jax.handoff`).
    INIT_MODES: tuple[str, ...]

    def validate(self, config: mlc.ConfigDict) -> None:
        """Raises ConfigError for a key of this task that is missing or unusable; called before anything is
        built or written."""

    def build_model(self, config: mlc.ConfigDict, seed: int) -> nnx.Module:
        """The student (the EMA teacher holds a subset of its parameters)."""

    def teacher_params(self, params: Params) -> Params:
        """The parts of the student the EMA teacher tracks."""

    def loss_fn(self, student: Params, teacher: Params, batch: Mapping[str, jax.Array], key: jax.Array, *,
                graphdef: nnx.GraphDef, abstract_state: nnx.State, config: mlc.ConfigDict, patch_size: int,
                teacher_temperature: jax.Array, **frozen: Params) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(total loss, its terms) of one step. `frozen` holds the state's frozen parts by name (e.g. stage
        1.1's `gram_teacher`); a task takes the ones its config asks for."""

    def after_update(self, params: Params) -> Params:
        """The student after each optimizer step, e.g. with the CLIP logit scale clamped."""

    def step_batch(self, local: Mapping[str, np.ndarray], variant: Variant) -> dict[str, np.ndarray]:
        """The arrays one step of `variant` takes from a batch of the data pipeline."""

    def initial_params(self, config: mlc.ConfigDict, params: Params) -> Params:
        """A new run's student after init or hand-off (e.g. with imported text-tower weights); it may replace
        only parts the teacher does not track."""

    def check_vlm_source(self, config: mlc.ConfigDict, source: str, parts: Params, meta: dict) -> None:
        """For `init.mode = "vlm"`: raises when the parts found in `source` (its student and teacher merged)
        are not a vision-language model this run can continue."""


def get(config: mlc.ConfigDict) -> Task:
    name = config.get("task", "dino")
    if name not in TASKS:
        raise ConfigError(f"config.task={name!r} is not one of {sorted(TASKS)}")
    return cast(Task, importlib.import_module(TASKS[name]))


def ema_update(teacher: dict[str, Any], student: dict[str, Any], momentum: jax.Array) -> dict[str, Any]:
    """θ_t ← m·θ_t + (1−m)·θ_s over the teacher's parts (docs/recipe.md §4)."""
    return jax.tree.map(lambda t, s: momentum * t + (1.0 - momentum) * s, teacher,
                        {k: student[k] for k in teacher})
