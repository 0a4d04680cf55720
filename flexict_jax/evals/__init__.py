"""In-training evaluation, by task: `build_evaluator(config, program)` is what the training CLI hands the trainer.

The tasks do not import this package (it sits above them and the trainer); the task's name picks its evaluator.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ml_collections as mlc
from absl import logging

from flexict_jax.evals import features, monitor, stage3
from flexict_jax.train_step import Program

Evaluator = Callable[[dict[str, Any]], dict[str, float]]


def organ_monitor(config: mlc.ConfigDict, program: Program) -> Evaluator | None:
    """Stages 1-2: the organ kNN monitor of `evals.monitor` when a labelled dataset is named in config.eval.dataset
    (or the training data's own dataset has label maps); None, with a warning saying why, otherwise."""
    dataset = monitor.eval_dataset(config)
    if not config.eval.get("dataset"):  # the training data's own: a monitor only when it has label maps
        reason = None if dataset else "the training data names no ingested dataset"
        if dataset:
            try:
                features.labelled_entries(dataset)
            except (features.ProbeDataError, FileNotFoundError) as e:
                reason = str(e)
        if reason:
            logging.warning("config.eval: no organ monitor (%s); set --config.eval.dataset=DIR (with label maps) "
                            "or --config.eval.every_steps=0", reason)
            return None
    return monitor.OrganMonitor(config, program, dataset)


# config.task -> the evaluator of that task's runs (built once per run, called with the state; may be None).
EVALUATORS: dict[str, Callable[[mlc.ConfigDict, Program], Evaluator | None]] = {
    "align": stage3.Stage3Evaluator, "dino": organ_monitor}


def build_evaluator(config: mlc.ConfigDict, program: Program) -> Evaluator | None:
    """The held-out evaluation of the run's task (stage 3: retrieval and zero-shot, `evals.stage3`; stages 1-2:
    the organ kNN monitor); None when the task has none or config.eval.every_steps is 0."""
    evaluator = EVALUATORS.get(config.get("task", "dino"))
    if evaluator is None or not config.get("eval") or not config.eval.every_steps:
        return None
    return evaluator(config, program)
