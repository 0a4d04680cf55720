r"""Pre-flight planner: compile every step variant of a config without running it, and report per-device memory,
FLOPs and compile time — and whether the config fits the device memory.

    python -m flexict_jax.plan --config=configs/stage1.py[:variant] [--mesh=1,-1,1] [--devices=N] \
        [--topology=v5p:2x2x1 [--num-slices=K]] [--device-memory-gb=G] [--out=plan.json] [--config.KEY=VALUE ...]

On an accelerator host it compiles for the real devices. `--devices=N` instead plans for N devices on the CPU
(N fake CPU devices, the same mesh and shardings as N chips), which shows how the state and activations split
over a pod from a laptop; CPU and TPU/GPU compilers fuse and lay out buffers differently, so treat those numbers
as an estimate and re-plan on the target when it is close. `--topology=NAME` compiles for a Cloud TPU slice on any
host, ahead of time, with the TPU compiler itself (libtpu, the `tpu` extra; no TPU needed): NAME as
`jax.experimental.topologies` spells it, `v4:2x2x1`, `v5p:2x2x1`, `v5e:4x4`, `v6e:2x4`, ...; `--num-slices=K`
for K such slices joined by the data-centre network (the mesh's data axis must then be a multiple of K). Nothing
is allocated: the state and the batch are abstract (`jax.ShapeDtypeStruct`) and the step is only lowered and
compiled.

The step compiled is the one a run on the target compiles: `model.attention_impl=auto` resolves by the mesh's
devices (splash attention on a TPU slice, even from a CPU host), and the plan records the kernel it resolved to.

On TPU the plan also gives the TPU cost model's step time (`cost_analysis()["optimal_seconds"]`) and from it
samples/s and the model FLOP utilisation against the chip's bf16 peak (`TPU_CHIPS`). The cost model prices a
loop body once whatever its trip count (measured: a 16-step `lax.scan` of a matmul is priced as one step), and
prices the Pallas splash kernel at almost nothing (it carries no cost estimate), so the time comes from the
same step compiled again with the blocks unrolled and XLA attention in place of splash. It is a model of the
chip, not a measurement: it leaves out the input pipeline and host overheads.

Per-device peak = arguments + outputs − aliased (the donated state is reused for the new one) + temporaries,
from XLA's buffer assignment (`compiled.memory_analysis()`); tests/test_plan.py checks it against the measured
peak of a real step on the CPU. Exit status: 0, or 1 on a bad config and when a variant does not fit.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from absl import app, flags, logging
from ml_collections import config_flags

from flexict_jax.errors import ConfigError

if TYPE_CHECKING:
    import ml_collections as mlc

    from flexict_jax.train_step import Program
    from flexict_jax.variants import Variant

# jax and the train step are imported inside the functions: `--devices` must reach jax's config before anything
# starts a backend, and --help stays fast.

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config file, e.g. configs/stage1.py:demo",
                                          lock_config=True)
_MESH = flags.DEFINE_string("mesh", None, "Mesh (data,fsdp,tensor) to plan for, e.g. 1,-1,1; default config.mesh")
_DEVICES = flags.DEFINE_integer("devices", None, "Plan for this many fake CPU devices instead of the local devices")
_TOPOLOGY = flags.DEFINE_string("topology", None, "Compile for this Cloud TPU slice instead of the local devices, "
                                "e.g. v5p:2x2x1, v6e:2x4, v5e:4x4, v4:2x2x1 (needs libtpu: pip install '.[tpu]')")
_NUM_SLICES = flags.DEFINE_integer("num-slices", 1, "With --topology: this many slices (multi-slice, DCN)")
_MEMORY = flags.DEFINE_float("device-memory-gb", None, "Memory per device in GiB; default: what the device "
                             "reports (accelerators), none on CPU")
_HEADROOM = flags.DEFINE_float("headroom", 0.1, "Fraction of device memory kept free for the runtime, "
                               "fragmentation and the input pipeline's device buffers")
_OUT = flags.DEFINE_string("out", None, "Also write the plan as JSON to this file")
flags.mark_flags_as_required(["config"])

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    hbm_bytes: int  # HBM per chip, as the vendor's page states it (read as GiB; the runtime keeps a little)
    bf16_flops: float  # peak dense bf16 FLOP/s per chip
    source: str


# Keyed by `device.device_kind`. v4 and v5p chips have two TensorCores run as one device (megacore).
TPU_CHIPS = {
    "TPU v4": Chip(32 * GIB, 275e12, "https://cloud.google.com/tpu/docs/v4 (32 GiB HBM2, 275 TFLOP/s bf16)"),
    "TPU v5 lite": Chip(16 * GIB, 197e12, "https://cloud.google.com/tpu/docs/v5e (16 GB HBM2, 197 TFLOP/s bf16)"),
    "TPU v5": Chip(95 * GIB, 459e12, "https://cloud.google.com/tpu/docs/v5p (95 GB HBM2e, 459 TFLOP/s bf16)"),
    "TPU v6 lite": Chip(32 * GIB, 918e12, "https://cloud.google.com/tpu/docs/v6e (32 GB HBM, 918 TFLOP/s bf16)"),
}
TPU_CHIPS["TPU v5p"] = TPU_CHIPS["TPU v5"]
# Topology prefixes whose chips are megacore (one device per chip, not one per TensorCore).
_MEGACORE = ("v4", "v5p", "v5")
# A TPU host holds up to 2x2x1 chips; a smaller slice is one host of its own size.
_HOST_BOUNDS = (2, 2, 1)


def topology_devices(name: str, num_slices: int = 1) -> list[Any]:
    """The compile-only TPU devices of `num_slices` slices of topology `name` (e.g. "v5p:2x2x1"); needs libtpu,
    not a TPU."""
    import importlib.util

    from jax.experimental import topologies
    kind, _, shape = name.partition(":")
    try:
        dims = tuple(int(d) for d in shape.split("x"))
    except ValueError:
        dims = ()
    if not kind or len(dims) not in (2, 3) or min(dims) < 1:
        raise ValueError(f"--topology={name!r}: expected VERSION:AxB or VERSION:AxBxC, e.g. v5p:2x2x1 or v6e:4x4")
    if num_slices < 1:
        raise ValueError(f"--num-slices must be positive, got {num_slices}")
    if importlib.util.find_spec("libtpu") is None:
        raise ValueError(f"--topology={name} compiles with the TPU compiler, libtpu, which is not installed: "
                         f"pip install 'flexict_jax[tpu]'")
    bounds = tuple(min(d, b) for d, b in zip(dims + (1,) * (3 - len(dims)), _HOST_BOUNDS))
    try:
        topology = topologies.get_topology_desc(
            platform="tpu", topology_name=name, num_slices=num_slices, chips_per_host_bounds=bounds,
            chip_config_name="megacore" if kind in _MEGACORE else "default")
    except RuntimeError as e:  # libtpu's own message names what it did not accept
        raise ValueError(f"--topology={name}: {str(e).splitlines()[0]}") from e
    return list(topology.devices)


def abstract_batch(config: mlc.ConfigDict, variant: Variant) -> dict[str, Any]:
    """The global batch one step of `variant` takes, as `jax.ShapeDtypeStruct`s: the arrays the stage's data
    pipeline delivers (see its `build_*_dataset` docstring), narrowed by the task's `step_batch`."""
    import jax
    import numpy as np

    from flexict_jax import tasks
    from flexict_jax.data import datasets

    data, batch = config.data, config.global_batch_size
    volumes = data.kind in ("volumes3d", "reports3d")
    dims = 3 if volumes else 2
    global_size, local_size = datasets.crop_sizes(config)[variant.resolution_index]
    n_global = 1 if data.kind == "reports3d" else data.n_global_crops  # stage 3 takes one global view

    def crops(n: int, size: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((batch, n, *(size,) * dims, 1), np.float32)

    full = {"global_crops": crops(n_global, global_size), "local_crops": crops(data.n_local_crops, local_size)}
    for p in config.patch_sizes:
        full[f"masks_p{p}"] = jax.ShapeDtypeStruct((batch, n_global, (global_size // p) ** dims), np.bool_)
    if data.get("resolutions", None) and len(data.resolutions[variant.resolution_index]) > 2:
        full["gram_crops"] = crops(n_global, int(data.resolutions[variant.resolution_index][2]))
    if data.kind == "reports3d":
        text = config.text
        full.update(caption_tokens=jax.ShapeDtypeStruct((batch, text.caption_len), np.int32),
                    caption_mask=jax.ShapeDtypeStruct((batch, text.caption_len), np.bool_))
        for kind in ("pos", "neg"):
            full[f"osl_{kind}_tokens"] = jax.ShapeDtypeStruct((batch, text.osl_pairs, text.osl_len), np.int32)
            full[f"osl_{kind}_mask"] = jax.ShapeDtypeStruct((batch, text.osl_pairs, text.osl_len), np.bool_)
        full["osl_labels"] = jax.ShapeDtypeStruct((batch, text.osl_pairs), np.int32)
    return tasks.get(config).step_batch(full, variant)


def model_flops(config: mlc.ConfigDict, program: Program, variant: Variant, batch: dict[str, Any]) -> float:
    """FLOPs of one global step as the model defines them (forward and backward, no recomputation), from XLA's
    cost analysis of the step lowered, not compiled, with the blocks unrolled and no rematerialisation: the
    analysis counts a loop body once and counts recomputed work, and per-device compiled costs count replicated
    work once per device."""
    import jax

    from flexict_jax import sharding, train_step
    if config.model.scan_blocks or config.model.remat_policy != "none":
        config = config.copy_and_resolve_references()
        config.model.update(scan_blocks=False, remat_policy="none")
        program = train_step.build_program(config, program.mesh)
    on_cpu = program.mesh.devices.flat[0].platform == "cpu"
    try:
        cost = program.train_step(config, variant, batch).lower(program.abstract_state, batch).cost_analysis()
    except jax.errors.JaxRuntimeError:
        if on_cpu:
            raise
        cost = None  # a compile-only TPU backend: jax 0.11 raises where 0.10 gave no analysis (docs/jax_notes.md §C9)
    cost = (cost[0] if isinstance(cost, list) else cost) or {}
    if "flops" not in cost and not on_cpu:
        # Compile-only TPU devices (--topology) have no backend to analyse with; the global program's FLOPs do
        # not depend on where it runs, so count them on one CPU device.
        mesh = sharding.make_mesh((1, 1, 1), jax.devices("cpu")[:1])
        with sharding.activate(mesh, config.sharding_rules):
            return model_flops(config, train_step.build_program(config, mesh), variant, batch)
    return float(cost.get("flops", float("nan")))


def _memory_sizes(compiled: Any) -> dict[str, int]:
    memory = compiled.memory_analysis()
    return {name: int(getattr(memory, f"{name}_size_in_bytes")) for name in
            ("argument", "output", "alias", "temp", "generated_code")}


def _peak(sizes: dict[str, int]) -> int:
    return sizes["argument"] + sizes["output"] - sizes["alias"] + sizes["temp"] + sizes["generated_code"]


def _compile(lowered: Any) -> tuple[Any, str | None]:
    """The compiled program, or None and the compiler's line where the TPU compiler refuses it for the chip's
    HBM (RESOURCE_EXHAUSTED, with the bytes it needed): for the plan that is the answer "does not fit", not a
    crash."""
    import jax
    try:
        return lowered.compile(), None
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return None, str(e).strip().splitlines()[0].rstrip(".")


def compile_variant(config: mlc.ConfigDict, program: Program, variant: Variant) -> tuple[dict[str, Any], Any]:
    """Lowers and compiles one step variant against the abstract state; returns its plan row and the compiled
    executable (which can run on real arrays of the same shapes)."""
    batch = abstract_batch(config, variant)
    step = program.train_step(config, variant, batch)
    start = time.perf_counter()
    lowered = step.lower(program.abstract_state, batch)
    lowered_at = time.perf_counter()
    compiled, refusal = _compile(lowered)
    done = time.perf_counter()
    flops = model_flops(config, program, variant, batch)
    num_devices = program.mesh.size
    row = {"variant": {"patch_size": variant.patch_size, "resolution_index": variant.resolution_index},
           "batch": {k: [list(v.shape), str(v.dtype)] for k, v in batch.items()},
           "memory_per_device": None,
           "flops_per_device": flops / num_devices,
           "flops_per_step": flops,
           "lower_s": round(lowered_at - start, 2), "compile_s": round(done - lowered_at, 2)}
    if compiled is None:
        row.update(fits=False, compiler_refusal=refusal)
    else:
        sizes = _memory_sizes(compiled)
        row["memory_per_device"] = {**sizes, "peak": _peak(sizes)}
    return row, compiled


# Operations the TPU cost model has no price for. It adds -1 s for each to the program's time (measured: the
# sum is the priced remainder minus one second per such operation; docs/scaling.md §4). ConcatBitcast joins the
# slices the compiler splits a large buffer into, in place: free, so its -1 s is taken back.
_FREE_UNPRICED_CALL = 'custom_call_target="ConcatBitcast"'


def _optimal_seconds(compiled: Any) -> float:
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, list) else cost) or {}
    if "optimal_seconds" not in cost:
        return -1.0
    return float(cost["optimal_seconds"]) + compiled.as_text().count(_FREE_UNPRICED_CALL)


def with_global_batch(config: mlc.ConfigDict, global_batch: int, num_devices: int) -> mlc.ConfigDict:
    """`config` (changed in place and returned) at `global_batch` over `num_devices`, with the per-group
    options cut to fit the per-device batch: a drop-path group never spans devices (docs/scaling.md §4) and
    KoLeo's groups become the per-device batch where the global batch is no multiple of them (upstream's KoLeo
    runs per GPU batch)."""
    config.global_batch_size = global_batch
    per_device = global_batch // num_devices
    group = config.model.get("drop_path_group_size")
    if group and per_device % group:
        config.model.drop_path_group_size = math.gcd(group, per_device)
    koleo_group = config.get("loss", {}).get("koleo_group_size")
    if koleo_group and global_batch % koleo_group:
        config.loss.koleo_group_size = per_device
    return config


# How far the timed program's batch is halved when that program does not fit the chip (below).
_ESTIMATE_MAX_HALVINGS = 3


def step_estimate(config: mlc.ConfigDict, program: Program, variant: Variant, compiled: Any,
                  row: dict[str, Any], chip: Chip | None, attention_impl: str) -> dict[str, Any]:
    """The TPU cost model's time for one step of `variant` and what follows from it: samples/s and model FLOP
    utilisation against the chip's bf16 peak. None where the compiler has no cost model (CPU, GPU) or cannot
    price an operation of the step (it then answers a negative time).

    The cost model prices a loop body once and a Pallas kernel at almost nothing (docs/scaling.md §4), so the
    time comes from the step compiled with the blocks unrolled and, where the step runs splash attention
    (`attention_impl`, as resolved), XLA attention in its place; `estimate_memory_peak` is that program's peak.
    A splash step compiled unrolled also gives its own time, attention priced as free: a lower bound.

    That program can be over the chip's HBM where the step as configured fits (XLA attention writes the T × T
    scores; the unrolled blocks keep more). Then it is timed at half the per-device batch (rounded down), up to
    `_ESTIMATE_MAX_HALVINGS` times, and the time scaled back by the batch ratio (`estimate_batch_fraction`): the
    work of the forward and backward passes is linear in the batch, what is not (the parameters' all-gathers and
    gradient reduce-scatters, the optimizer and EMA update) is counted that many times over, so the scaled time
    errs long. Where no batch fits, `estimate_refusal` gives the compiler's line."""
    from flexict_jax import train_step
    out = {"estimated_step_s": None, "estimated_samples_per_s": None, "estimated_mfu": None}
    if program.mesh.devices.flat[0].platform != "tpu":
        return out
    if attention_impl == "splash" and not config.model.scan_blocks:
        seconds = _optimal_seconds(compiled)
        out["estimated_step_s_attention_unpriced"] = seconds if seconds > 0 else None
    global_batch, scale = config.global_batch_size, 1.0
    if config.model.scan_blocks or attention_impl == "splash":
        config = config.copy_and_resolve_references()
        config.model.scan_blocks = False
        if attention_impl == "splash":
            config.model.attention_impl = "xla"
        out["estimate_attention_impl"] = config.model.attention_impl
        start = time.perf_counter()
        for halvings in range(_ESTIMATE_MAX_HALVINGS + 1):
            timed = train_step.build_program(config, program.mesh)
            batch = abstract_batch(config, variant)
            compiled, refusal = _compile(timed.train_step(config, variant, batch).lower(timed.abstract_state, batch))
            # Half the per-device batch, rounded down (an odd 25 a chip becomes 12); KoLeo needs two samples a
            # group, so it stays >= 2.
            smaller = config.global_batch_size // program.mesh.size // 2
            if compiled is not None or smaller < 2 or halvings == _ESTIMATE_MAX_HALVINGS:
                break
            config = with_global_batch(config, smaller * program.mesh.size, program.mesh.size)
        out["estimate_compile_s"] = round(time.perf_counter() - start, 2)
        if compiled is None:
            out["estimate_refusal"] = refusal
            return out
        out["estimate_memory_peak"] = _peak(_memory_sizes(compiled))
        scale = global_batch / config.global_batch_size
        if scale > 1:
            out["estimate_batch_fraction"] = 1 / scale
    seconds = _optimal_seconds(compiled) * scale
    if seconds > 0:
        out["estimated_step_s"] = seconds
        out["estimated_samples_per_s"] = global_batch / seconds
        if chip:
            out["estimated_mfu"] = row["flops_per_device"] / (seconds * chip.bf16_flops)
    return out


def device_memory_bytes(device: Any) -> int | None:
    """What an accelerator reports as its memory limit (a compile-only TPU device: its chip's HBM from
    `TPU_CHIPS`); None on the CPU (host memory, shared by all fake devices)."""
    if device.platform == "cpu":
        return None
    try:
        stats = device.memory_stats()
    except RuntimeError:  # compile-only devices (--topology) have no runtime to ask
        stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    chip = TPU_CHIPS.get(device.device_kind)
    return chip.hbm_bytes if chip else None


def plan(config: mlc.ConfigDict, mesh_shape: tuple[int, ...], *, device_memory: int | None = None,
         headroom: float = 0.1, devices: list[Any] | None = None, estimate: bool = True,
         estimate_unfit: bool = True) -> dict[str, Any]:
    """Compiles every step variant of `config` on a `mesh_shape` mesh of `devices` (default: the local devices;
    `topology_devices` for a TPU slice without one); the plan as a dict. estimate=False skips the step time (on
    TPU often a second compile), estimate_unfit=False only for a variant that does not fit."""
    import jax

    from flexict_jax import sharding, train_step
    from flexict_jax.data import datasets
    from flexict_jax.models import attention

    devices = devices or jax.devices()
    mesh = sharding.make_mesh(mesh_shape, devices)
    if config.global_batch_size % mesh.size:
        raise ConfigError(f"config.global_batch_size={config.global_batch_size} is not divisible by the "
                         f"{mesh.size} devices of mesh {dict(mesh.shape)}")
    device = devices[0]
    chip = TPU_CHIPS.get(device.device_kind) if device.platform == "tpu" else None
    device_memory = device_memory if device_memory is not None else device_memory_bytes(device)
    model = config.model
    compute_dtype = model.get("compute_dtype", "float32")
    # What `auto` compiles to on this mesh's platform (the ViT's heads; the text tower's resolve alike on TPU).
    attention_impl = attention.resolve(model.get("attention_impl", "auto"), compute_dtype,
                                       model.dim // model.num_heads, platform=device.platform)
    with sharding.activate(mesh, config.sharding_rules):
        start = time.perf_counter()
        program = train_step.build_program(config, mesh)
        build_s = time.perf_counter() - start
        report = sharding.sharding_report(mesh, program.abstract_state["params"], program.param_specs)
        state_bytes = sum(int(a.size) * a.dtype.itemsize for a in jax.tree.leaves(program.abstract_state))
        rows = []
        for variant in datasets.step_variants(config):
            row, compiled = compile_variant(config, program, variant)
            if device_memory and compiled is not None:
                row["fits"] = row["memory_per_device"]["peak"] <= (1 - headroom) * device_memory
            if compiled is not None and estimate and (estimate_unfit or row.get("fits", True)):
                row.update(step_estimate(config, program, variant, compiled, row, chip, attention_impl))
            else:
                row.update(estimated_step_s=None, estimated_samples_per_s=None, estimated_mfu=None)
            rows.append(row)
    return {"stage": config.stage, "mesh": dict(mesh.shape), "device_kind": device.device_kind,
            "platform": device.platform, "num_devices": mesh.size,
            "num_slices": len({getattr(d, "slice_index", None) or 0 for d in devices}),
            "compute_dtype": compute_dtype, "attention_impl": attention_impl,
            "chip": dataclasses.asdict(chip) if chip else None,
            "global_batch_size": config.global_batch_size,
            "device_memory_bytes": device_memory, "headroom": headroom, "build_s": round(build_s, 2),
            "params": {"total_bytes": report["total_bytes"], "bytes_per_device": report["bytes_per_device"],
                       "replicated_fraction": report["replicated_fraction"], "groups": report["groups"],
                       "large_replicated": report["large_replicated"]},
            "state_bytes": state_bytes, "remat_policy": config.model.remat_policy, "variants": rows}


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def _remedy(result: dict[str, Any]) -> str:
    return ("Use more devices (fsdp), a smaller global batch"
            + (", or config.model.remat_policy=full." if result["remat_policy"] == "none" else "."))


def format_plan(result: dict[str, Any]) -> str:
    """The plan as the human-readable text the CLI prints."""
    params = result["params"]
    lines = [f"{result['stage']}: mesh {result['mesh']} on {result['num_devices']} x {result['device_kind']} "
             f"({result['platform']}"
             + (f", {result['num_slices']} slices" if result["num_slices"] > 1 else "")
             + f"), global batch {result['global_batch_size']}, compute dtype {result['compute_dtype']}, "
             f"attention {result['attention_impl']}",
             f"parameters {_size(params['total_bytes'])}, {_size(params['bytes_per_device'])} per device "
             f"({100 * params['replicated_fraction']:.1f}% of the bytes replicated); train state (student, "
             f"teacher, optimizer) {_size(result['state_bytes'])} in all"]
    for name, group in params["groups"].items():
        lines.append(f"  {name:<16} {group['params']:4d} arrays {_size(group['bytes']):>11}, "
                     f"{_size(group['bytes_per_device']):>11} per device")
    for name in params["large_replicated"]:
        lines.append(f"  WARNING: {name} is large and replicated on every device; check config.sharding_rules")
    limit = result["device_memory_bytes"]
    for row in result["variants"]:
        m, v = row["memory_per_device"], row["variant"]
        lines.append(f"variant patch {v['patch_size']}, resolution {v['resolution_index']}: "
                     f"compile {row['compile_s']:.1f} s (+ lower {row['lower_s']:.1f} s), "
                     f"{row['flops_per_step'] / 1e9:,.1f} GFLOP per step, {row['flops_per_device'] / 1e9:,.1f} per "
                     f"device")
        if m is None:
            lines.append(f"  DOES NOT FIT: the compiler refused it: {row['compiler_refusal']}. {_remedy(result)}")
            continue
        lines += [f"  per device: arguments {_size(m['argument'])}, outputs {_size(m['output'])}, aliased "
                  f"{_size(m['alias'])}, temporaries {_size(m['temp'])}, code {_size(m['generated_code'])}",
                  f"  peak per device {_size(m['peak'])}"
                  + (f" of {_size(limit)}" if limit else " (no device memory given: --device-memory-gb)")]
        if row.get("estimated_step_s"):
            lines.append(f"  TPU cost model: {1e3 * row['estimated_step_s']:,.3g} ms per step, "
                         f"{row['estimated_samples_per_s']:,.1f} samples/s"
                         + (f", MFU {100 * row['estimated_mfu']:.1f}% of the bf16 peak" if row["estimated_mfu"] else "")
                         + (f" (timed with {row['estimate_attention_impl']} attention: the cost model does not "
                            f"price the splash kernel)" if row.get("estimate_attention_impl") == "xla"
                            and result["attention_impl"] == "splash" else "")
                         + (f"; timed at {row['estimate_batch_fraction']:g} of the batch, over HBM at the whole "
                            f"of it, and scaled up: errs long" if row.get("estimate_batch_fraction") else ""))
            if row.get("estimated_step_s_attention_unpriced"):
                lines.append(f"  lower bound, the splash step with its kernel priced as free: "
                             f"{1e3 * row['estimated_step_s_attention_unpriced']:,.3g} ms per step")
        elif row.get("estimate_refusal"):
            lines.append(f"  TPU cost model: no estimate: the step it can time ({row['estimate_attention_impl']} "
                         f"attention, blocks unrolled) does not fit the chip, even at a smaller batch: "
                         f"{row['estimate_refusal']}")
        elif result["platform"] == "tpu":
            lines.append("  TPU cost model: no estimate (an operation of the step has no cost)")
        if "fits" in row:
            usable = (1 - result["headroom"]) * limit
            lines.append("  fits" if row["fits"] else
                         f"  DOES NOT FIT: needs {_size(m['peak'])} per device, {_size(usable)} usable "
                         f"({100 * (1 - result['headroom']):.0f}% of {_size(limit)}). {_remedy(result)}")
    return "\n".join(lines)


def _mesh_flag(value: str | None, default) -> tuple[int, ...]:
    if value is None:
        return tuple(default)
    try:
        return tuple(int(x) for x in value.strip("()").split(","))
    except ValueError as e:
        raise app.UsageError(f"--mesh={value!r}: expected comma-separated integers such as 1,-1,1") from e


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _DEVICES.value is not None and _TOPOLOGY.value:
        raise app.UsageError("--devices and --topology exclude each other")
    if _TOPOLOGY.value:
        # Compiling needs libtpu but no TPU: leave a TPU on this host (and its lock file, which a training job
        # may hold) alone, and skip the metadata-server queries that only answer on a Cloud TPU VM.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    import jax
    if _DEVICES.value is not None:
        if _DEVICES.value < 1:
            raise app.UsageError(f"--devices must be positive, got {_DEVICES.value}")
        # Before the first backend use: N fake CPU devices stand in for N chips.
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", _DEVICES.value)
    if _TOPOLOGY.value:
        jax.config.update("jax_platforms", "cpu")
    config = _CONFIG.value
    memory = int(_MEMORY.value * GIB) if _MEMORY.value is not None else None
    try:
        devices = topology_devices(_TOPOLOGY.value, _NUM_SLICES.value) if _TOPOLOGY.value else None
        result = plan(config, _mesh_flag(_MESH.value, config.mesh), device_memory=memory,
                      headroom=_HEADROOM.value, devices=devices)
        if _TOPOLOGY.value:
            result.update(topology=_TOPOLOGY.value)
    except (ValueError, KeyError) as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(format_plan(result))
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(result, f, indent=1)
    sys.exit(0 if all(row.get("fits", True) for row in result["variants"]) else 1)


if __name__ == "__main__":
    app.run(main)
