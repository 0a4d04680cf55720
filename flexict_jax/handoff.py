"""Stage hand-off: how a run's first state comes from another run (docs/recipe.md §1), and the frozen Gram teacher.

A stage continues the previous stage's EMA teacher (`config.init.from`, mode `continue`, `backbone`,
`inflate_2d_to_3d`, or `vlm` for a vision-language source), adopts the explicit RoPE periods its weights carry,
and — stage 1.1 — loads a frozen Gram teacher from an earlier run (`config.gram.from_workdir`). All of it runs
once, when the run has no checkpoint of its own; the trainer saves the result as step 0 and records it in every
later checkpoint's metadata. What depends on the task (which parts an EMA teacher tracks, which hand-off modes it
accepts, what a vision-language source must hold) is asked of the task.
"""
from __future__ import annotations

from typing import Any

import jax
import ml_collections as mlc
import numpy as np
from absl import logging
from etils import epath

from flexict_jax import checkpointing, tasks
from flexict_jax.errors import ConfigError
from flexict_jax.models import inflate
from flexict_jax.train_step import Program, uses_gram

INIT_MODES = ("continue", "inflate_2d_to_3d", "backbone", "vlm")
ROPE_PERIODS_KEYS = ("rope_periods_2d", "rope_periods_3d")
HEADLESS_MODES = ("backbone", "inflate_2d_to_3d")  # the modes that re-initialise the heads unless init.keep_heads


def validate(config: mlc.ConfigDict) -> None:
    """The hand-off and Gram keys: modes the task accepts, sources that exist."""
    if uses_gram(config) and not config.gram.from_workdir:
        raise ConfigError("config.loss.gram_weight > 0 needs a frozen Gram teacher: pass "
                          "--config.gram.from_workdir=RUN_DIR [--config.gram.step=N] (docs/recipe.md §6)")
    if config.init.from_workdir:
        task = tasks.get(config)
        if config.init.mode not in INIT_MODES:
            raise ConfigError(f"config.init.mode={config.init.mode!r} must be one of {INIT_MODES}")
        if config.init.mode not in task.INIT_MODES:
            raise ConfigError(f"config.init.mode={config.init.mode!r} is not a hand-off config.task="
                              f"{config.get('task', 'dino')!r} accepts ({task.INIT_MODES})"
                              + ("; 'vlm' starts stage 3 from a vision-language checkpoint: use "
                                 "--config=configs/stage3.py" if config.init.mode == "vlm" else ""))
        if config.init.get("keep_heads") and config.init.mode not in HEADLESS_MODES:
            raise ConfigError(f"config.init.keep_heads=True applies to init.mode {HEADLESS_MODES}, not "
                              f"{config.init.mode!r} (which keeps or takes its heads by itself)")
        if not epath.Path(config.init.from_workdir).exists():
            raise ConfigError(f"config.init.from={config.init.from_workdir!r} does not exist")


def adopt_rope_periods(config: mlc.ConfigDict, workdir: epath.Path) -> None:
    """Explicit RoPE periods travel with the weights (an imported file's own bf16 buffers, docs/torch_format.md §1.3):
    unless config.model sets them, a run takes them from its own latest checkpoint when it resumes, else from
    config.init.from. Periods set in the config that differ from the source's are refused."""
    if checkpointing.latest_step(workdir) is not None:
        source, step = workdir, None
    elif config.init.from_workdir:
        source, step = config.init.from_workdir, config.init.step
    else:
        return
    model = checkpointing.read_run_meta(source, step).get("config", {}).get("model", {})
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
    them) and the student's others (the text side, which an EMA teacher may not track). The task checks that
    they make up the vision-language model it trains."""
    student, _, _ = checkpointing.read_subtree(source, "params", step)
    found = {**student, **teacher}
    tasks.get(config).check_vlm_source(config, source, found, meta)
    return found


def handoff_state(config: mlc.ConfigDict, program: Program) -> tuple[dict, dict]:
    """The first state of a stage that continues another run's EMA teacher (docs/recipe.md §1), and a record of it.

    The previous teacher becomes both student and teacher; the optimizer starts fresh; heads are kept
    ("continue") or re-initialised ("backbone", "inflate_2d_to_3d" — upstream drops head keys, docs/recipe.md §7)
    unless `config.init.keep_heads` (an experiment option: at CPU scale a new head takes longer than the stage
    to learn, docs/evaluation.md "Stage 2: settings tried").
    "vlm" takes every part of the student the source has (see `vlm_source`); the rest (the released VLM has no
    DINO/iBOT heads) starts fresh. The task's `initial_params` (e.g. the Qwen3 weights of config.text.hf_folder)
    applies to the other modes only.
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
        parts = (("backbone",) if mode in HEADLESS_MODES and not config.init.get("keep_heads")
                 else tuple(task.teacher_params(params)))  # the parts an EMA teacher has
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
              "fresh": sorted(set(params) - set(parts)), "from_provenance": source_meta.get("provenance")}
    return state, record


def with_gram_teacher(config: mlc.ConfigDict, program: Program, state: dict[str, Any]) -> tuple[dict, dict]:
    """Loads the frozen Gram teacher (the EMA-teacher backbone of a named earlier run, docs/recipe.md §6) into the state.
    It is saved with every checkpoint, so a resume keeps the same Gram teacher (fixing docs/recipe.md §13 #5)."""
    source = config.gram.from_workdir
    teacher, step, _ = checkpointing.read_subtree(source, "teacher", config.gram.step)
    reference = program.abstract_state["gram_teacher"]["backbone"]
    backbone = checkpointing.conform(teacher["backbone"], reference, what=f"config.gram.from_workdir={source}")
    state = dict(state, gram_teacher=jax.device_put({"backbone": backbone},
                                                     program.state_shardings["gram_teacher"]))
    return state, {"from": str(source), "step": step}


def first_state(config: mlc.ConfigDict, program: Program) -> tuple[dict, dict[str, dict]]:
    """A new run's state — handed off from config.init.from, else built from scratch — with its Gram teacher,
    and the records of where they came from ({"init": ..., "gram": ...}, empty for a plain scratch start)."""
    records: dict[str, dict] = {}
    if config.init.from_workdir:
        state, records["init"] = handoff_state(config, program)
        logging.info("starting from %s (step %d, mode %s)", records["init"]["from"], records["init"]["step"],
                     records["init"]["mode"])
    else:
        state = jax.jit(program.init_state, out_shardings=program.state_shardings)()
        state = dict(state, params=tasks.get(config).initial_params(config, state["params"]))
    if uses_gram(config):
        state, records["gram"] = with_gram_teacher(config, program, state)
        logging.info("Gram teacher: %s step %d", records["gram"]["from"], records["gram"]["step"])
    return state, records
