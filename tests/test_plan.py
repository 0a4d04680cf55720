"""Sharding at real size and the pre-flight planner.

- The recipe-size model (ViT 864×16, 65,536-prototype heads) on a 2×4 fake-device mesh, abstract (no
  allocation): every parameter above 1 MiB is sharded and the report says so; a rule that leaves the prototype
  layer replicated is reported. Devices of several TPU slices get the slices on the data axis. A mesh that
  does not divide a parameter is one ConfigError with a mesh that does.
- The planner's abstract batch matches what the real data pipelines deliver.
- The planner's per-device peak estimate is within 20% of the peak measured while a real step runs on the CPU.
- The CLI prints per-device memory, FLOPs and compile time, and says (exit 1) when a config does not fit.
- With libtpu (the `tpu` extra), `--topology` compiles for a TPU slice on this CPU host and reports per-chip
  memory against the chip's HBM and the TPU cost model's step time and MFU; `attention_impl=auto` follows the
  target (splash for a TPU slice, as a TPU run compiles it), and the time is taken with XLA attention, which
  the cost model prices. A step the TPU compiler refuses for the chip's HBM is a variant that does not fit.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from configs import stage1, stage1_hires, stage2, stage3
from flexict_jax import plan, sharding, tasks, train_step
from flexict_jax.data import datasets
from flexict_jax.errors import ConfigError
from flexict_jax.models import attention
from flexict_jax.variants import Variant

REPO = pathlib.Path(__file__).resolve().parents[1]
MIB = 2**20
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install '.[tpu]'): no TPU compiler to plan with")


def real_size_report(rules) -> dict:
    config = stage1.get_config()  # the recipe's model and heads
    mesh = sharding.make_mesh((2, 4, 1))
    with sharding.activate(mesh, rules):
        program = train_step.build_program(config, mesh)
        return sharding.sharding_report(mesh, program.abstract_state["params"], program.param_specs)


def test_real_size_model_is_sharded_on_2x4_mesh():
    report = real_size_report(stage1.get_config().sharding_rules)
    assert report["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    big = [p for p in report["params"] if p["bytes"] >= MIB]
    assert len(big) > 16 * 4  # qkv, proj, fc1, fc2 of every block at least
    unsharded = [p["param"] for p in big if p["bytes_per_device"] > p["bytes"] // 4]
    assert unsharded == []
    assert report["large_replicated"] == []
    for head in ("dino_head", "ibot_head"):
        last = next(p for p in report["params"] if p["param"] == f"['{head}']['last_layer']['kernel']")
        assert last["shape"] == [256, 65536] and last["bytes_per_device"] == 256 * 65536 * 4 // 4
    # Per-group totals add up, and almost nothing is left replicated (maxtext's 2% tolerance).
    groups = report["groups"]
    assert set(groups) == {"backbone", "backbone/blocks", "dino_head", "ibot_head"}
    assert sum(g["bytes"] for g in groups.values()) == report["total_bytes"]
    assert sum(g["bytes_per_device"] for g in groups.values()) == report["bytes_per_device"]
    assert groups["backbone/blocks"]["params"] == 16 * 13
    assert report["replicated_fraction"] < 0.02


def test_a_mesh_that_does_not_divide_a_parameter_is_a_config_error_with_a_mesh_that_does():
    """The recipe's 864 splits over at most 32 fsdp devices; here a 36-wide model on 8 fsdp devices (36 =
    4·9): one ConfigError naming the parameter and a mesh of the same devices that divides it, which builds."""
    config = stage1.get_config("tiny")
    config.model.update(dim=36, num_heads=3)
    mesh = sharding.make_mesh((1, 8, 1))
    with pytest.raises(ConfigError, match=r"config.mesh \(1, 8, 1\): parameter .* splits dimension \d+ \(36\) over "
                       r"fsdp \(8 devices\), which does not divide it; e\.g\. config.mesh=\(2,4,1\)"):
        with sharding.activate(mesh, config.sharding_rules):
            train_step.build_program(config, mesh)
    mesh = sharding.make_mesh((2, 4, 1))
    with sharding.activate(mesh, config.sharding_rules):
        train_step.build_program(config, mesh)


def test_replicated_prototype_layer_is_reported():
    rules = [(name, None if name == "proto" else axes) for name, axes in stage1.get_config().sharding_rules]
    report = real_size_report(rules)
    assert sorted(report["large_replicated"]) == ["['dino_head']['last_layer']['kernel']",
                                                  "['ibot_head']['last_layer']['kernel']"]
    assert report["groups"]["dino_head"]["replicated_bytes"] >= 256 * 65536 * 4


@dataclasses.dataclass(frozen=True)
class FakeChip:
    """Enough of a jax.Device for mesh construction (no TPU coordinates, so slices are laid out in id order)."""
    id: int
    slice_index: int
    process_index: int
    device_kind: str = "fake"
    platform: str = "cpu"


def test_multislice_mesh_spans_slices_with_the_data_axis():
    chips = [FakeChip(i, slice_index=i // 4, process_index=i // 2) for i in range(8)]  # 2 slices, 2 hosts each
    mesh = sharding.make_mesh((2, -1, 1), chips)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    slices = np.vectorize(lambda chip: chip.slice_index)(mesh.devices)
    assert (slices[0] == 0).all() and (slices[1] == 1).all()  # fsdp collectives stay inside a slice
    with pytest.raises(ValueError, match=r"multiple of 2, e.g. config.mesh=\(2,-1,1\)"):
        sharding.make_mesh((1, -1, 1), chips)


@pytest.mark.parametrize("config_module, data_key", [(stage1, "slices"), (stage1_hires, "slices"),
                                                      (stage2, "dataset")])
def test_abstract_batch_matches_the_pipeline(config_module, data_key, real_ct_3mm):
    config = config_module.get_config("tiny")
    config.data.dir = str(real_ct_3mm[data_key])
    config.data.num_workers = 0
    local = next(iter(datasets.build_dataset(config, process_index=0, process_count=1)))
    for variant in datasets.step_variants(config):
        if "resolution_index" in local and variant.resolution_index != int(local["resolution_index"]):
            continue  # stage 1.1: the batch of step 0 has step 0's resolution only
        real = tasks.get(config).step_batch(local, variant)
        abstract = plan.abstract_batch(config, variant)
        assert {k: (v.shape, v.dtype) for k, v in abstract.items()} == {
            k: (v.shape, v.dtype) for k, v in real.items()}, variant


# Runs in a fresh process with one CPU device, so the process's memory is the device's. glibc is told to mmap
# every allocation of 64 KiB or more (MALLOC_MMAP_THRESHOLD_ also stops its adaptive threshold), so freed
# buffers leave the resident set and new ones enter it; the kernel's peak-RSS mark (VmHWM) is reset just before
# the step (/proc/self/clear_refs, Linux >= 4.0). Measured peak = the step's arguments (already resident: the
# state and the batch, by their nbytes) + the rise of VmHWM during one execution after a warm-up one.
MEASURE = r"""
import json, re, sys, time
import jax, numpy as np
from configs import stage1
from flexict_jax import plan, sharding, train_step
from flexict_jax.variants import Variant

