"""Stage-1 train-step benchmark: step time, samples/s, achieved FLOP/s and utilisation against the matmul peak
measured in the same run, compile time.

    python bench/bench_train_step.py [--variants demo,small] [--steps 5] [--out bench/results/train_step_cpu.json]

FLOPs per step come from XLA's cost analysis of the compiled step; the peak is the best of a few large f32
matmuls on the same devices, so the ratio is meaningful on a shared, noisy machine.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import common, stage1  # noqa: E402
from flexict_jax import sharding, trainer  # noqa: E402
from flexict_jax.tasks import dino  # noqa: E402
from flexict_jax.variants import Variant  # noqa: E402

# Benchmark shapes: the config's model with a batch/crop budget a CPU can time in minutes.
VARIANTS = {
    "tiny": dict(config="tiny", batch=8),
    "demo": dict(config="demo", batch=16),
    "small": dict(config="base", backbone="small", heads="demo", batch=4, global_crop=128, local_crop=64,
                  n_local=4),
    "base": dict(config="base", backbone="base", heads="base", batch=2, global_crop=128, local_crop=64,
                 n_local=2),
}


def matmul_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def variant_config(name: str):
    spec = VARIANTS[name]
    config = stage1.get_config(spec["config"])
    if "backbone" in spec:
        config.model.update(common.BACKBONES[spec["backbone"]])
        config.heads.update(common.HEADS[spec["heads"]])
        config.data.update(dict(global_crop_size=spec["global_crop"], local_crop_size=spec["local_crop"],
                                n_local_crops=spec["n_local"]))
    config.global_batch_size = spec["batch"]
    config.loss.koleo_group_size = spec["batch"]
    config.total_steps = 1000
    return config


def synthetic_batch(config, patch_size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    b, d = config.global_batch_size, config.data
    n_tokens = (d.global_crop_size // patch_size) ** 2
    masks = np.zeros((b, d.n_global_crops, n_tokens), bool)
    masks[:, 0, : int(0.3 * n_tokens)] = True  # one masked global crop per sample, as the pipeline does
    return {"global_crops": rng.standard_normal((b, d.n_global_crops, d.global_crop_size, d.global_crop_size, 1),
                                                np.float32),
            "local_crops": rng.standard_normal((b, d.n_local_crops, d.local_crop_size, d.local_crop_size, 1),
                                               np.float32),
            f"masks_p{patch_size}": masks}


def bench_variant(name: str, patch_size: int, steps: int, peak: float) -> dict:
    config = variant_config(name)
    mesh = sharding.make_mesh(config.mesh)
    with sharding.activate(mesh, config.sharding_rules):
        program = trainer.build_program(config, mesh)
        state = jax.jit(program.init_state, out_shardings=program.state_shardings)()
        local = dino.step_batch(synthetic_batch(config, patch_size), Variant(patch_size))
        batch = trainer.global_batch(mesh, local)
        t0 = time.perf_counter()
        compiled = program.train_step(config, Variant(patch_size), local).lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
        cost = compiled.cost_analysis()
        flops = float((cost[0] if isinstance(cost, list) else cost).get("flops", float("nan")))
        memory = compiled.memory_analysis()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(program.abstract_state["params"]))
    return {"variant": name, "patch_size": patch_size, "dim": config.model.dim, "depth": config.model.depth,
            "params": n_params, "global_batch": config.global_batch_size,
            "crops": f"{config.data.n_global_crops}x{config.data.global_crop_size}+"
                     f"{config.data.n_local_crops}x{config.data.local_crop_size}",
            "compile_s": round(compile_s, 2), "step_s": round(step_s, 4),
            "samples_per_s": round(config.global_batch_size / step_s, 2),
            "flops_per_step": flops, "achieved_flops": flops / step_s, "utilisation_vs_matmul_peak": flops / step_s / peak,
            "temp_bytes": getattr(memory, "temp_size_in_bytes", None),
            "argument_bytes": getattr(memory, "argument_size_in_bytes", None),
            "loss": float(metrics["loss"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="demo,small", help=f"comma list of {sorted(VARIANTS)}")
    parser.add_argument("--patch-sizes", default="16,8")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=None, help="write the JSON result here as well as to stdout")
    args = parser.parse_args(argv)
    peak = matmul_peak_flops()
    rows = []
    for name in args.variants.split(","):
        for p in (int(x) for x in args.patch_sizes.split(",")):
            row = bench_variant(name, p, args.steps, peak)
            print(json.dumps(row), file=sys.stderr)
            rows.append(row)
    result = {"benchmark": "stage1_train_step", "device": jax.devices()[0].device_kind,
              "platform": jax.default_backend(), "num_devices": jax.device_count(), "host": platform.machine(),
              "matmul_peak_flops": peak, "date": time.strftime("%Y-%m-%d"), "rows": rows}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
