"""One training step and everything it needs, built once per run: the abstract state, its shardings, the optimizer
and the schedule tables (`Program`), and the jitted step per variant.

The state is a pytree {step, params, teacher, opt_state} plus any frozen parts (stage 1.1's gram_teacher), which
the step passes to the task's `loss_fn` as keyword arguments named after them. The trainer, the planner and the
benchmarks all build their steps here.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flexict_jax import optim, schedules, sharding, tasks
from flexict_jax.variants import Variant

# The parts of the state a step updates; every other part is frozen and handed to the task's loss as is.
TRAINED_PARTS = ("step", "params", "teacher", "opt_state")


def uses_gram(config: mlc.ConfigDict) -> bool:
    """Whether the run trains against a frozen Gram teacher (stage 1.1, docs/recipe.md §6)."""
    return config.loss.get("gram_weight", 0.0) > 0


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
              for name in schedules.SCHEDULE_NAMES}
    task = tasks.get(config)
    abstract_model = nnx.eval_shape(lambda: task.build_model(config, config.seed))
    graphdef, abstract_params = nnx.split(abstract_model)
    param_specs = nnx.to_pure_dict(nnx.get_partition_spec(abstract_params))
    sharding.check_divisible(mesh, nnx.to_pure_dict(abstract_params), param_specs)
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
    frozen = {k: v for k, v in state.items() if k not in TRAINED_PARTS}  # e.g. stage 1.1's gram_teacher
    (loss, terms), grads = jax.value_and_grad(task.loss_fn, has_aux=True)(
        state["params"], state["teacher"], batch, key, graphdef=program.graphdef,
        abstract_state=program.abstract_params, config=config, patch_size=variant.patch_size,
        teacher_temperature=temperature, **frozen)
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
