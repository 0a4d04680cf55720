"""In-training evaluation, by task: `build_evaluator(config, program)` is what the training CLI hands the trainer.

The tasks do not import this package (it sits above them and the trainer); the task's name picks its evaluator.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ml_collections as mlc

from flexict_jax.evals import stage3
from flexict_jax.train_step import Program

# config.task -> the evaluator class of that task's runs (built once per run, called with the state).
EVALUATORS: dict[str, Callable[[mlc.ConfigDict, Program], Callable[[dict[str, Any]], dict[str, float]]]] = {
    "align": stage3.Stage3Evaluator}


def build_evaluator(config: mlc.ConfigDict, program: Program) -> Callable[[dict[str, Any]], dict[str, float]] | None:
    """The held-out evaluation of the run's task (stage 3: retrieval and zero-shot, `evals.stage3`); None when
    the task has none or config.eval.every_steps is 0."""
    evaluator = EVALUATORS.get(config.get("task", "dino"))
    if evaluator is None or not config.get("eval") or not config.eval.every_steps:
        return None
    return evaluator(config, program)
