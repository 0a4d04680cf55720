"""The training loop: mesh, sharded state, one jitted step per variant, checkpoints, preemption, metrics.

Stage specifics (model, loss, teacher update, which batch arrays a step needs) live in `flexict_jax.tasks`;
data in `flexict_jax.data.datasets`; this file only moves pytrees. Order of events (big_vision style): config →
mesh → abstract state and its shardings → data → restore, or hand-off from a previous stage, or scratch →
loop (variant draw, global batch, step, metrics, checkpoint) → final checkpoint.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
from absl import logging
from etils import epath
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flexict_jax import checkpointing, distributed, metric_io, optim, schedules, sharding
from flexict_jax.data import datasets
from flexict_jax.models import inflate
from flexict_jax import tasks
from flexict_jax.variants import Variant

SCHEDULE_NAMES = ("lr", "weight_decay", "momentum", "teacher_temperature")
INIT_MODES = ("continue", "inflate_2d_to_3d", "backbone", "vlm")
# What a "vlm" hand-off needs from its source: the parts of upstream's FlexiCT-3D-VLM (torch-format §3.2).
VLM_PARTS = ("backbone", "vision_projection", "text_tower", "logit_scale")
ROPE_PERIODS_KEYS = ("rope_periods_2d", "rope_periods_3d")


class ConfigError(ValueError):
    pass


def validate_config(config: mlc.ConfigDict) -> None:
    """Fails early, naming the config key, instead of deep inside jit or the data pipeline."""
    if not config.data.dir:
        raise ConfigError("config.data.dir is not set: pass --config.data.dir=DIR (slices from "
                          "`python -m data_prep.slices` for 2D stages, a dataset from `python -m data_prep.ingest` "
                          "for 3D stages)")
    if not epath.Path(config.data.dir).exists():
        raise ConfigError(f"config.data.dir={config.data.dir!r} does not exist")
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
    for global_size, local_size in datasets.crop_sizes(config):
        for p in config.patch_sizes:
            if global_size % p:  # the iBOT mask grid must cover the global crop exactly
                raise ConfigError(f"config.patch_sizes contains {p}, which does not divide the global crop size "
                                  f"{global_size}")
            if local_size % p:
                logging.warning("local crop size %d is not a multiple of patch size %d: the last %d pixels are "
                                "dropped, as upstream does (recipe §2.3)", local_size, p, local_size % p)
    if uses_gram(config) and not config.gram.from_workdir:
        raise ConfigError("config.loss.gram_weight > 0 needs a frozen Gram teacher: pass "
                          "--config.gram.from_workdir=RUN_DIR [--config.gram.step=N] (recipe §6)")
    if config.total_steps <= 0:
        raise ConfigError(f"config.total_steps={config.total_steps} must be positive")
    if config.init.from_workdir:
        if config.init.mode not in INIT_MODES:
            raise ConfigError(f"config.init.mode={config.init.mode!r} must be one of {INIT_MODES}")
        if not epath.Path(config.init.from_workdir).exists():
            raise ConfigError(f"config.init.from={config.init.from_workdir!r} does not exist")


def uses_gram(config: mlc.ConfigDict) -> bool:
    return config.loss.get("gram_weight", 0.0) > 0


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


def _state_shardings(mesh, abstract_state: dict, param_specs: Any, tx: optax.GradientTransformation) -> Any:
    replicated = NamedSharding(mesh, P())
    param_shardings = sharding.named_sharding_tree(mesh, param_specs)
    opt = {}

    def map_opt_state() -> None:
        opt["shardings"] = optax.tree_utils.tree_map_params(
            tx, lambda _, s: s, abstract_state["opt_state"], param_shardings,
            transform_non_params=lambda _: replicated)

    # Traced, not run: tree_map_params calls tx.init, whose step counters would otherwise become arrays on the
    # active mesh's devices, which compile-only TPU devices (`plan --topology`) cannot hold.
    jax.eval_shape(map_opt_state)
    opt_shardings = opt["shardings"]
    shardings = {"step": replicated, "params": param_shardings,
                 "teacher": {k: param_shardings[k] for k in abstract_state["teacher"]}, "opt_state": opt_shardings}
    if "gram_teacher" in abstract_state:
        shardings["gram_teacher"] = {"backbone": param_shardings["backbone"]}
    return shardings


def global_batch(mesh: Mesh, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Global arrays, batch-sharded over the mesh, from this process's rows of the batch."""
    return {k: jax.make_array_from_process_local_data(NamedSharding(mesh, sharding.batch_spec(v.ndim)), v)
            for k, v in local.items()}


