"""One process of a multi-process `Checkpointer.restore_latest` (a helper of test_ckpt_fallback.py, not a test).

test_ckpt_fallback.py starts it on 2 processes x 4 CPU devices through `launch/local_multiprocess.sh --module
restore_worker` (with tests/ on PYTHONPATH):

    python -m restore_worker SLICES_DIR WORKDIR OUT_PREFIX

Each process i writes {"step": restored step, "position": data position} to OUT_PREFIX.i.json.
"""
from __future__ import annotations

import json
import pathlib
import sys

import jax
from run_utils import config_with, restore_latest

from configs import stage1
from flexict_jax import distributed


def main(argv: list[str]) -> None:
    if len(argv) != 3:
        raise SystemExit(f"usage: python -m restore_worker SLICES_DIR WORKDIR OUT_PREFIX (got {argv})")
    data_dir, workdir, out = argv
    distributed.maybe_initialize()
    restored = restore_latest(workdir, config_with(stage1.get_config, "tiny", data_dir))
    pathlib.Path(f"{out}.{jax.process_index()}.json").write_text(
        json.dumps({"step": restored.step, "position": restored.data_position}))


if __name__ == "__main__":
    main(sys.argv[1:])
