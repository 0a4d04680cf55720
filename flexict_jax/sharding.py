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
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flexict_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one entry of `shape` may be -1 to take the remaining devices.

    Devices from several TPU slices get a hybrid mesh whose "data" axis spans the slices.
    Axis types are Auto on purpose: `jax.make_mesh` defaults to Explicit axes since jax 0.9, which makes
    GSPMD-style code fail with ShardingTypeError (docs/jax_notes.md §A6).
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = list(shape)
    if len(shape) != len(MESH_AXES):
        raise ConfigError(f"config.mesh must have {len(MESH_AXES)} entries {MESH_AXES}, got {shape}")
    if shape.count(-1) > 1:
        raise ConfigError(f"config.mesh: at most one axis may be -1, got {shape}")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise ConfigError(f"config.mesh {shape}: {len(devices)} devices are not divisible by {known}")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ConfigError(f"config.mesh {tuple(shape)} needs {math.prod(shape)} devices, {len(devices)} available")
    num_slices = len({getattr(d, "slice_index", 0) for d in devices})
    if num_slices > 1:
        # Multi-slice (docs/jax_notes.md §C4): only "data" crosses the slow links between slices (DCN); fsdp and
        # tensor stay inside a slice (ICI). The data axis is the slices times any data parallelism within one.
        if shape[0] % num_slices:
            raise ConfigError(f"config.mesh {tuple(shape)}: the devices span {num_slices} slices, so the data axis "
                             f"must be a multiple of {num_slices}, e.g. config.mesh=({num_slices},-1,1)")
        device_array = mesh_utils.create_hybrid_device_mesh(
            (shape[0] // num_slices, *shape[1:]), (num_slices, 1, 1), devices=devices)
    elif (jax.process_count() == 1 and devices == jax.devices()) or devices[0].platform == "tpu":
        # TPU devices (also compile-only ones of `plan --topology`) are laid out along the physical torus.
        try:
            device_array = mesh_utils.create_device_mesh(shape, devices=devices)
        except NotImplementedError:
            # An axis that is no product of whole torus axes (fsdp 32 on a v6e 8x8, where the 864-wide model allows
            # at most 32: check_divisible) takes part of one; its collectives then run on a part of that ring.
            device_array = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
    else:
        device_array = np.asarray(devices).reshape(shape)
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


def global_batch(mesh: Mesh, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Global arrays, batch-sharded over the mesh, from this process's rows of the batch."""
    return {k: jax.make_array_from_process_local_data(NamedSharding(mesh, batch_spec(v.ndim)), v)
            for k, v in local.items()}


def named_sharding_tree(mesh: Mesh, spec_tree: Any) -> Any:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), spec_tree, is_leaf=lambda s: isinstance(s, P))


def spec_axes(entry: str | tuple[str, ...] | None) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry (None, one name, or a tuple of names) as a tuple."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def check_divisible(mesh: Mesh, abstract_params: Any, specs: Any) -> None:
    """ConfigError naming the first parameter whose sharded dimension the mesh does not divide, and a mesh that
    does: jax would refuse it later with an IndivisibleError deep in the first compile. The recipe's width
    (864 = 2⁵·27) splits over at most 32 fsdp devices, so a larger slice puts the rest on the data axis."""
    flat_specs = dict(jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda s: isinstance(s, P))[0])
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
        for dim, (size, entry) in enumerate(zip(leaf.shape, flat_specs[path])):
            axes = spec_axes(entry)
            shards = math.prod(mesh.shape[a] for a in axes)
            if size % shards:
                shape = dict(mesh.shape)
                hint = ""
                if axes == ("fsdp",):
                    fsdp = math.gcd(shape["fsdp"], size)
                    hint = (f"; e.g. config.mesh=({shape['data'] * shape['fsdp'] // fsdp},{fsdp},{shape['tensor']}) "
                            f"keeps the devices and moves the rest onto the data axis")
                raise ConfigError(f"config.mesh {tuple(shape.values())}: parameter {jax.tree_util.keystr(path)} of "
                                  f"shape {tuple(leaf.shape)} splits dimension {dim} ({size}) over {'×'.join(axes)} "
                                  f"({shards} devices), which does not divide it{hint}")


def parameter_group(path: tuple) -> str:
    """The report group of a parameter: its top-level module ("backbone", "dino_head", ...), with the repeated
    transformer blocks as a group of their own ("backbone/blocks") since they dominate the model's bytes."""
    keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
    return "/".join(keys[:2]) if len(keys) > 2 and keys[1] in ("blocks", "layers") else keys[0]


def sharding_report(mesh: Mesh, abstract_params: Any, specs: Any, *, warn_bytes: int = 1 << 20) -> dict:
    """Per-parameter and per-group placement: shape, spec and bytes per device. Large parameters left
    replicated are flagged (maxtext's `sharding_tolerance` idea: anything big left unsharded wastes memory on
    every device); `replicated_fraction` is the share of all parameter bytes kept whole on every device of a
    multi-device mesh."""
    rows, groups = [], {}
    flat_specs = dict(jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda s: isinstance(s, P))[0])
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
        spec = flat_specs[path]
        nbytes = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        shards = math.prod(mesh.shape[a] for entry in spec for a in spec_axes(entry))
        group = parameter_group(path)
        rows.append({"param": jax.tree_util.keystr(path), "group": group, "shape": list(leaf.shape),
                     "spec": str(spec), "bytes": nbytes, "bytes_per_device": nbytes // shards,
                     "replicated_large": shards == 1 and nbytes >= warn_bytes and mesh.size > 1})
        totals = groups.setdefault(group, {"params": 0, "bytes": 0, "bytes_per_device": 0, "replicated_bytes": 0})
        totals["params"] += 1
        totals["bytes"] += nbytes
        totals["bytes_per_device"] += nbytes // shards
        totals["replicated_bytes"] += nbytes if shards == 1 and mesh.size > 1 else 0
    total = sum(g["bytes"] for g in groups.values())
    replicated = sum(g["replicated_bytes"] for g in groups.values())
    return {"mesh": dict(mesh.shape), "total_bytes": total,
            "bytes_per_device": sum(g["bytes_per_device"] for g in groups.values()),
            "replicated_fraction": replicated / total if total else 0.0,
            "warn_bytes": warn_bytes,
            "large_replicated": [r["param"] for r in rows if r["replicated_large"]],
            "groups": groups, "params": rows}