@dataclasses.dataclass(frozen=True)
class Program:
    """Everything the loop (and the benchmarks/planner) need, built once per run under the active mesh."""
    mesh: Mesh
    graphdef: nnx.GraphDef
    abstract_params: nnx.State
    param_specs: Any
    tables: dict[str, np.ndarray]  # per-step schedule values, host arrays (schedules.table_from_config)
    tx: optax.GradientTransformation
    init_state: Callable[[], dict]
    abstract_state: Any  # ShapeDtypeStructs carrying the state shardings
    state_shardings: Any

    def train_step(self, config: mlc.ConfigDict, variant: Variant, batch_example: dict[str, Any]) -> Callable:
        """The jitted step for one static variant, explicit in/out shardings, the old state donated."""
        batch_shardings = {k: NamedSharding(self.mesh, sharding.batch_spec(np.ndim(v)))
                           for k, v in batch_example.items()}
        return jax.jit(functools.partial(_train_step, program=self, config=config, variant=variant),
                       in_shardings=(self.state_shardings, batch_shardings),
                       out_shardings=(self.state_shardings, None), donate_argnums=(0,))


def build_program(config: mlc.ConfigDict, mesh: Mesh) -> Program:
    """Abstract model, optimizer and state shardings. Call inside `sharding.activate(mesh, rules)`."""
    tables = {name: schedules.table_from_config(config.schedules[name], config.total_steps,
                                                name=f"schedules.{name}")
              for name in SCHEDULE_NAMES}
    task = tasks.get(config)
    abstract_model = nnx.eval_shape(lambda: task.build_model(config, config.seed))
    graphdef, abstract_params = nnx.split(abstract_model)
    param_specs = nnx.to_pure_dict(nnx.get_partition_spec(abstract_params))
    tx = optim.build_optimizer(nnx.to_pure_dict(abstract_params), config.optim, lr_table=tables["lr"],
                               wd_table=tables["weight_decay"], depth=config.model.depth)

    def init_state() -> dict:
        params = nnx.to_pure_dict(nnx.state(task.build_model(config, config.seed)))
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "teacher": task.teacher_params(params),
                 "opt_state": tx.init(params)}
        if uses_gram(config):  # a frozen backbone, filled in from config.gram.from_workdir at the start
            state["gram_teacher"] = {"backbone": params["backbone"]}
        return state

    abstract_state = jax.eval_shape(init_state)
    state_shardings = _state_shardings(mesh, abstract_state, param_specs, tx)
    abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  abstract_state, state_shardings)
    return Program(mesh, graphdef, abstract_params, param_specs, tables, tx, init_state, abstract_state,
                   state_shardings)


