"""Orbax checkpoints of the train state, the data position and run metadata; elastic, self-healing restore.

Layout: `WORKDIR/checkpoints/<step>/{state,meta}`. `state` is a pure pytree (nested dicts of arrays: no
framework objects, so export and stage hand-off can read it without building the trainer); `meta` (one JSON,
written by the primary host) holds the resolved config, the parameter shapes (a resume that would change them
is refused before anything is loaded), the topology that wrote it and the data position: the index of the next
GLOBAL batch. Global batch t is the same examples on any number of hosts (data/grain_common.py), so that one
number puts every host of any process count at the right place: a run saved on N hosts resumes on M
(`restore_latest`: parameters, optimizer and teachers restored onto the new mesh's shardings). Checkpoints
written before the position moved into meta hold one Grain iterator state per process in `<step>/data/`; they
are still read, whatever the process count now.

`restore_latest` also falls back: a step that does not restore (truncated or corrupt arrays, missing meta or
data position, an unfinished save) is moved to `checkpoints/corrupt/<step>` (never deleted) with one warning,
and the next newest is tried; every process restores the same step.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from flexict_jax import distributed

COMMIT_MARKER = "commit_success.txt"
CORRUPT_DIR = "corrupt"  # where steps that do not restore are moved, under the checkpoint directory
_LEGACY_DATA_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


class IncompatibleCheckpointError(RuntimeError):
    """The checkpoint is fine but the config does not fit it (shapes, global batch): refused, nothing moved."""


class NoRestorableCheckpointError(RuntimeError):
    """Checkpoints exist but none of them restores."""


@dataclasses.dataclass(frozen=True)
class Restored:
    step: int
    state: Any
    data_position: int  # the index of the next global batch
    meta: dict  # the saved meta; "topology_changes" has this resume's change appended when the topology changed


def topology(mesh: jax.sharding.Mesh) -> dict:
    """What ran a step: process and device counts and the mesh axes (recorded in every checkpoint's meta)."""
    return {"processes": jax.process_count(), "devices": jax.device_count(), "mesh": dict(mesh.shape)}


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
        _drop_closed_loop_callbacks()
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

    def due(self, step: int) -> bool:
        """Whether `save` without force would write `step` (the interval policy)."""
        return self._manager.should_save(step)

    def save(self, step: int, state: Any, data_iterator: Any, meta: dict, *, force: bool = False) -> bool:
        """Saves when the interval policy says so, or always with `force` (end of run, preemption).
        `data_iterator.position` is the index of the next global batch (datasets.GlobalBatches)."""
        if step in self._manager.all_steps():
            return False  # resuming right after a save: the step is already on disk
        if not (force or self._manager.should_save(step)):
            return False
        meta = dict(meta, param_shapes=_shapes(state["params"]), data={"position": int(data_iterator.position)},
                    fingerprints=fingerprints(state))
        return self._manager.save(step, force=force, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

    def read_meta(self, step: int) -> dict:
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore_latest(self, abstract_state: Any, *, global_batch_size: int, topology: dict) -> Restored | None:
        """The newest step that restores, onto `abstract_state`'s shapes and shardings (the current mesh, which
        may differ from the one that saved), with its data position; None when there is no checkpoint.

        Steps newer than the one restored, which failed on some process, are moved to `corrupt/` with a warning
        naming the step and the reason; so are unfinished saves. When none restores nothing is moved and
        NoRestorableCheckpointError lists every step's reason. A config that does not fit a checkpoint
        (IncompatibleCheckpointError) is refused as it is: that is not damage, and the older steps would not
        fit either. Call on every process: they agree on each step through `distributed.all_gather_text`.
        """
        unfinished = self._unfinished_saves()
        failed: list[tuple[int, str]] = []
        for step in sorted(self._manager.all_steps(read=True), reverse=True):
            restored, reason = None, ""
            try:
                restored = self._restore(step, abstract_state, global_batch_size)
            except IncompatibleCheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 — any failure to read a step is a reason to try the previous one
                reason = _one_line(e)
            reasons = [r for r in distributed.all_gather_text(f"restore/{self.directory}/{step}", reason) if r]
            if not reasons:  # only now is anything moved: a refused start leaves the checkpoints as they were
                for bad, why in [*((name, "an unfinished save") for name in unfinished), *failed]:
                    self._set_aside(bad, why)
                self._manager.reload()
                return self._with_topology(restored, topology)
            failed.append((step, reasons[0]))
        if failed:
            raise NoRestorableCheckpointError(
                f"no checkpoint under {self.directory} restores (nothing was moved): "
                + "; ".join(f"step {step}: {why}" for step, why in failed))
        for name in unfinished:  # a first save that never finished: the run starts from scratch
            self._set_aside(name, "an unfinished save")
        return None

    def _restore(self, step: int, abstract_state: Any, global_batch_size: int) -> Restored:
        # Orbax writes it last, locally and on object stores (where it is the only sign of a finished save).
        if not (self.directory / str(step) / COMMIT_MARKER).exists():
            raise FileNotFoundError(f"the save did not finish: no {COMMIT_MARKER}")
        meta = self.read_meta(step)
        if not isinstance(meta, dict):
            raise ValueError(f"{self.directory / str(step) / 'meta'} holds no metadata")
        saved = meta.get("param_shapes", {})
        wanted = _shapes(abstract_state["params"])
        if saved != wanted:
            diff = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
            details = "; ".join(f"{k}: checkpoint {saved.get(k)} vs config {wanted.get(k)}" for k in diff[:8])
            raise IncompatibleCheckpointError(
                f"refusing to resume from {self.directory / str(step)}: the config changes {len(diff)} parameter "
                f"shape(s) ({details}{' ...' if len(diff) > 8 else ''}). Use a new --workdir for a different model, "
                f"or restore the original config.")
        saved_batch = meta.get("config", {}).get("global_batch_size")
        if saved_batch is not None and saved_batch != global_batch_size:
            raise IncompatibleCheckpointError(
                f"refusing to resume from {self.directory / str(step)}: config.global_batch_size={global_batch_size} "
                f"but the run was trained with {saved_batch}, and the data order (global batch t = examples "
                f"[t*B, (t+1)*B)) depends on it. Keep --config.global_batch_size={saved_batch} on any number of "
                f"devices that divides it (the per-device batch changes instead), or start a new --workdir.")
        position = _data_position(self.directory / str(step), meta)
        state = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))["state"]
        if "fingerprints" in meta:  # older checkpoints have none
            found = fingerprints(state)
            bad = [k for k, v in meta["fingerprints"].items() if found.get(k) != v]
            if bad:
                raise ValueError(f"{len(bad)} array(s) differ from what was saved (fingerprint mismatch): "
                                 f"{', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}")
        return Restored(step, state, position, meta)

    def _with_topology(self, restored: Restored, now: dict) -> Restored:
        """Logs (once, here) and records in the meta a change of processes, devices or mesh since the save."""
        before = restored.meta.get("topology")
        if before == now:
            return restored
        batch = restored.meta.get("config", {}).get("global_batch_size")
        per_device = "" if not batch else (
            f"; per-device batch {batch // before['devices'] if before else '?'} -> {batch // now['devices']}")
        logging.warning("elastic resume from step %d: written by %s, continuing on %s%s", restored.step,
                        _describe(before), _describe(now), per_device)
        change = {"step": restored.step, "from": before, "to": now}
        meta = dict(restored.meta, topology_changes=[*restored.meta.get("topology_changes", []), change])
        return dataclasses.replace(restored, meta=meta)

    def _set_aside(self, step: int | str, reason: str) -> None:
        """Moves `<step>` (or an unfinished save's directory) to `corrupt/`, never deleting; the primary host
        moves, the others wait for it."""
        source = self.directory / str(step)
        target = self.directory / CORRUPT_DIR / str(step)
        if jax.process_index() == 0:
            logging.warning("checkpoint step %s does not restore (%s): moving it to %s", step, reason, target)
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():  # the same step failed before: keep both
                target = target.parent / f"{step}.{len(list(target.parent.glob(f'{step}*')))}"
            source.rename(target)
        distributed.barrier(f"set aside {source}")

    def _unfinished_saves(self) -> list[str]:
        """A save killed mid-write leaves `<step>.orbax-checkpoint-tmp` (on object stores: a step without its
        commit marker, which `_restore` refuses). Orbax never lists it; a later save of the step would collide,
        so `restore_latest` sets it aside too."""
        names = sorted(ocp.step.tmp_checkpoints(self.directory))
        # The primary host's list on every host: a host that looks after the primary moved them would see none.
        return json.loads(distributed.all_gather_text(f"unfinished/{self.directory}", json.dumps(names))[0])

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _drop_closed_loop_callbacks() -> None:
    """A failed async save (disk full) makes Orbax close its event loop while TensorStore writes are in flight;
    each late completion then prints a bare `RuntimeError: Event loop is closed` traceback through
    `sys.unraisablehook` (docs/jax_notes.md §A6). Those are dropped, every other unraisable is passed on, and the
    save's own error still reaches the user as one line."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_callbacks", False):
        return

    def hook(unraisable: Any) -> None:
        if (unraisable.object is None and isinstance(unraisable.exc_value, RuntimeError)
                and str(unraisable.exc_value) == "Event loop is closed"):
            return
        previous(unraisable)

    hook.drops_closed_loop_callbacks = True
    sys.unraisablehook = hook


@jax.jit
def _fingerprint_arrays(tree: Any) -> Any:
    def one(x: jax.Array) -> jax.Array:
        bits = (x.astype(jnp.uint8) if x.dtype == jnp.bool_ else
                jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]))
        weights = jnp.arange(x.size, dtype=jnp.uint32).reshape(x.shape) * 2 + 1
        return jnp.sum(bits.astype(jnp.uint32) * weights, dtype=jnp.uint32)
    return jax.tree.map(one, tree)


def fingerprints(state: Any) -> dict[str, int]:
    """Per array, the position-weighted sum of its bit patterns modulo 2**32. Integer addition is associative,
    so the number is exact and the same on any mesh or process count: a restore onto another topology checks
    every array against the one saved, which catches damaged array data that still decodes (Orbax and
    TensorStore do not checksum the bytes)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(_fingerprint_arrays(state))
    # Replicated scalars: every process holds the value (device_get would refuse a multi-process array).
    return {jax.tree_util.keystr(path): int(np.asarray(leaf.addressable_data(0))) for path, leaf in flat}