def status(field):
    return int(re.search(rf"{field}:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

config = stage1.get_config(sys.argv[1])
variant = Variant(int(sys.argv[2]))
mesh = sharding.make_mesh((1, 1, 1))
rng = np.random.default_rng(0)
with sharding.activate(mesh, config.sharding_rules):
    program = train_step.build_program(config, mesh)
    row, compiled = plan.compile_variant(config, program, variant)
    local = {k: (rng.random(v.shape) < 0.3) if v.dtype == bool else rng.standard_normal(v.shape).astype(v.dtype)
             for k, v in plan.abstract_batch(config, variant).items()}
    state = jax.jit(program.init_state, out_shardings=program.state_shardings)()
    state, metrics = compiled(state, sharding.global_batch(mesh, local))  # warm-up
    jax.block_until_ready((state, metrics))
    batch = sharding.global_batch(mesh, local)
    arguments = sum(x.nbytes for x in jax.tree.leaves((state, batch)))
    time.sleep(0.2)
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    measured = status("VmHWM") - before + arguments
print(json.dumps({"estimate": row["memory_per_device"]["peak"], "measured": measured,
                  "arguments": arguments, "plan": row["memory_per_device"]}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
@pytest.mark.parametrize("variant, patch_size", [("tiny", 8), ("demo", 16)])
def test_planner_estimate_within_20_percent_of_measured_peak(variant, patch_size, tmp_path):
    script = tmp_path / "measure.py"
    script.write_text(MEASURE)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONPATH=str(REPO),
               MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    proc = subprocess.run([sys.executable, str(script), variant, str(patch_size)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["plan"]["argument"] == result["arguments"]  # the plan's inputs are the real ones
    assert abs(result["estimate"] - result["measured"]) <= 0.2 * result["measured"], result


@pytest.mark.slow
def test_cli_reports_and_says_when_it_does_not_fit(tmp_path):
    out = tmp_path / "plan.json"
    proc = subprocess.run(
        [sys.executable, "-m", "flexict_jax.plan", "--config=configs/stage1.py:tiny", "--devices=8",
         "--mesh=2,-1,1", "--device-memory-gb=0.001", f"--out={out}", "--config.patch_sizes=(16,)",
         "--config.patch_size_probs=(1.0,)"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]  # 1 MiB per device is too little
    assert "DOES NOT FIT" in proc.stdout and "per device: arguments" in proc.stdout, proc.stdout
    assert "GFLOP per step" in proc.stdout and "compile" in proc.stdout
    result = json.loads(out.read_text())
    assert result["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1} and result["num_devices"] == 8
    row, = result["variants"]
    assert row["variant"] == {"patch_size": 16, "resolution_index": 0} and row["fits"] is False
    memory = row["memory_per_device"]
    assert memory["peak"] > 1 << 20 and memory["alias"] > 0  # the donated state is reused
    assert row["flops_per_step"] == pytest.approx(8 * row["flops_per_device"]) and row["flops_per_step"] > 0
    # Parameters are split over the 4-wide fsdp axis (and replicated over data): about a quarter per device.
    params = result["params"]
    assert params["total_bytes"] / 4 <= params["bytes_per_device"] < params["total_bytes"] / 3

    proc = subprocess.run([sys.executable, "-m", "flexict_jax.plan", "--config=configs/stage1.py:tiny",
                           "--devices=8", "--mesh=3,-1,1"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "not divisible" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_model_flops_are_the_same_scanned_unrolled_and_rematerialised():
    """The planner's and the benchmark's FLOPs are the model's: XLA's cost analysis of a compiled scan counts the
    loop body once and remat adds recomputation, so `plan.model_flops` lowers the unrolled, stored step."""
    flops = []
    for scan_blocks, remat_policy in [(False, "none"), (True, "none"), (True, "full")]:
        config = stage1.get_config("tiny")
        config.model.update(scan_blocks=scan_blocks, remat_policy=remat_policy)
        mesh = sharding.make_mesh((1, -1, 1))
        with sharding.activate(mesh, config.sharding_rules):
            program = train_step.build_program(config, mesh)
            variant = Variant(16)
            flops.append(plan.model_flops(config, program, variant, plan.abstract_batch(config, variant)))
    assert flops[0] > 0 and flops == [flops[0]] * 3, flops


@pytest.fixture
def compile_only_libtpu(monkeypatch):
    """libtpu loaded for compiling only: no lock file (another process may hold it), no metadata queries."""
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "1")


@needs_libtpu
def test_topology_devices_of_tpu_slices(compile_only_libtpu):
    v5p = plan.topology_devices("v5p:2x2x1")
    assert len(v5p) == 4 and v5p[0].platform == "tpu" and v5p[0].device_kind in plan.TPU_CHIPS
    assert len(plan.topology_devices("v4:2x2x1")) == 4  # megacore: one device per chip, not per TensorCore
    assert len(plan.topology_devices("v5e:1x1")) == 1  # a slice smaller than a host
    two_slices = plan.topology_devices("v6e:2x2", num_slices=2)
    mesh = sharding.make_mesh((2, -1, 1), two_slices)
    slices = np.vectorize(lambda chip: chip.slice_index)(mesh.devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert (slices[0] == 0).all() and (slices[1] == 1).all()
    with pytest.raises(ValueError, match="expected VERSION:AxB"):
        plan.topology_devices("v5p")
    with pytest.raises(ValueError, match="v9x:2x2"):
        plan.topology_devices("v9x:2x2")


@needs_libtpu
def test_auto_attention_follows_the_target_platform(compile_only_libtpu):
    """`auto` resolves by the devices of the mesh the step is traced under, not by the host's backend: a TPU
    slice compiled on this CPU host gets splash, as the TPU run would; a CPU mesh and no mesh get xla."""
    import jax
    import jax.numpy as jnp
    seen = {}

    def trace(name, devices):
        def step(x):
            seen[name] = attention.resolve("auto", x.dtype, 72)
            return x
        mesh = sharding.make_mesh((1, -1, 1), devices)
        with sharding.activate(mesh, stage1.get_config("tiny").sharding_rules):
            jax.jit(step).trace(jax.ShapeDtypeStruct((8, 4), jnp.bfloat16))
    trace("v5p", plan.topology_devices("v5p:2x2x1"))
    trace("cpu", jax.devices("cpu")[:1])
    assert seen == {"v5p": "splash", "cpu": "xla"}
    assert attention.resolve("auto", jnp.bfloat16, 72) == "xla"  # no mesh: this host's backend, the CPU
    assert attention.resolve("xla", jnp.bfloat16, 72, platform="tpu") == "xla"  # a named kernel stays


@pytest.mark.slow
@needs_libtpu
def test_tpu_cost_model_does_not_price_the_splash_kernel(compile_only_libtpu):
    """Why the planner times the step with XLA attention: the splash kernel (a Pallas call without a cost
    estimate) adds next to no FLOPs to the TPU compiler's cost analysis, XLA's attention all of them. When JAX
    gives splash a cost estimate this fails, and the planner can time the splash step itself."""
    import jax
    import jax.numpy as jnp
    batch, length, heads, head_dim = 4, 1024, 2, 128
    attention_flops = 4 * batch * heads * length**2 * head_dim  # q·kᵀ and p·v, forward only
    mesh = sharding.make_mesh((1, -1, 1), plan.topology_devices("v5p:2x2x1"))
    x = jax.ShapeDtypeStruct((batch, length, heads, head_dim), jnp.bfloat16)
    flops = {}
    with sharding.activate(mesh, stage1.get_config("tiny").sharding_rules):
        for impl in ("xla", "splash"):
            step = jax.jit(lambda q, k, v, impl=impl: attention.dot_product_attention(q, k, v, scale=0.1, impl=impl))
            cost = step.lower(x, x, x).compile().cost_analysis()
            flops[impl] = (cost[0] if isinstance(cost, list) else cost)["flops"] * mesh.size
    assert flops["xla"] >= 0.9 * attention_flops, flops
    assert flops["splash"] < 0.05 * attention_flops, flops


@needs_libtpu
def test_a_mesh_axis_across_part_of_a_torus_axis(compile_only_libtpu):
    """64 v6e chips (an 8×8 torus) as data 2 × fsdp 32, the most fsdp devices the recipe's width allows: 32 is
    no product of whole torus axes, so the fsdp axis spans part of one."""
    mesh = sharding.make_mesh((2, 32, 1), plan.topology_devices("v6e:8x8"))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 32, "tensor": 1}
    assert len({d.id for d in mesh.devices.flat}) == 64


@needs_libtpu
def test_a_step_the_tpu_compiler_refuses_for_its_hbm_is_a_plan_that_does_not_fit(compile_only_libtpu):
    """The TPU compiler itself refuses a program whose buffers exceed the chip's HBM; the plan reports that
    variant as not fitting, with the compiler's reason, instead of failing."""
    config = stage1.get_config("tiny")
    config.patch_sizes, config.patch_size_probs = (16,), (1.0,)
    config.global_batch_size = 1 << 17  # ~430 GB of activations on one 16 GiB v5e chip
    result = plan.plan(config, (1, -1, 1), devices=plan.topology_devices("v5e:1x1"))
    row, = result["variants"]
    assert row["fits"] is False and row["memory_per_device"] is None and row["estimated_step_s"] is None
    assert row["compiler_refusal"].startswith("RESOURCE_EXHAUSTED") and "HBM" in row["compiler_refusal"]
    assert "DOES NOT FIT: the compiler refused it: RESOURCE_EXHAUSTED" in plan.format_plan(result)


@pytest.mark.slow
@needs_libtpu
def test_a_step_whose_timed_program_is_over_hbm_is_timed_at_a_smaller_batch(compile_only_libtpu):
    """The cost model times the step with XLA attention (it does not price splash), and at long sequences that
    program writes the T × T scores to HBM: at 12,544 tokens a crop and 5 per chip the TPU compiler refuses it on
    a 16 GiB v5e chip while the splash step as configured fits. The plan times it at half the batch rounded
    down, 2 per chip, and scales the time up by 5/2, saying so."""
    config = stage1.get_config("tiny")
    config.patch_sizes, config.patch_size_probs = (8,), (1.0,)
    config.data.global_crop_size = 896
    plan.with_global_batch(config, 5, 1)
    assert config.model.drop_path_group_size == 1  # tiny's groups of 4 do not divide 5
    result = plan.plan(config, (1, -1, 1), devices=plan.topology_devices("v5e:1x1"))
    row, = result["variants"]
    assert result["attention_impl"] == "splash" and row["fits"] is True and row["memory_per_device"]["peak"] > 0
    assert row["estimate_attention_impl"] == "xla" and row["estimate_batch_fraction"] == 0.4
    assert row["estimated_step_s"] > 0 and row["estimated_samples_per_s"] == pytest.approx(5 / row["estimated_step_s"])
    assert "timed at 0.4 of the batch, over HBM at the whole of it, and scaled up" in plan.format_plan(result)


@pytest.mark.slow
@needs_libtpu
def test_the_stage3_step_is_priced_by_the_tpu_cost_model(compile_only_libtpu, qwen3_folder):
    """The cost model adds -1 s for each operation it cannot price and the planner gives no time when the sum
    is negative. CLIP's matching logits taken with jnp.diagonal had a scatter-add gradient that the TPU compiler
    runs on the SparseCore, unpriced: the tiny stage-3 step came out at -2.0 s (and every recipe-scale stage-3
    estimate 2 s short). It is priced now."""
    config = stage3.get_config("tiny")
    config.text.update(tower="qwen3", hf_folder=str(qwen3_folder[0]))
    config.patch_sizes, config.patch_size_probs = (16,), (1.0,)
    config.model.update(scan_blocks=False, attention_impl="xla")  # the program the cost model times, compiled once
    result = plan.plan(config, (1, -1, 1), devices=plan.topology_devices("v5p:2x2x1"))
    row, = result["variants"]
    assert row["fits"] is True and row["estimated_step_s"] is not None and row["estimated_step_s"] > 0, row


def test_topology_without_libtpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(ValueError, match=r"libtpu, which is not installed: pip install 'flexict_jax\[tpu\]'"):
        plan.topology_devices("v5p:2x2x1")


@pytest.mark.slow
@needs_libtpu
def test_cli_plans_a_tpu_slice_ahead_of_time(tmp_path):
    """The tiny stage-1 step compiled by the TPU compiler for a v5p slice on this CPU host: per-chip memory
    against the chip's HBM, and the cost model's step time, samples/s and MFU. `auto` attention compiles the
    splash kernel, as on a TPU; the cost model prices that kernel at almost nothing, so the time comes from the
    same step compiled with XLA attention, and the splash step's own time is kept as a lower bound."""
    out = tmp_path / "plan.json"
    proc = subprocess.run(
        [sys.executable, "-m", "flexict_jax.plan", "--config=configs/stage1.py:tiny", "--topology=v5p:2x2x1",
         f"--out={out}", "--config.patch_sizes=(16,)", "--config.patch_size_probs=(1.0,)",
         "--config.model.scan_blocks=False"],  # one compile: a scanned step compiles again unrolled for the time
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TPU cost model:" in proc.stdout and "MFU" in proc.stdout and "fits" in proc.stdout, proc.stdout
    result = json.loads(out.read_text())
    assert (result["platform"], result["device_kind"], result["num_devices"]) == ("tpu", "TPU v5", 4)
    assert result["topology"] == "v5p:2x2x1" and result["compute_dtype"] == "float32"
    assert result["attention_impl"] == "splash" and "attention splash" in proc.stdout
    assert result["device_memory_bytes"] == plan.TPU_CHIPS["TPU v5"].hbm_bytes
    assert result["chip"]["bf16_flops"] == 459e12
    row, = result["variants"]
    assert row["fits"] is True and 0 < row["memory_per_device"]["peak"] < 1 << 30
    assert row["compile_s"] > 0 and row["flops_per_step"] > 0
    assert row["estimated_step_s"] > 0 and row["estimate_attention_impl"] == "xla"
    assert row["estimated_step_s_attention_unpriced"] > 0
    assert 0 < row["estimate_memory_peak"] < 1 << 30 and row["estimate_compile_s"] > 0
    assert row["estimated_samples_per_s"] == pytest.approx(8 / row["estimated_step_s"])
    assert row["estimated_mfu"] == pytest.approx(
        row["flops_per_device"] / (row["estimated_step_s"] * 459e12))
    assert 0 < row["estimated_mfu"] < 1