def _train_step(state: dict, batch: dict, *, program: Program, config: mlc.ConfigDict,
                variant: Variant) -> tuple[dict, dict]:
    step, tables = state["step"], program.tables
    key = jax.random.fold_in(jax.random.key(config.seed), step)
    at = functools.partial(schedules.value_at, step=step)
    temperature, momentum = at(tables["teacher_temperature"]), at(tables["momentum"])
    task = tasks.get(config)
    (loss, terms), grads = jax.value_and_grad(task.loss_fn, has_aux=True)(
        state["params"], state["teacher"], batch, key, graphdef=program.graphdef,
        abstract_state=program.abstract_params, config=config, patch_size=variant.patch_size,
        teacher_temperature=temperature, gram_teacher=state.get("gram_teacher"))
    updates, opt_state = program.tx.update(grads, state["opt_state"], state["params"])
    params = task.after_update(optax.apply_updates(state["params"], updates))
    new = {**state, "step": step + 1, "params": params, "opt_state": opt_state,
           "teacher": tasks.ema_update(state["teacher"], params, momentum)}
    # A non-finite loss or gradient skips the update (params, optimizer, teacher unchanged) but consumes the batch.
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = {k: (v if k == "step" else jax.tree.map(lambda a, b: jnp.where(finite, a, b), v, state[k]))
           for k, v in new.items()}
    metrics = {"loss": loss, **terms, "lr": at(tables["lr"]), "weight_decay": at(tables["weight_decay"]),
               "momentum": momentum, "teacher_temperature": temperature,
               "grad_norm": grad_norm, "finite": finite}
    return new, metrics


def adopt_rope_periods(config: mlc.ConfigDict, workdir: epath.Path) -> None:
    """Explicit RoPE periods travel with the weights (an imported file's own bf16 buffers, torch-format §1.3):
    unless config.model sets them, a run takes them from its own latest checkpoint when it resumes, else from
    config.init.from. Periods set in the config that differ from the source's are refused."""
    if checkpointing.latest_step(workdir) is not None:
        source, step = workdir, None
    elif config.init.from_workdir:
        source, step = config.init.from_workdir, config.init.step
    else:
        return
    _, _, meta = checkpointing.read_subtree(source, "step", step)
    model = meta.get("config", {}).get("model", {})
    for key in ROPE_PERIODS_KEYS:
        theirs, ours = model.get(key), config.model.get(key)
        if theirs is None:
            continue
        if ours is None:
            config.model[key] = tuple(theirs)
            logging.info("config.model.%s: the explicit RoPE periods of %s", key, source)
        elif tuple(ours) != tuple(theirs):
            raise ConfigError(f"config.model.{key}={tuple(ours)} differs from the periods {tuple(theirs)} of the "
                              f"checkpoint in {source}; leave it unset to use the checkpoint's")


def vlm_source(config: mlc.ConfigDict, source: str, step: int, teacher: dict, meta: dict) -> dict:
    """What a "vlm" hand-off takes from its source: the EMA teacher's parts (backbone, and the heads when it has
    them) and the student's others (text tower, projection, logit scale: stage 3's EMA teacher tracks the image
    side only, recipe §8). An imported VLM holds the same weights in both."""
    if config.get("task") != "align":
        raise ConfigError("config.init.mode='vlm' starts stage 3 from a vision-language checkpoint; use "
                          "--config=configs/stage3.py")
    student, _, _ = checkpointing.read_subtree(source, "params", step)
    found = {**student, **teacher}
    missing = [part for part in VLM_PARTS if part not in found]
    if missing:
        raise checkpointing.IncompatibleCheckpointError(
            f"config.init.from={source}: no {missing} (it has {sorted(found)}), so not a vision-language checkpoint; "
            f"config.init.mode='vlm' needs `import_torch --kind=vlm` output or a stage-3 run")
    # The upstream VLM's tower is Qwen3 (causal, last-token pooling); as a from-scratch tower (bidirectional, mean
    # pooling) the same weights would compute something else, with no shape to tell.
    source_config = meta.get("config", {})
    tower = "qwen3" if "text_tower" in source_config else source_config.get("text", {}).get("tower")
    if tower != config.text.tower:
        raise checkpointing.IncompatibleCheckpointError(
            f"config.init.from={source}: its text tower is {tower!r} but config.text.tower={config.text.tower!r}"
            + ("; pass --config.text.tower=qwen3 --config.text.hf_folder=DIR (a local Qwen3(-Embedding) folder for "
               "its config.json and tokenizer; its weights are not read)" if tower == "qwen3" else ""))
    return found