def _one_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:400] if text else ''}"


def _describe(topo: dict | None) -> str:
    if not topo:
        return "an unrecorded topology"
    return f"{topo['processes']} process(es) x {topo['devices'] // topo['processes']} devices, mesh {topo['mesh']}"


def _data_position(step_dir: epath.Path, meta: dict) -> int:
    """The index of the next global batch saved with `step_dir`: meta["data"]["position"], or for a checkpoint
    from before that, the Grain iterator states in `data/` (each process's count of batches consumed, which is
    the global batch count since every process takes one per step); all of them must be there and agree."""
    if "data" in meta:
        return int(meta["data"]["position"])
    data_dir = step_dir / "data"
    files = {m.groups(): p for p in (data_dir.iterdir() if data_dir.exists() else [])
             if (m := _LEGACY_DATA_FILE.fullmatch(p.name))}
    if not files:
        raise FileNotFoundError(f"{step_dir}: no data position (meta has no 'data' entry and {data_dir} holds no "
                                "iterator states)")
    counts = {int(count) for _, count in files}
    if len(counts) != 1:
        raise ValueError(f"{data_dir}: iterator states of different process counts {sorted(counts)}")
    count = counts.pop()
    missing = [f"process_{i}-of-{count}.json" for i in range(count) if (str(i), str(count)) not in files]
    if missing:
        raise FileNotFoundError(
            f"{data_dir}: the iterator states of {len(missing)} of the {count} processes that wrote it are missing "
            f"({', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}), so the data position is unknown")
    positions = {_grain_position(json.loads(p.read_text())) for p in files.values()}
    if len(positions) != 1:
        raise ValueError(f"{data_dir}: the processes' iterator states disagree (positions {sorted(positions)})")
    return positions.pop()


def _grain_position(state: dict) -> int:
    """Batches a Grain iterator has returned: a plain iterator's `next_index`, or with worker processes the sum
    over workers (each worker's `next_index` counts its round-robin share)."""
    if "next_index" in state:
        return int(state["next_index"])
    return sum(int(s["next_index"]) for s in state["iterators_in_use_states"])


def latest_step(workdir: epath.PathLike) -> int | None:
    """The newest finished step under `workdir/checkpoints` (unfinished saves and `corrupt/` are not steps)."""
    directory = epath.Path(workdir) / "checkpoints"
    steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit()] if directory.exists() else []
    return max(steps) if steps else None


def read_run_meta(workdir: epath.PathLike, step: int | None = None) -> dict:
    """The meta JSON of checkpoint `step` of a run, or by default of its newest step that has a readable one —
    no arrays read (a damaged newest step is `restore_latest`'s business)."""
    directory = absolute(workdir) / "checkpoints"
    steps = [step] if step is not None else sorted(
        (int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.exists() else [], reverse=True)
    for candidate in steps:
        path = directory / str(candidate) / "meta" / "metadata"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            if step is not None:
                raise
    return {}


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
