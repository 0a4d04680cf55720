"""Mesh construction and logical-axis sharding.

Model code names axes logically ("embed", "mlp", "batch", ...); the config maps those names onto the mesh
axes ("data", "fsdp", "tensor"). Nothing outside this file needs to know mesh axis names.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as core_spmd
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one entry of `shape` may be -1 to take the remaining devices.

    Axis types are Auto on purpose: `jax.make_mesh` defaults to Explicit axes since jax 0.9, which makes
    GSPMD-style code fail with ShardingTypeError (jax_stack.md §A6).
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = list(shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"config.mesh must have {len(MESH_AXES)} entries {MESH_AXES}, got {shape}")
    if shape.count(-1) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {shape}")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"config.mesh {shape}: {len(devices)} devices are not divisible by {known}")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ValueError(f"config.mesh {tuple(shape)} needs {math.prod(shape)} devices, {len(devices)} available")
    device_array = np.asarray(devices).reshape(shape)
    if jax.process_count() == 1 and devices == jax.devices():
        from jax.experimental import mesh_utils
        device_array = mesh_utils.create_device_mesh(shape, devices=devices)
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


@contextlib.contextmanager
def activate(mesh: Mesh, rules: LogicalRules) -> Iterator[None]:
    """Makes `mesh` and the logical rules current: model init, the train step and `constrain` use them."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(list(rules)):
        yield


def logical_to_spec(names: Sequence[str | None], rules: LogicalRules | None = None) -> P:
    rules = core_spmd.get_logical_axis_rules() if rules is None else rules
    return P(*core_spmd.from_sharding_rules(tuple(names), list(rules)))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical axis names; a no-op when no mesh is active."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not core_spmd.get_logical_axis_rules():
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names))


def batch_spec(ndim: int) -> P:
    """The data-parallel spec for an array whose leading axis is the (global) batch."""
    return logical_to_spec(("batch",) + (None,) * (ndim - 1))


def named_sharding_tree(mesh: Mesh, spec_tree: Any) -> Any:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), spec_tree, is_leaf=lambda s: isinstance(s, P))


def sharding_report(mesh: Mesh, abstract_params: Any, specs: Any, *, warn_bytes: int = 1 << 20) -> dict:
    """Per-parameter placement: shape, spec and bytes per device; large replicated parameters are flagged
    (maxtext's `sharding_tolerance` idea: anything big left unsharded wastes memory on every device)."""
    rows, total, per_device = [], 0, 0
    flat_specs = dict(jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda s: isinstance(s, P))[0])
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
        spec = flat_specs[path]
        nbytes = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        shards = math.prod(mesh.shape[a] for axes in spec if axes for a in ((axes,) if isinstance(axes, str) else axes))
        rows.append({"param": jax.tree_util.keystr(path), "shape": list(leaf.shape), "spec": str(spec),
                     "bytes": nbytes, "bytes_per_device": nbytes // shards,
                     "replicated_large": shards == 1 and nbytes >= warn_bytes and mesh.size > 1})
        total += nbytes
        per_device += nbytes // shards
    return {"mesh": dict(mesh.shape), "total_bytes": total, "bytes_per_device": per_device,
            "large_replicated": [r["param"] for r in rows if r["replicated_large"]], "params": rows}