def handoff_state(config: mlc.ConfigDict, program: Program) -> tuple[dict, dict]:
    """The first state of a stage that continues another run's EMA teacher (recipe §1), and a record of it.

    The previous teacher becomes both student and teacher; the optimizer starts fresh; heads are kept
    ("continue") or re-initialised ("backbone", "inflate_2d_to_3d" — upstream drops head keys, recipe §7).
    "vlm" (stage 3 from an imported FlexiCT-3D-VLM or another stage-3 run) takes every part of the student the
    source has (see `vlm_source`); the rest (the released VLM has no DINO/iBOT heads) starts fresh. The task's
    `initial_params` (e.g. the Qwen3 weights of config.text.hf_folder) applies to the other modes only.
    """
    source, mode = config.init.from_workdir, config.init.mode
    teacher, step, source_meta = checkpointing.read_subtree(source, "teacher", config.init.step)
    if mode == "vlm":
        teacher = vlm_source(config, source, step, teacher, source_meta)
    task = tasks.get(config)
    fresh = jax.device_get(jax.jit(program.init_state)())
    params = dict(fresh["params"])
    reference = jax.tree.map(lambda a: a, program.abstract_state["params"])
    if mode == "inflate_2d_to_3d":
        teacher = dict(teacher, backbone=inflate.inflate_patch_embed(teacher["backbone"]))
    if mode == "vlm":
        parts = tuple(part for part in params if part in teacher)
    else:
        parts = (("backbone",) if mode in ("backbone", "inflate_2d_to_3d")
                 else tuple(task.teacher_params(params)))  # "continue": the parts an EMA teacher has
    for part in parts:
        if part not in teacher:
            raise checkpointing.IncompatibleCheckpointError(
                f"config.init.from={source}: its teacher has no {part!r} (it has {sorted(teacher)})")
        params[part] = checkpointing.conform(teacher[part], reference[part], what=f"config.init.from={source}")
    state = dict(fresh, step=np.zeros((), np.int32), params=params,
                 teacher=task.teacher_params(params), opt_state=jax.device_get(program.tx.init(params)))
    state = jax.device_put(state, program.state_shardings)
    if mode != "vlm":
        state = dict(state, params=task.initial_params(config, state["params"]))
    record = {"from": str(source), "step": step, "mode": mode, "from_stage": source_meta.get("stage"),
              "fresh": sorted(set(params) - set(parts))}
    return state, record


def with_gram_teacher(config: mlc.ConfigDict, program: Program, state: dict) -> tuple[dict, dict]:
    """Loads the frozen Gram teacher (the EMA-teacher backbone of a named earlier run, recipe §6) into the state.
    It is saved with every checkpoint, so a resume keeps the same Gram teacher (fixing recipe §13 #5)."""
    source = config.gram.from_workdir
    teacher, step, _ = checkpointing.read_subtree(source, "teacher", config.gram.step)
    reference = program.abstract_state["gram_teacher"]["backbone"]
    backbone = checkpointing.conform(teacher["backbone"], reference, what=f"config.gram.from_workdir={source}")
    state = dict(state, gram_teacher=jax.device_put({"backbone": backbone},
                                                     program.state_shardings["gram_teacher"]))
    return state, {"from": str(source), "step": step}


def enable_compilation_cache() -> None:
    """A persistent XLA cache lets a resumed or repeated run skip recompiling its step variants — on
    accelerators only: on XLA:CPU with several devices, stage-3 steps loaded from the cache were seen to hang in
    their collectives (then abort at the rendezvous timeout), so CPU runs always compile. Call after
    `distributed.maybe_initialize` (it starts the backend); a cache directory set by the user is kept."""
    if jax.default_backend() != "cpu" and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/flexict_jax/xla"))


