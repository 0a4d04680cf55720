"""Train-step benchmark, stage 1 (2D) and stage 2 (3D): step time, samples/s, tokens/s, achieved FLOP/s and
utilisation against the matmul peak measured in the same run, compile time and per-device memory.

    python bench/bench_train_step.py [--variants s1-small,s1-base,s2-small,s2-base] [--patch-sizes 16,8] \
        [--steps 3] [--out bench/results/train_step_cpu.json]

Each variant is a stage config at one model size with a batch and crop budget the device can time in minutes
(the recipe's batch and crops are listed by `python -m flexict_jax.plan`). The step is the trainer's own
(`train_step.build_program` → `Program.train_step`), compiled by the planner (`plan.compile_variant`) on a
synthetic batch of the pipeline's shapes (`plan.abstract_batch`), on all local devices (config.mesh).

FLOPs per step are the model's (`plan.model_flops`: XLA's cost analysis of the step lowered with the blocks
unrolled and no rematerialisation), so a scanned or rematerialised step is credited with the same work; the peak
is the best of a few large matmuls in the row's compute dtype (config.model.compute_dtype: the recipe variants
compute in bf16, tiny/demo in f32) on the same devices, timed before and after every variant (the best over the
whole run is the denominator), so the ratio stays meaningful on a shared, noisy machine. Each row names the
attention kernel its step ran (`models.attention.resolve`: cuDNN's fused kernel on a GPU in bf16). A variant that
fails (e.g. out of device memory) is recorded with its error and the run goes on. Tokens per step are the
patch tokens of every crop of the batch, each crop counted once (student and teacher passes not multiplied).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import common, stage1, stage2  # noqa: E402
from flexict_jax import host_heap, plan, sharding, train_step  # noqa: E402
from flexict_jax.models import attention  # noqa: E402
from flexict_jax.progress import Progress  # noqa: E402
from flexict_jax.variants import Variant  # noqa: E402

STAGES = {"s1": stage1, "s2": stage2}
# Benchmark shapes: the config's model (backbone/heads sizes from configs/common.py) with a CPU-sized budget.
VARIANTS = {
    "s1-tiny": dict(config="tiny", batch=8),
    "s1-demo": dict(config="demo", batch=16),
    "s1-small": dict(config="base", backbone="small", heads="demo", batch=4, global_crop=128, local_crop=64,
                     n_local=4),
    "s1-base": dict(config="base", backbone="base", heads="base", batch=2, global_crop=128, local_crop=64,
                    n_local=2),
    "s2-tiny": dict(config="tiny", batch=8),
    "s2-demo": dict(config="demo", batch=8),
    "s2-small": dict(config="base", backbone="small", heads="demo", batch=2, global_crop=64, local_crop=32,
                     n_local=2),
    "s2-base": dict(config="base", backbone="base", heads="base", batch=2, global_crop=64, local_crop=32,
                    n_local=2),
    # One 80 GB GPU: the recipe's 2D crops (docs/recipe.md §5) and 3D crops shrunk to fit the f32 model; patch 8 needs
    # `--set model.remat_policy=full` at these batches.
    "s1-base-gpu": dict(config="base", backbone="base", heads="base", batch=32, global_crop=256, local_crop=112,
                        n_local=8),
    "s2-base-gpu": dict(config="base", backbone="base", heads="base", batch=8, global_crop=112, local_crop=48,
                        n_local=8),
}


def matmul_peak_flops(n: int, dtype: jnp.dtype = jnp.float32, repeats: int = 5) -> float:
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def measured_peak_bytes() -> int | None:
    """The allocator's peak on the first device since start-up (accelerators only; None on the CPU)."""
    stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def variant_config(name: str, overrides: dict[str, str]):
    spec = VARIANTS[name]
    config = STAGES[name.split("-")[0]].get_config(spec["config"])
    if "backbone" in spec:
        config.model.update(common.BACKBONES[spec["backbone"]])
        config.heads.update(common.HEADS[spec["heads"]])
        config.data.update(dict(global_crop_size=spec["global_crop"], local_crop_size=spec["local_crop"],
                                n_local_crops=spec["n_local"]))
    config.global_batch_size = spec["batch"]
    config.loss.koleo_group_size = config.model.drop_path_group_size = spec["batch"]
    config.total_steps = 1000
    for key, value in overrides.items():
        section, field = key.split(".")
        default = config[section][field]
        config[section][field] = (value.lower() in ("1", "true") if isinstance(default, bool)
                                  else type(default)(value) if default is not None else value)
    return config


def synthetic_batch(config, variant: Variant) -> dict[str, np.ndarray]:
    """Random arrays of the pipeline's shapes; about 30% of the patches of masked crops are masked."""
    rng = np.random.default_rng(0)
    return {k: (rng.random(v.shape) < 0.3) if v.dtype == np.bool_ else rng.standard_normal(v.shape).astype(v.dtype)
            for k, v in plan.abstract_batch(config, variant).items()}


