"""TPU plan table: the recipe's stages compiled ahead of time for v5p and v6e slices, on any host (libtpu, no TPU).

    python bench/plan_tpu_table.py [--stages stage1,stage1_hires,stage2,stage3] [--patch-sizes 16,8] \
        [--chips v5p,v6e] [--remat none,full] [--min-chips 1] [--max-chips 64] [--global-batch N] [--unrolled] \
        [--attention-impl auto] [--memory-only] [--compute-dtype bfloat16] [--stage3-hf-folder DIR] \
        [--out-dir bench/results]

For each stage, patch size and chip kind it walks the slices from the smallest up (from --min-chips), keeping
the recipe's global batch or --global-batch (per-chip batch = global batch / chips; slices that do not divide it
are skipped), and at each slice the remat policies in order; the first (slice, remat) whose step fits 90% of the
chip's HBM ends the walk (an attempt that does not fit is not timed). Each attempt is `flexict_jax.plan.plan` on
the slice's compile-only devices (`plan.topology_devices`), on a mesh that shards the parameters (fsdp) over as
many chips as the model's width divides (864 = 2⁵·27: up to 32) and is data parallel over the rest (a 64-chip
slice: data 2 × fsdp 32); the result kept as
bench/results/plan_tpu_<stage>_p<patch>_<topology>_<remat>_<dtype>[_gb<global batch>][_unrolled][_<attention>]
[_memory].json; a markdown table of the fits (and of the last attempt where nothing fit) is printed at the end.
Where compiles are dear the two halves of a row can be made apart: `--memory-only` compiles the step as
configured (splash attention on TPU) and skips the time; `--unrolled --attention-impl xla` compiles the one step
the cost model times (blocks unrolled, XLA attention: docs/scaling.md §4), whose time is then the estimate.

Stage 1.1 is planned at its largest resolution only (512² global, 224² local, 768² Gram crops: the memory
bound of its five). Stage 3's text tower is the recipe's Qwen3-Embedding-0.6B: from --stage3-hf-folder (a local
Qwen3 folder with config.json and the tokenizer; no weights are read), else from `qwen3.Qwen3Config`'s defaults
(the same architecture) written as a config.json with a stand-in tokenizer (the `hf` extra's tokenizers) into a
temporary folder: the plan compiles shapes only, and the tokenizer only bounds the ids (the embedding has the
config's 151,669 rows). Drop-path groups are cut to the per-chip batch where the recipe's per-GPU group is
larger, so a group never spans chips, and KoLeo's groups become the per-chip batch where --global-batch is not a
multiple of the recipe's (upstream's KoLeo runs per GPU batch; docs/scaling.md §4).
`--compute-dtype` sets config.model.compute_dtype where the model has it (float32 otherwise; the plan records
what was used). Compiling ViT-B steps takes minutes each on a small host: the walk prints an ETA.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
# Compile-only: leave any TPU on this host alone and skip the Cloud TPU metadata queries (see flexict_jax.plan).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from configs import stage1, stage1_hires, stage2, stage3  # noqa: E402
from flexict_jax import plan  # noqa: E402
from flexict_jax.models import qwen3  # noqa: E402
from flexict_jax.progress import Progress  # noqa: E402

STAGES = {"stage1": stage1, "stage1_hires": stage1_hires, "stage2": stage2, "stage3": stage3}
# Slices in order of chip count (topology names as jax.experimental.topologies spells them).
SLICES = {
    "v5p": ["v5p:2x2x1", "v5p:2x2x2", "v5p:2x2x4", "v5p:2x4x4", "v5p:4x4x4", "v5p:4x4x8", "v5p:4x8x8"],
    "v6e": ["v6e:2x2", "v6e:2x4", "v6e:4x4", "v6e:4x8", "v6e:8x8", "v6e:8x16", "v6e:16x16"],
}


def chips_of(topology: str) -> int:
    return math.prod(int(d) for d in topology.split(":")[1].split("x"))


def qwen3_architecture_folder() -> str:
    """A folder holding Qwen3-Embedding-0.6B's architecture (`qwen3.Qwen3Config` defaults) as config.json and a
    stand-in word-level tokenizer.json: enough to build and compile stage 3 (no weights, no token is read)."""
    import tokenizers

    folder = pathlib.Path(tempfile.mkdtemp(prefix="qwen3_architecture_"))
    (folder / qwen3.CONFIG_FILE).write_text(json.dumps({"model_type": "qwen3",
                                                        **dataclasses.asdict(qwen3.Qwen3Config())}))
    words = ["<|endoftext|>", "<unk>"]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|endoftext|>"}))
    return str(folder)


def stage_config(stage: str, patch_size: int, chips: int, remat: str, compute_dtype: str, hf_folder: str | None,
                 global_batch: int | None = None, unrolled: bool = False, attention_impl: str = "auto"):
    config = STAGES[stage].get_config("base")
    config.patch_sizes, config.patch_size_probs = (patch_size,), (1.0,)
    config.model.remat_policy = remat
    if unrolled:
        config.model.scan_blocks = False
    config.model.attention_impl = attention_impl
    if "compute_dtype" in config.model:
        config.model.compute_dtype = compute_dtype
    if stage == "stage1_hires":
        config.data.resolutions = (max(config.data.resolutions),)
        config.data.resolution_probs = (1.0,)
    if stage == "stage3":
        config.text.hf_folder = hf_folder
    return plan.with_global_batch(config, global_batch or config.global_batch_size, chips)


def markdown(rows: list[dict]) -> str:
    lines = [("| stage | patch | chip | slice (chips) | per-chip batch | remat | attention | fits | peak per chip | "
              "HBM | est. step | samples/s | MFU | compute dtype | compile |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        step = (f"{1e3 * r['estimated_step_s']:,.0f} ms" if r["estimated_step_s"] else
                "n/a (the timed step is over HBM)" if r.get("estimate_refusal") else "n/a")
        samples = f"{r['samples_per_s']:,.0f}" if r["samples_per_s"] else "n/a"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
        peak = f"{r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else "over HBM (compiler refused)"
        lines.append(
            f"| {r['stage']} | {r['patch_size']} | {r['chip']} | {r['topology']} ({r['chips']}) | {r['per_chip_batch']} "
            f"| {r['remat']} | {r['attention_impl']} | {'yes' if r['fits'] else 'no'} | {peak} "
            f"| {r['hbm_gib']:.0f} GiB | {step} | {samples} | {mfu} | {r['compute_dtype']} | {r['compile_s']:.0f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--stages", default="stage1,stage1_hires,stage2,stage3")
    parser.add_argument("--patch-sizes", default="16,8")
    parser.add_argument("--chips", default="v5p,v6e")
    parser.add_argument("--remat", default="none,full", help="policies tried at each slice, in order")
    parser.add_argument("--min-chips", type=int, default=1, help="smallest slice tried")
    parser.add_argument("--max-chips", type=int, default=64, help="largest slice tried")
    parser.add_argument("--global-batch", type=int, help="instead of the recipe's (e.g. where its batch does not "
                        "divide the slices that fit)")
    parser.add_argument("--unrolled", action="store_true", help="plan with model.scan_blocks=False (one compile "
                        "fewer: the estimate is timed on the unrolled step anyway)")
    parser.add_argument("--attention-impl", default="auto", help="config.model.attention_impl (auto: splash on TPU)")
    parser.add_argument("--memory-only", action="store_true", help="skip the step-time estimate (a second compile)")
    parser.add_argument("--compute-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--stage3-hf-folder", help="local Qwen3 folder (config.json, tokenizer) for stage 3; "
                        "default: Qwen3-Embedding-0.6B's architecture from qwen3.Qwen3Config")
    parser.add_argument("--out-dir", default="bench/results")
    args = parser.parse_args(argv)
    stages = args.stages.split(",")
    unknown = sorted(set(stages) - set(STAGES)) + sorted(set(args.chips.split(",")) - set(SLICES))
    if unknown:
        parser.error(f"unknown stage or chip {unknown}; stages {sorted(STAGES)}, chips {sorted(SLICES)}")
    hf_folder = args.stage3_hf_folder
    if "stage3" in stages and not hf_folder:
        hf_folder = qwen3_architecture_folder()
        print(f"stage3: text tower Qwen3-Embedding-0.6B from qwen3.Qwen3Config (architecture only) in {hf_folder}")
    out_dir = pathlib.Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = [(s, int(p), c) for s in stages for p in args.patch_sizes.split(",") for c in args.chips.split(",")]
    progress = Progress(len(cases), "cases")
    rows, failures = [], 0
    for stage, patch_size, chip in cases:
        last = None
        batch = args.global_batch or STAGES[stage].get_config("base").global_batch_size
        for topology in (t for t in SLICES[chip]
                         if args.min_chips <= chips_of(t) <= args.max_chips and batch % chips_of(t) == 0):
            for remat in args.remat.split(","):
                chips = chips_of(topology)
                config = stage_config(stage, patch_size, chips, remat, args.compute_dtype, hf_folder,
                                      args.global_batch, args.unrolled, args.attention_impl)
                start = time.perf_counter()
                try:
                    # fsdp over as many chips as the width divides (864: 32), data parallel over the rest.
                    fsdp = math.gcd(chips, config.model.dim)
                    result = plan.plan(config, (chips // fsdp, fsdp, 1), devices=plan.topology_devices(topology),
                                       estimate=not args.memory_only, estimate_unfit=False)
                except Exception as e:  # noqa: BLE001 - a case that fails to compile is reported, the walk goes on
                    print(f"{stage} p{patch_size} {topology} remat={remat}: FAILED {type(e).__name__}: {e}")
                    failures += 1
                    continue
                result.update(topology=topology, wall_s=round(time.perf_counter() - start, 1))
                if stage == "stage3":
                    result["text_tower"] = {"tower": "qwen3", "hf_folder": args.stage3_hf_folder
                                            or "qwen3.Qwen3Config defaults (Qwen3-Embedding-0.6B architecture)"}
                name = (f"plan_tpu_{stage}_p{patch_size}_{topology.replace(':', '_')}_{remat}_{result['compute_dtype']}"
                        + (f"_gb{batch}" if args.global_batch else "") + ("_unrolled" if args.unrolled else "")
                        + (f"_{args.attention_impl}" if args.attention_impl != "auto" else "")
                        + ("_memory" if args.memory_only else ""))
                (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1))
                # A variant the TPU compiler refused (over HBM) has no memory figures and is the worst.
                variant = max(result["variants"], key=lambda v: (v["memory_per_device"] or {}).get("peak", math.inf))
                last = {"stage": stage, "patch_size": patch_size, "chip": chip, "topology": topology, "chips": chips,
                        "per_chip_batch": batch // chips, "remat": remat, "fits": variant["fits"],
                        "attention_impl": result["attention_impl"], "scan_blocks": config.model.scan_blocks,
                        "peak_gib": variant["memory_per_device"]["peak"] / plan.GIB if variant["memory_per_device"]
                        else None, "compiler_refusal": variant.get("compiler_refusal"),
                        "hbm_gib": result["device_memory_bytes"] / plan.GIB,
                        "estimated_step_s": variant["estimated_step_s"],
                        "samples_per_s": variant["estimated_samples_per_s"], "mfu": variant["estimated_mfu"],
                        "estimated_step_s_attention_unpriced": variant.get("estimated_step_s_attention_unpriced"),
                        "estimate_refusal": variant.get("estimate_refusal"),
                        "compute_dtype": result["compute_dtype"],
                        "compile_s": variant["compile_s"] + variant.get("estimate_compile_s", 0.0)}
                print(json.dumps(last), flush=True)
                if last["fits"]:
                    break
            if last and last["fits"]:
                break
        if last:
            rows.append(last)
        progress.advance(note=f"{stage} p{patch_size} {chip}")
    progress.close()
    print(markdown(rows))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
