"""One process of a multi-process stage-3 evaluation of a saved tiny run (a helper of test_stage3.py, not a test).

test_stage3.py starts it on 2 processes x 4 CPU devices through `launch/local_multiprocess.sh --module
stage3_eval_worker` (with tests/ on PYTHONPATH) and calls `evaluate` itself on 1 process x 8 devices:

    python -m stage3_eval_worker REPORTS_DIR RUN_DIR STEP OUT_JSON

Process 0 writes {split: metrics} to OUT_JSON.
"""
from __future__ import annotations

import json
import os
import pathlib
import sys

import jax

from configs import stage3
from flexict_jax import checkpointing, distributed, sharding, train_step
from flexict_jax.evals.stage3 import Stage3Evaluator

# "train": 6 records, so with a global evaluation batch of 8 both hosts embed real rows; "val": 4 records whose
# "lesion" finding has both classes, so the zero-shot AUC is defined.
SPLITS = ("train", "val")


def evaluate(reports_dir: str | os.PathLike, run_dir: str | os.PathLike, step: int) -> dict[str, dict[str, float]]:
    """{split: the evaluator's metrics less eval/seconds} of the student saved at `step` of a
    `configs/stage3.py:tiny` run, on every host of the current JAX job."""
    config = stage3.get_config("tiny")
    config.data.dir = str(reports_dir)
    mesh = sharding.make_mesh(config.mesh)
    with sharding.activate(mesh, config.sharding_rules):
        program = train_step.build_program(config, mesh)
        saved, _, _ = checkpointing.read_subtree(run_dir, "params", step)
        host = checkpointing.conform(saved, program.abstract_state["params"], what=f"{run_dir} step {step}")
        # Every host has the whole (numpy) tree and contributes the shards its devices hold.
        params = jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: x[index]),
                              host, program.state_shardings["params"])
        result = {}
        for split in SPLITS:
            config.eval.split = split
            metrics = Stage3Evaluator(config, program)({"params": params})
            result[split] = {k: v for k, v in metrics.items() if k != "eval/seconds"}
    return result


def main(argv: list[str]) -> None:
    if len(argv) != 4:
        raise SystemExit(f"usage: python -m stage3_eval_worker REPORTS_DIR RUN_DIR STEP OUT_JSON (got {argv})")
    reports_dir, run_dir, step, out = argv
    distributed.maybe_initialize()
    result = evaluate(reports_dir, run_dir, int(step))
    if jax.process_index() == 0:
        pathlib.Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