def train(config: mlc.ConfigDict, workdir: str) -> int:
    """Runs (or resumes) the stage in `workdir`. Returns the process exit code."""
    distributed.maybe_initialize()
    enable_compilation_cache()
    validate_config(config)
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    adopt_rope_periods(config, workdir)
    is_chief = jax.process_index() == 0
    if is_chief:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    mesh = sharding.make_mesh(config.mesh)
    writer = metric_io.MetricWriter(workdir, enabled=is_chief)

    with sharding.activate(mesh, config.sharding_rules):
        program = build_program(config, mesh)
        report = sharding.sharding_report(mesh, program.abstract_state["params"], program.param_specs)
        if is_chief:
            (workdir / "sharding_report.json").write_text(json.dumps(report, indent=1))
        logging.info("parameters: %.1f MB, %.1f MB per device on mesh %s", report["total_bytes"] / 2**20,
                     report["bytes_per_device"] / 2**20, report["mesh"])
        for name in report["large_replicated"]:
            logging.warning("large parameter %s is replicated on every device; check config.sharding_rules", name)

        dataset = datasets.build_dataset(config, process_index=jax.process_index(),
                                         process_count=jax.process_count())
        data_iterator = iter(dataset)
        ckpt = checkpointing.Checkpointer(workdir / "checkpoints", **config.ckpt.to_dict())
        meta = {"stage": config.stage, "config": json.loads(config.to_json_best_effort())}
        latest = ckpt.latest_step()
        if latest is not None:  # our own checkpoint always wins: a resume never re-applies the hand-off
            logging.info("resuming from %s", workdir / "checkpoints" / str(latest))
            state = ckpt.restore(latest, program.abstract_state, data_iterator)
            saved_meta = ckpt.read_meta(latest)
            meta.update({k: saved_meta[k] for k in ("init", "gram") if k in saved_meta})
        else:
            if config.init.from_workdir:
                state, meta["init"] = handoff_state(config, program)
                logging.info("starting from %s (step %d, mode %s)", meta["init"]["from"], meta["init"]["step"],
                             meta["init"]["mode"])
            else:
                state = jax.jit(program.init_state, out_shardings=program.state_shardings)()
                state = dict(state, params=tasks.get(config).initial_params(config, state["params"]))
            if uses_gram(config):
                state, meta["gram"] = with_gram_teacher(config, program, state)
                logging.info("Gram teacher: %s step %d", meta["gram"]["from"], meta["gram"]["step"])
            if "init" in meta or "gram" in meta:  # a converted start is a checkpoint of its own
                ckpt.save(0, state, data_iterator, meta, force=True)

        evaluate = tasks.get(config).evaluator(config, program)
        stop = _StopFlag()
        step = int(jax.device_get(state["step"]))
        compiled: dict[Variant, Callable] = {}
        throughput = metric_io.Throughput(step, config.total_steps)
        nonfinite_streak, exit_code = 0, 0
        pending = None  # (step, variant, metrics) of the last dispatched step whose metrics are not read yet

        def settle(done: int, variant: Variant, metrics: dict) -> bool:
            """Reads step `done`'s metrics (waiting for that step, not for any queued behind it): the non-finite
            streak and the log. True when the streak says stop."""
            nonlocal nonfinite_streak
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
            if done % config.log_every == 0 or done == config.total_steps:
                scalars = {k: v for k, v in jax.device_get(metrics).items() if k != "finite"}
                writer.write(done, {**scalars, "patch_size": variant.patch_size,
                                    **throughput.update(done, config.global_batch_size)})
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
            local = tasks.get(config).step_batch(next(data_iterator), variant)
            batch = global_batch(mesh, local)
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
            pending = (step, variant, metrics)
            evaluating = evaluate is not None and (step % config.eval.every_steps == 0
                                                   or step == config.total_steps)
            if evaluating or ckpt.due(step) or step == config.total_steps:
                # A checkpoint must know this step's flag before the next step consumes (donates) its state.
                if settle(*pending):
                    exit_code = 1
                    break
                pending = None
                if evaluating:
                    writer.write(step, evaluate(state))
                if nonfinite_streak == 0:  # never checkpoint inside a non-finite streak: keep the last good one
                    ckpt.save(step, state, data_iterator, meta, force=step == config.total_steps)
        ckpt.close()
        writer.close()
    return exit_code