def tokens_per_step(config, patch_size: int) -> int:
    dims = 3 if config.data.kind == "volumes3d" else 2
    d = config.data
    return config.global_batch_size * (d.n_global_crops * (d.global_crop_size // patch_size) ** dims
                                       + d.n_local_crops * (d.local_crop_size // patch_size) ** dims)


def bench_variant(name: str, patch_size: int, steps: int, overrides: dict[str, str]) -> dict:
    config = variant_config(name, overrides)
    variant = Variant(patch_size)
    mesh = sharding.make_mesh(config.mesh)
    with sharding.activate(mesh, config.sharding_rules):
        program = train_step.build_program(config, mesh)
        plan_row, compiled = plan.compile_variant(config, program, variant)
        state = jax.jit(program.init_state, out_shardings=program.state_shardings)()
        batch = sharding.global_batch(mesh, synthetic_batch(config, variant))
        state, metrics = compiled(state, batch)  # warm-up
        jax.block_until_ready(metrics)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    flops = plan_row["flops_per_step"]
    tokens = tokens_per_step(config, patch_size)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(program.abstract_state["params"]))
    d = config.data
    crop = "^3" if d.kind == "volumes3d" else "^2"
    return {"variant": name, "overrides": overrides, "scan_blocks": config.model.scan_blocks,
            "remat_policy": config.model.remat_policy, "compute_dtype": config.model.compute_dtype,
            "attention": attention.resolve(config.model.attention_impl, jnp.dtype(config.model.compute_dtype),
                                           config.model.dim // config.model.num_heads),
            "stage": config.stage, "patch_size": patch_size,
            "dim": config.model.dim,
            "depth": config.model.depth, "prototypes": config.heads.num_prototypes, "params": n_params,
            "global_batch": config.global_batch_size,
            "crops": f"{d.n_global_crops}x{d.global_crop_size}{crop}+{d.n_local_crops}x{d.local_crop_size}{crop}",
            "compile_s": plan_row["compile_s"], "step_s": round(step_s, 4),
            "samples_per_s": round(config.global_batch_size / step_s, 3),
            "tokens_per_step": tokens, "tokens_per_s": round(tokens / step_s, 1),
            "flops_per_step": flops, "achieved_flops": flops / step_s,
            "peak_bytes_per_device": plan_row["memory_per_device"]["peak"],
            "temp_bytes_per_device": plan_row["memory_per_device"]["temp"],
            "measured_peak_bytes_per_device": measured_peak_bytes(),
            "loss": float(metrics["loss"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="s1-small,s1-base,s2-small,s2-base",
                        help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--patch-sizes", default="16,8")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up step)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override for every variant, e.g. model.remat_policy=full (repeatable)")
    parser.add_argument("--out", default=None, help="write the JSON result here as well as to stdout")
    host_heap.add_argument(parser)
    args = parser.parse_args(argv)
    heap = host_heap.apply_argument(args.host_heap)
    overrides = dict(item.split("=", 1) for item in args.set)
    bad = [k for k in overrides if k.count(".") != 1]
    if bad or any("=" not in item for item in args.set):
        parser.error(f"--set takes SECTION.KEY=VALUE, got {args.set}")
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    patch_sizes = [int(x) for x in args.patch_sizes.split(",")]
    # Large enough to saturate an accelerator; 2048 keeps the CPU measurement short. One peak per compute dtype
    # the rows use: a bf16 step is measured against the bf16 matmul rate, an f32 step against the f32 rate.
    matmul_n = 2048 if jax.default_backend() == "cpu" else 8192
    row_dtypes = sorted({variant_config(name, overrides).model.compute_dtype for name in names})
    peaks = {dtype: matmul_peak_flops(matmul_n, jnp.dtype(dtype)) for dtype in row_dtypes}
    rows, progress = [], Progress(len(names) * len(patch_sizes), "train-step benchmark")
    for name in names:
        for p in patch_sizes:
            try:
                row = bench_variant(name, p, args.steps, overrides)
            except Exception as e:  # noqa: BLE001 - a row that does not fit is a result, not the end of the run
                row = {"variant": name, "patch_size": p, "overrides": overrides, "error": f"{type(e).__name__}: "
                       f"{str(e)[:500]}"}
            print(json.dumps(row), file=sys.stderr)
            rows.append(row)
            peaks = {dtype: max(peak, matmul_peak_flops(matmul_n, jnp.dtype(dtype))) for dtype, peak in peaks.items()}
            progress.advance(1, f"{name} p{p}: " + (f"{row['step_s']:.2f} s/step" if "step_s" in row else "failed"))
    progress.close()
    for row in rows:
        if "achieved_flops" in row:
            row["utilisation_vs_matmul_peak"] = row["achieved_flops"] / peaks[row["compute_dtype"]]
    for dtype in ("float32", "bfloat16"):  # both rates on record, whichever the rows used
        peaks.setdefault(dtype, matmul_peak_flops(matmul_n, jnp.dtype(dtype)))
    result = {"benchmark": "train_step", "device": jax.devices()[0].device_kind,
              "platform": jax.default_backend(), "num_devices": jax.device_count(), "host": platform.machine(),
              "cpu_count": os.cpu_count(), "load_average": os.getloadavg(), "host_heap": heap,
              "versions": {"jax": jax.__version__, "jaxlib": jax.lib.__version__},
              "matmul_peak_flops": peaks["float32"], "bf16_matmul_peak_flops": peaks["bfloat16"],
              "matmul_n": matmul_n, "date": time.strftime("%Y-%m-%d"), "rows": rows}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
