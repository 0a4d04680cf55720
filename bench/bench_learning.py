"""Does stage-1 SSL learn? Trains a CPU-sized ViT on the real CT of ../shared/data and tracks the organ probe.

    python bench/bench_learning.py --run-dir runs/bench_learning --steps 2000 --eval-every 250 \\
        [--config configs/stage1.py:demo] [--out bench/results/learning_stage1_demo_cpu.json]

1. Ingests every real CT of SHARED/ct at 1.5 mm and cuts axial slices (the quickstart's 128 px, 342 mm field of
   view) for training; ingests the two CTs with TotalSegmentator label maps (ts_example_ct_sm, ts_torso_20: two
   subjects) at 1.5 mm as the probe's dataset. SSL sees the images of all volumes, never a label.
2. Scores the organ probe (kNN and linear, one subject trains the probe, the other is held out) at random
   init for --init-seeds seeds: the spread across seeds is the probe's run-to-run noise at step 0.
3. Trains --config with the in-training organ kNN monitor on the probe dataset every --eval-every steps.
4. Scores the final EMA teacher with the same probe as at step 0, and writes PCA / similarity pictures of
   ts_torso_20 at step 0 and at the end, and the run's curves.

The JSON result holds the monitor curve, the DINO / iBOT terms against ln K and ½·ln K at the first and last
logged steps, both probe results, the commands and wall times; pictures go to RUN_DIR/pictures/{start,end}.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys
import time

import common

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("FLEXICT_SHARED_DATA", REPO.parent / "shared" / "data"))
LABELLED = ("ts_example_ct_sm", "ts_torso_20")  # TotalSegmentator `total` label maps, two subjects
PICTURE_CT = "ts_torso_20"


def _run(argv: list[str], log: pathlib.Path) -> float:
    """Runs `python -m ...argv`, appending its output to `log`; returns the wall time. Fails loudly."""
    start = time.monotonic()
    with open(log, "a") as f:
        f.write(f"$ {' '.join(argv)}\n")
        f.flush()
        code = subprocess.call([sys.executable, *argv], stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    if code != 0:
        raise SystemExit(f"bench_learning: {' '.join(argv)} exited {code}; see {log}")
    return time.monotonic() - start


def _probe(checkpoint: pathlib.Path, dataset: pathlib.Path, out: pathlib.Path, log: pathlib.Path,
           extra: list[str]) -> dict:
    _run(["-m", "flexict_jax.evaluate", f"--checkpoint={checkpoint}", "--kind=2d", "--task=organs",
          f"--dataset={dataset}", f"--classes={SHARED / 'ct' / 'ts_total_classes.csv'}", f"--out={out}",
          "--patch-size=16", "--max-slices=16", *extra], log)
    result = json.loads((out / "results.json").read_text())
    return {k: result[k] for k in ("chance", "n_train", "n_test", "split", "classes")} | {
        p: {"balanced_accuracy": result[p]["balanced_accuracy"], "macro_f1": result[p]["macro_f1"]}
        for p in ("knn", "linear")}


def main(argv: list[str] | None = None) -> int:
    common.single_threaded_blas()
    parser = common.argument_parser(__doc__)
    parser.add_argument("--run-dir", required=True, type=pathlib.Path)
    parser.add_argument("--config", default="configs/stage1.py:demo")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--init-seeds", type=int, default=3)
    args = common.parse_args(parser, argv, ("steps", "eval_every", "init_seeds"))
    run, log = args.run_dir, args.run_dir / "bench.log"
    run.mkdir(parents=True, exist_ok=True)
    ct = SHARED / "ct"
    if not ct.is_dir():
        raise SystemExit(f"bench_learning: no real CT at {ct} (set FLEXICT_SHARED_DATA)")
    images = sorted(p for p in ct.glob("*.nii.gz") if not p.name.endswith("_label.nii.gz"))
    times = {}
    times["prepare_s"] = _run(["-m", "data_prep.ingest", "--input", *map(str, images), "--output",
                               str(run / "ct_1.5mm"), "--spacing", "1.5,1.5,1.5"], log)
    _run(["-m", "data_prep.ingest", "--input", *[str(ct / f"{n}.nii.gz") for n in LABELLED], "--output",
          str(run / "probe_1.5mm"), "--spacing", "1.5,1.5,1.5"], log)
    if not (run / "slices" / "index.json").is_file():
        times["prepare_s"] += _run(["-m", "data_prep.slices", "--dataset", str(run / "ct_1.5mm"), "--output",
                                    str(run / "slices"), "--size", "128", "--fov-mm", "342"], log)
    train = ["-m", "flexict_jax.train", f"--config={args.config}", f"--workdir={run / 'stage1'}",
             f"--config.data.dir={run / 'slices'}", f"--config.total_steps={args.steps}",
             f"--config.eval.every_steps={args.eval_every}", f"--config.eval.dataset={run / 'probe_1.5mm'}",
             f"--config.eval.classes={ct / 'ts_total_classes.csv'}", f"--config.seed={args.seed}",
             f"--config.ckpt.every_steps={args.eval_every}", "--config.ckpt.keep_last=100"]
    times["train_s"] = _run(train, log)
    stage1 = run / "stage1"
    probe_dataset = run / "probe_1.5mm"
    at_init = [_probe(stage1, probe_dataset, run / f"probe_init_seed{s}", log, ["--random-init", f"--init-seed={s}"])
               for s in range(args.init_seeds)]
    final = _probe(stage1, probe_dataset, run / "probe_final", log, [])
    from flexict_jax import visualize  # after the subprocesses: this process needs no JAX until here
    from flexict_jax.evals import features
    picture_ct = ct / f"{PICTURE_CT}.nii.gz"
    visualize.write_feature_pictures(features.load_encoder(stage1, None, "2d", random_init=True, seed=args.seed),
                                     picture_ct, "2d", run / "pictures" / "start", patch_size=16)
    visualize.write_feature_pictures(features.load_encoder(stage1, None, "2d"), picture_ct, "2d",
                                     run / "pictures" / "end", patch_size=16)
    visualize.write_curves(stage1, run / "pictures")
    records = visualize.read_metrics(stage1)
    prototypes = json.loads((stage1 / "config.json").read_text())["heads"]["num_prototypes"]
    train_rows = [r for r in records if isinstance(r.get("dino_local"), float)]
    terms = {which: {k: row.get(k) for k in ("step", "dino_local", "dino_global", "ibot", "koleo", "loss")}
             for which, row in (("first", train_rows[0]), ("last", train_rows[-1]))} if train_rows else {}
    result = {
        "benchmark": "learning", "config": args.config, "steps": args.steps, "eval_every": args.eval_every,
        "seed": args.seed, "shared_data": str(SHARED), "train_volumes": [p.name for p in images],
        "probe_volumes": list(LABELLED),
        "ln_K": math.log(prototypes), "half_ln_K": 0.5 * math.log(prototypes), "loss_terms": terms,
        "monitor_curve": [{"step": r["step"], "knn_balanced_accuracy": r["eval/knn_balanced_accuracy"]}
                          for r in records if "eval/knn_balanced_accuracy" in r],
        "probe_at_init": at_init, "probe_final": final,
        "pictures": str(run / "pictures"), "command": " ".join(["python", *train]), **times,
    }
    common.write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
