"""Orbax checkpoints of the train state, the Grain iterator position and run metadata.

Layout: `WORKDIR/checkpoints/<step>/{state,data,meta}`. `state` is a pure pytree (nested dicts of arrays: no
framework objects, so export and stage hand-off can read it without building the trainer); `data` is one JSON
per process with its Grain iterator state; `meta` holds the resolved config and the parameter shapes, so a
resume that would change shapes is refused before anything is loaded.
"""
from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath


class IncompatibleCheckpointError(RuntimeError):
    pass


def absolute(path: epath.PathLike) -> epath.Path:
    """Orbax refuses relative paths; cloud paths (gs://...) are absolute already."""
    text = str(path)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def _shapes(tree: Any) -> dict[str, list[int]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): list(np.shape(leaf)) for path, leaf in flat}


class Checkpointer:
    def __init__(self, directory: epath.PathLike, *, every_steps: int, keep_last: int, keep_every: int = 0,
                 async_save: bool = True):
        # Step 0 exists only when the run started from another stage (the converted hand-off): keep it.
        policies = [ocp.checkpoint_managers.LatestN(keep_last), ocp.checkpoint_managers.CustomSteps([0])]
        if keep_every:
            policies.append(ocp.checkpoint_managers.EveryNSteps(keep_every))
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(every_steps),
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            create=True)
        self.directory = absolute(directory)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def due(self, step: int) -> bool:
        """Whether `save` without force would write `step` (the interval policy)."""
        return self._manager.should_save(step)

    def save(self, step: int, state: Any, data_iterator: Any, meta: dict, *, force: bool = False) -> bool:
        """Saves when the interval policy says so, or always with `force` (end of run, preemption)."""
        if step in self._manager.all_steps():
            return False  # resuming right after a save: the step is already on disk
        meta = dict(meta, param_shapes=_shapes(state["params"]))
        return self._manager.save(step, force=force, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator),
            meta=ocp.args.JsonSave(meta)))

    def read_meta(self, step: int) -> dict:
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> Any:
        """Restores into `abstract_state`'s shapes and shardings (the current mesh, which may differ from the
        one that saved) and moves `data_iterator` to the saved position."""
        saved = self.read_meta(step).get("param_shapes", {})
        wanted = _shapes(abstract_state["params"])
        if saved != wanted:
            diff = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
            details = "; ".join(f"{k}: checkpoint {saved.get(k)} vs config {wanted.get(k)}" for k in diff[:8])
            raise IncompatibleCheckpointError(
                f"refusing to resume from {self.directory / str(step)}: the config changes {len(diff)} parameter "
                f"shape(s) ({details}{' ...' if len(diff) > 8 else ''}). Use a new --workdir for a different model, "
                f"or restore the original config.")
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(data_iterator)))
        return restored["state"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def latest_step(workdir: epath.PathLike) -> int | None:
    directory = epath.Path(workdir) / "checkpoints"
    steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit()] if directory.exists() else []
    return max(steps) if steps else None


def read_subtree(workdir: epath.PathLike, name: str, step: int | None = None) -> tuple[Any, int, dict]:
    """Host (numpy) copy of one top-level entry of a run's saved state, e.g. its EMA "teacher", plus the step and
    the run's meta — without building that run's trainer, optimizer or data pipeline (a partial restore)."""
    workdir = absolute(workdir)
    step = latest_step(workdir) if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {workdir / 'checkpoints'}")
    step_dir = workdir / "checkpoints" / str(step)
    if not (step_dir / "state").exists():
        raise FileNotFoundError(f"no checkpoint state at {step_dir}")
    checkpointer = ocp.PyTreeCheckpointer()
    saved = checkpointer.metadata(step_dir / "state").item_metadata
    if name not in saved:
        raise KeyError(f"{step_dir / 'state'} has no {name!r} entry (it has {sorted(saved.keys())})")
    target = {name: jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), saved[name])}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    tree = checkpointer.restore(step_dir / "state", args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True))[name]
    meta_path = step_dir / "meta" / "metadata"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return tree, step, meta


def conform(tree: Any, like: Any, *, what: str) -> Any:
    """`tree` rearranged into the structure of `like` (keys matched by name, so checkpoint string keys such as
    "0" meet integer block keys), with a clear error on a missing key or a shape mismatch."""
    by_name = {_key_path(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    leaves = []
    for path, ref in jax.tree_util.tree_flatten_with_path(like)[0]:
        key = _key_path(path)
        if key not in by_name:
            raise KeyError(f"{what}: no parameter {key}")
        value = by_name[key]
        if tuple(np.shape(value)) != tuple(ref.shape):
            raise ValueError(f"{what}: parameter {key} has shape {np.shape(value)}, expected {tuple(ref.shape)}")
        leaves.append(np.asarray(value, dtype=ref.dtype))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), leaves)


def _key_path(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
