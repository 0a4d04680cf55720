"""FlexiCT-B encoder forward + backward side by side: upstream's PyTorch model (`flexict_jax.torch_reference`) and
ours (JAX, float32 and bfloat16 compute), same weights, same input, same loss, interleaved in one process.

    python bench/bench_torch_vs_jax.py [--cases 2d,3d] [--rounds 3] [--variants torch,jax_float32]
        [--clock wall|process] [--out bench/results/torch_vs_jax_cpu.json]

Cases: "2d" batch 8 × 224², patch 16; "3d" batch 2 × 96³, patch 16 (the ViT-B backbone, 864 wide, 16 deep). The
loss is mean(h²) of the residual stream before the final norm (every token); both sides differentiate it with
respect to every backbone parameter. The JAX step is the trainer's backbone: blocks in a scan (config.model.scan_blocks), no
remat, attention as config.model.attention_impl="auto" picks it, RoPE in float32 (torch reference likewise),
no drop path and no RoPE rescale (the reference has neither); bf16 casts the float32 parameters and the input as
the tasks do (`models.precision`). Each round times torch, jax f32, jax bf16 and jax f32 with
`jax.nn.dot_product_attention` (for the CPU-gap record) once, in that order (`--variants` picks a subset; torch and
jax f32 always run); the best of `--rounds` is reported for each, so the ratios compare the same machine state on
a shared, noisy host. The first round also checks that both frameworks computed the same loss.

`--clock process` times CPU seconds of the whole process instead of wall seconds: with one thread each
(`--threads 1`, XLA_FLAGS=--xla_cpu_multi_thread_eigen=false) and the process pinned to one core (`taskset -c 1`;
XLA:CPU otherwise still runs independent ops of the step on two threads), that is the work each framework does,
which other jobs on the host distort least (docs/jax_notes.md §A7).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from flax import nnx  # noqa: E402

from configs.common import BACKBONES  # noqa: E402
from flexict_jax import host_heap, torch_format  # noqa: E402
from flexict_jax.models import attention, precision  # noqa: E402
from flexict_jax.models.vit import VisionTransformer  # noqa: E402
from flexict_jax.progress import Progress  # noqa: E402

CASES = {"2d": dict(batch=8, spatial=(224, 224), patch_size=16),
         "3d": dict(batch=2, spatial=(96, 96, 96), patch_size=16)}
LOSS_RTOL = 1e-4  # float32 on both sides; the sums differ only in rounding order


def _jax_step(model: VisionTransformer, x: np.ndarray, patch_size: int, dtype: str):
    """A jitted fwd+bwd of the backbone at `dtype`, and its (float32) parameters."""
    graphdef, params = nnx.split(model)
    compute = precision.compute_dtype(dtype)

    def loss_fn(params, x):
        params, x = precision.cast_for_compute((params, x), compute)
        out = nnx.merge(graphdef, params)(x, patch_size=patch_size)
        return jnp.mean(jnp.square(out["prenorm"].astype(jnp.float32)))
    step = jax.jit(jax.value_and_grad(loss_fn))
    xj = jnp.asarray(x)

    def run() -> float:
        loss, grads = step(params, xj)
        jax.block_until_ready(grads)
        return float(loss)
    return run


def _torch_step(model, x: np.ndarray, patch_size: int):
    import torch
    model.set_patch_size(patch_size)
    xt = torch.from_numpy(np.moveaxis(x, -1, 1).copy())

    def run() -> float:
        model.zero_grad(set_to_none=True)
        out = model.forward_features(xt)
        loss = out["x_prenorm"].square().mean()
        loss.backward()
        return float(loss.detach())
    return run


VARIANTS = ("torch", "jax_float32", "jax_bfloat16", "jax_float32_jaxnn_attention")
RATIOS = {"torch_over_jax_f32": ("torch", "jax_float32"), "torch_over_jax_bf16": ("torch", "jax_bfloat16"),
          "jax_f32_over_bf16": ("jax_float32", "jax_bfloat16"),
          "jaxnn_attention_over_ours": ("jax_float32_jaxnn_attention", "jax_float32")}


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def bench_case(name: str, rounds: int, progress: Progress, variants: tuple[str, ...] = VARIANTS,
               clock: str = "wall") -> dict:
    import torch

    from flexict_jax import torch_reference
    case = CASES[name]
    arch = torch_format.Architecture(**BACKBONES["base"])
    model = VisionTransformer(**arch.to_config(), rope_rescale=None, scan_blocks=True, rngs=nnx.Rngs(0))
    # LayerScale 1 (not 1e-5) so that every block shapes the output and the loss check means something.
    for block in model.blocks:
        block.ls1.gamma[...] = jnp.ones_like(block.ls1.gamma[...])
        block.ls2.gamma[...] = jnp.ones_like(block.ls2.gamma[...])
    params = nnx.to_pure_dict(nnx.state(model))
    reference = torch_reference.FlexiCTBackbone(**arch.to_config(), rope_dtype=torch.float32)
    state = torch_format.backbone_to_torch(params, arch, rope_bf16=False)
    reference.load_state_dict({k: torch_reference.to_torch(v) for k, v in state.items()}, strict=True)
    x = np.random.default_rng(0).normal(size=(case["batch"], *case["spatial"], 1)).astype(np.float32)

    runners = {"torch": _torch_step(reference, x, case["patch_size"])}
    compile_s = {}
    for dtype in ("float32", "bfloat16"):
        if f"jax_{dtype}" not in variants:
            continue
        start = time.perf_counter()
        runners[f"jax_{dtype}"] = _jax_step(model, x, case["patch_size"], dtype)
        runners[f"jax_{dtype}"]()  # compiles
        compile_s[f"jax_{dtype}"] = time.perf_counter() - start
    # The same step with jax.nn.dot_product_attention(implementation="xla") in place of our "xla" attention
    # (the formulation before bench/README's CPU-gap work): traced, and so compiled, with it swapped in.
    if "jax_float32_jaxnn_attention" in variants:
        ours = attention._xla
        try:
            attention._xla = lambda q, k, v, *, scale, key_mask, is_causal: jax.nn.dot_product_attention(
                q, k, v, scale=scale, implementation="xla")
            runners["jax_float32_jaxnn_attention"] = _jax_step(model, x, case["patch_size"], "float32")
            runners["jax_float32_jaxnn_attention"]()
        finally:
            attention._xla = ours
    times = {k: [] for k in runners}
    losses = {}
    for r in range(rounds):
        for key, run in runners.items():
            start = CLOCKS[clock]()
            loss = run()
            times[key].append(CLOCKS[clock]() - start)
            losses.setdefault(key, loss)
            progress.advance(1, f"{name} round {r + 1} {key}")
    if abs(losses["jax_float32"] - losses["torch"]) > LOSS_RTOL * abs(losses["torch"]):
        raise RuntimeError(f"{name}: the JAX loss {losses['jax_float32']} differs from torch's {losses['torch']}")
    best = {k: min(v) for k, v in times.items()}
    ratios = {key: best[a] / best[b] for key, (a, b) in RATIOS.items() if a in best and b in best}
    return {"case": name, **case, "clock": clock, "best_s": best, "all_s": times, "losses": losses, "jax_compile_s": compile_s,
            "load_average": os.getloadavg(), **ratios}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--cases", default="2d,3d", help=f"comma-separated, of {sorted(CASES)}")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best of each is reported")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads; 0 = torch's default. XLA:CPU's are set before jax loads, by "
                             "XLA_FLAGS (--xla_cpu_multi_thread_eigen=false for one thread)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated, of torch and jax_float32 (always run: the loss check) and "
                             "jax_bfloat16, jax_float32_jaxnn_attention")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall seconds, or CPU seconds of the process (see the module docstring)")
    parser.add_argument("--out", help="also write the JSON result to this file")
    host_heap.add_argument(parser)
    args = parser.parse_args(argv)
    heap = host_heap.apply_argument(args.host_heap)
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(CASES))
    variants = tuple(dict.fromkeys(["torch", "jax_float32"] + [v for v in args.variants.split(",") if v]))
    unknown += sorted(set(variants) - set(VARIANTS))
    if unknown or args.rounds < 1:
        parser.error(f"unknown cases or variants {unknown} (known: {sorted(CASES)}, {VARIANTS})" if unknown
                     else "--rounds must be >= 1")
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = Progress(len(cases) * args.rounds * len(variants), "torch vs jax")
    rows = [bench_case(name, args.rounds, progress, variants, args.clock) for name in cases]
    progress.close()
    result = {"benchmark": "torch_vs_jax", "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
              "jax": jax.__version__, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
              "xla_flags": os.environ.get("XLA_FLAGS", ""), "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
              "host_heap": heap,
              "cpu_affinity": sorted(os.sched_getaffinity(0)), "load_average": os.getloadavg(),
              "cpu_count": os.cpu_count(), "python": platform.python_version(),
              "date": time.strftime("%Y-%m-%d"), "rows": rows}
    print(json.dumps(result, indent=1))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
