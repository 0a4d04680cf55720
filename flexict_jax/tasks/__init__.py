"""Stage-specific pieces behind one small protocol, chosen by `config.task`.

A task module provides:
  build_model(config, seed) -> nnx.Module            the student (the teacher has a subset of its params)
  teacher_params(params) -> dict                     the part of the student the EMA teacher tracks
  loss_fn(student, teacher, batch, key, *, graphdef, abstract_state, config, patch_size, teacher_temperature,
          gram_teacher=None) -> (loss, terms)
  after_update(params) -> params                     e.g. clamping the CLIP logit scale after each step
  step_batch(local_batch, variant) -> dict           the arrays one step needs, for its variant
  initial_params(config, params) -> params           a new run's student after init or hand-off, e.g. with
                                                     imported text-tower weights; it may replace only parts
                                                     the teacher does not track
  evaluator(config, program) -> callable | None      in-training evaluation: state -> {name: scalar}, called
                                                     every config.eval.every_steps steps; None = none
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import jax
import ml_collections as mlc

TASKS = {"dino": "flexict_jax.tasks.dino", "align": "flexict_jax.tasks.align"}


def get(config: mlc.ConfigDict) -> ModuleType:
    name = config.get("task", "dino")
    if name not in TASKS:
        raise ValueError(f"config.task={name!r} is not one of {sorted(TASKS)}")
    return importlib.import_module(TASKS[name])


def ema_update(teacher: dict[str, Any], student: dict[str, Any], momentum: jax.Array) -> dict[str, Any]:
    """θ_t ← m·θ_t + (1−m)·θ_s over the teacher's parts (recipe §4)."""
    return jax.tree.map(lambda t, s: momentum * t + (1.0 - momentum) * s, teacher,
                        {k: student[k] for k in teacher})
