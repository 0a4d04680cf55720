"""The training loop: mesh, sharded state, one jitted step per variant, checkpoints, preemption, metrics.

Stage specifics (model, loss, teacher update, which batch arrays a step needs) live in `flexict_jax.tasks`;
data in `flexict_jax.data.datasets`; the step and its state layout in `flexict_jax.train_step`; where a new run's
state comes from in `flexict_jax.handoff`. This file only moves pytrees. Order of events (big_vision style):
config check → mesh → abstract state and its shardings → data → restore, or hand-off from a previous stage, or
scratch → loop (variant draw, global batch, step, metrics, evaluation, checkpoint) → final checkpoint.
"""
from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from typing import Any

import jax
import ml_collections as mlc
import numpy as np
from absl import logging
from etils import epath

from flexict_jax import checkpointing, config_check, distributed, handoff, metric_io, sharding, tasks, train_step
from flexict_jax.data import datasets
from flexict_jax.variants import Variant

# (config, program) -> the in-training evaluation (state -> {name: scalar}), or None for none.
EvaluatorFactory = Callable[[mlc.ConfigDict, train_step.Program], Callable[[dict[str, Any]], dict[str, float]] | None]


class _StopFlag:
    """SIGTERM (preemption, scancel, Ctrl-\\) → save the current step and exit 0."""

    def __init__(self):
        self.requested = False
        if jax.process_count() == 1:  # multi-process runs use JAX's preemption sync service instead
            signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        logging.warning("received signal %d: saving a checkpoint at the next step boundary", signum)
        self.requested = True

    def __call__(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested


def enable_compilation_cache() -> None:
    """A persistent XLA cache lets a resumed or repeated run skip recompiling its step variants — on
    accelerators only: on XLA:CPU with several devices, stage-3 steps loaded from the cache were seen to hang in
    their collectives (then abort at the rendezvous timeout), so CPU runs always compile. Call after
    `distributed.maybe_initialize` (it starts the backend); a cache directory set by the user is kept."""
    if jax.default_backend() != "cpu" and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/flexict_jax/xla"))


def train(config: mlc.ConfigDict, workdir: str, *, evaluator: EvaluatorFactory | None = None) -> int:
    """Runs (or resumes) the stage in `workdir`. Returns the process exit code.

    `evaluator(config, program)` builds the in-training evaluation (state -> {name: scalar}, run every
    config.eval.every_steps steps) or returns None; `python -m flexict_jax.train` passes `evals.build_evaluator`.
    """
    distributed.maybe_initialize()
    enable_compilation_cache()
    config_check.validate(config)
    mesh = sharding.make_mesh(config.mesh)
    workdir = epath.Path(workdir)
    handoff.adopt_rope_periods(config, workdir)
    workdir.mkdir(parents=True, exist_ok=True)  # nothing is written before the config has been checked
    is_chief = jax.process_index() == 0

    with sharding.activate(mesh, config.sharding_rules):
        program = train_step.build_program(config, mesh)
        report = sharding.sharding_report(mesh, program.abstract_state["params"], program.param_specs)
        logging.info("parameters: %.1f MB, %.1f MB per device on mesh %s", report["total_bytes"] / 2**20,
                     report["bytes_per_device"] / 2**20, report["mesh"])
        for name in report["large_replicated"]:
            logging.warning("large parameter %s is replicated on every device; check config.sharding_rules", name)

        ckpt = checkpointing.Checkpointer(workdir / "checkpoints", **config.ckpt.to_dict())
        meta = {"stage": config.stage, "config": json.loads(config.to_json_best_effort()),
                "provenance": datasets.provenance(config),  # the training data, for the model card of an export
                "topology": checkpointing.topology(mesh)}
        # Our own checkpoint always wins (a resume never re-applies the hand-off); on any process count or mesh.
        latest = ckpt.restore_latest(program.abstract_state, global_batch_size=config.global_batch_size,
                                     topology=meta["topology"])
        data_iterator = datasets.global_batches(config, process_index=jax.process_index(),
                                                process_count=jax.process_count(),
                                                position=latest.data_position if latest else 0)
        if latest is not None:
            logging.info("resumed from %s (global batch %d next)", workdir / "checkpoints" / str(latest.step),
                         latest.data_position)
            state = latest.state
            meta.update({k: latest.meta[k] for k in ("init", "gram", "topology_changes") if k in latest.meta})
        else:
            state, records = handoff.first_state(config, program)
            meta.update(records)
            if records:  # a converted start is a checkpoint of its own
                ckpt.save(0, state, data_iterator, meta, force=True)

        # The run is accepted (config, data, checkpoint or hand-off all checked): only now is anything the
        # workdir already had rewritten, so a refused start leaves it as it was.
        if is_chief:
            (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
            (workdir / "sharding_report.json").write_text(json.dumps(report, indent=1))
        evaluate = evaluator(config, program) if evaluator is not None else None
        stop = _StopFlag()
        step = int(jax.device_get(state["step"]))
        compiled: dict[Variant, Callable] = {}
        throughput = metric_io.Throughput(step, config.total_steps)
        writer = metric_io.MetricWriter(workdir, start_step=step, config=config, enabled=is_chief)
        nonfinite_streak, exit_code = 0, 0
        records_replaced = 0  # stand-ins for corrupt records (data.on_corrupt=skip) since the last metrics row
        pending = None  # (step, variant, metrics, records replaced) of the last dispatched step, metrics unread

        def settle(done: int, variant: Variant, metrics: dict, replaced: int, evaluation: dict | None = None) -> bool:
            """Reads step `done`'s metrics (waiting for that step, not for any queued behind it): the non-finite
            streak and one metrics row (training and evaluation values together). True when the streak says stop."""
            nonlocal nonfinite_streak, records_replaced
            records_replaced += replaced
            if not bool(metrics["finite"]):
                nonfinite_streak += 1
                logging.error("step %d: non-finite loss %s or gradient norm %s; update skipped (%d in a row)", done,
                              float(metrics["loss"]), float(metrics["grad_norm"]), nonfinite_streak)
                if nonfinite_streak >= config.max_consecutive_nonfinite:
                    logging.error("stopping: %d consecutive non-finite losses; the last good checkpoint is kept",
                                  nonfinite_streak)
                    return True
            else:
                nonfinite_streak = 0
            record = dict(evaluation or {})
            if done % config.log_every == 0 or done == config.total_steps:
                scalars = {k: v for k, v in jax.device_get(metrics).items() if k != "finite"}
                if config.data.get("on_corrupt") == "skip":
                    scalars["data/records_replaced"] = distributed.process_sum(records_replaced)
                    records_replaced = 0
                record.update(scalars, patch_size=variant.patch_size,
                              **throughput.update(done, config.global_batch_size))
            if record:
                writer.write(done, record)
            return False

        logging.info("training %s from step %d to %d on a %s mesh", config.stage, step, config.total_steps,
                     dict(mesh.shape))
        while step < config.total_steps:
            if stop(step):
                if pending is not None and settle(*pending):
                    exit_code = 1
                    break
                logging.warning("stopping at step %d on request; saving", step)
                ckpt.save(step, state, data_iterator, meta, force=True)
                break
            variant = datasets.variant_for_step(config, step)
            host_batch = next(data_iterator)
            replaced = int(np.sum(host_batch.get("records_replaced", 0)))
            local = tasks.get(config).step_batch(host_batch, variant)
            batch = sharding.global_batch(mesh, local)
            if variant not in compiled:  # one compiled step per variant, built on first use
                compiled[variant] = program.train_step(config, variant, local).lower(state, batch).compile()
                # Hosts finish compiling at different times; see distributed.barrier for why they wait here.
                distributed.barrier(f"step {step}: compiled {variant}")
            state, metrics = compiled[variant](state, batch)
            step += 1
            # The previous step's metrics are read only now, with this step queued behind it: the host never
            # waits for the step it has just dispatched, and fetches the next batch while it runs.
            if pending is not None and settle(*pending):
                exit_code = 1
                break
            pending = (step, variant, metrics, replaced)
            evaluating = evaluate is not None and (step % config.eval.every_steps == 0
                                                   or step == config.total_steps)
            if evaluating or ckpt.due(step) or step == config.total_steps:
                # A checkpoint must know this step's flag before the next step consumes (donates) its state.
                if settle(*pending, evaluation=evaluate(state) if evaluating else None):
                    exit_code = 1
                    break
                pending = None
                if nonfinite_streak == 0:  # never checkpoint inside a non-finite streak: keep the last good one
                    ckpt.save(step, state, data_iterator, meta, force=step == config.total_steps)
        ckpt.close()
        writer.close()
    return exit_code
