"""Orbax checkpoints of the train state, the Grain iterator position and run metadata.

Layout: `WORKDIR/checkpoints/<step>/{state,data,meta}`. `state` is a pure pytree (nested dicts of arrays: no
framework objects, so export and stage hand-off can read it without building the trainer); `data` is one JSON
per process with its Grain iterator state; `meta` holds the resolved config and the parameter shapes, so a
resume that would change shapes is refused before anything is loaded.
"""
from __future__ import annotations

from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath


class IncompatibleCheckpointError(RuntimeError):
    pass


def _shapes(tree: Any) -> dict[str, list[int]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): list(np.shape(leaf)) for path, leaf in flat}


class Checkpointer:
    def __init__(self, directory: epath.PathLike, *, every_steps: int, keep_last: int, keep_every: int = 0,
                 async_save: bool = True):
        policies = [ocp.checkpoint_managers.LatestN(keep_last)]
        if keep_every:
            policies.append(ocp.checkpoint_managers.EveryNSteps(keep_every))
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(every_steps),
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            create=True)
        self.directory = epath.Path(directory)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

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
