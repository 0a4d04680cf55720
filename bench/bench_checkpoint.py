"""Checkpoint benchmark: how long `Checkpointer.save` holds the training loop, asynchronous (the default) vs
synchronous, for a stage's real train state (student, EMA teacher, Adam moments).

    python bench/bench_checkpoint.py [--config stage1:base] [--saves 3] [--dir /tmp/ckpt_bench] \
        [--out bench/results/checkpoint_cpu.json]

Per mode it saves the same state `--saves` times (forced, as at an interval step) and records the time `save`
blocks the caller (the loop cannot dispatch the next step meanwhile: the device-to-host copy of the state) and
the time until the write is on disk (`wait`). The state is the trainer's own (`train_step.build_program` →
`init_state`, sharded on the local devices); the data iterator is a small Grain iterator, as the trainer saves
one beside the state.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import statistics
import sys
import time

import grain
import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import stage1, stage1_hires, stage2  # noqa: E402
from flexict_jax import checkpointing, sharding, train_step  # noqa: E402

CONFIGS = {"stage1": stage1, "stage1_hires": stage1_hires, "stage2": stage2}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default="stage1:base", help="STAGE:VARIANT of configs/")
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--dir", default="/tmp/ckpt_bench", help="scratch directory, removed before each mode")
    parser.add_argument("--out", help="also write the JSON result to this file")
    args = parser.parse_args(argv)
    stage, _, variant = args.config.partition(":")
    if stage not in CONFIGS or args.saves < 1:
        parser.error(f"--config must be one of {sorted(CONFIGS)}[:variant] and --saves >= 1")
    config = CONFIGS[stage].get_config(variant or "base")
    mesh = sharding.make_mesh(config.mesh)
    with sharding.activate(mesh, config.sharding_rules):
        program = train_step.build_program(config, mesh)
        state = jax.block_until_ready(jax.jit(program.init_state, out_shardings=program.state_shardings)())
    state_bytes = sum(a.nbytes for a in jax.tree.leaves(state))
    result = {"config": args.config, "state_bytes": state_bytes, "devices": jax.device_count(),
              "platform": jax.devices()[0].platform, "modes": {}}
    for async_save in (True, False):
        directory = pathlib.Path(args.dir)
        shutil.rmtree(directory, ignore_errors=True)
        ckpt = checkpointing.Checkpointer(directory, every_steps=1, keep_last=1, async_save=async_save)
        iterator = iter(grain.MapDataset.range(64).to_iter_dataset())
        blocking, total = [], []
        for step in range(1, args.saves + 1):
            start = time.perf_counter()
            ckpt.save(step, state, iterator, {"stage": config.stage}, force=True)
            blocked = time.perf_counter() - start
            ckpt.wait()
            blocking.append(blocked)
            total.append(time.perf_counter() - start)
        ckpt.close()
        shutil.rmtree(directory, ignore_errors=True)
        mode = "async" if async_save else "sync"
        result["modes"][mode] = {"blocking_s": [round(t, 3) for t in blocking],
                                 "until_written_s": [round(t, 3) for t in total],
                                 "median_blocking_s": round(statistics.median(blocking), 3),
                                 "median_until_written_s": round(statistics.median(total), 3)}
        print(f"{mode}: save blocks the loop {statistics.median(blocking):.3f} s (median of {args.saves}), "
              f"on disk after {statistics.median(total):.3f} s; state {state_bytes / 2**30:.2f} GiB", flush=True)
    print(json.dumps(result))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
