"""Helpers shared by the end-to-end training tests (imported by test files; not a test module)."""
from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_cli(main, argv) -> int:
    """Exit code of a CLI `main(argv)`, whether it returns it or raises SystemExit."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return int(code or 0)


def config_with(get_config, arg: str, data_dir, **overrides):
    """`get_config(arg)` with data.dir set and dotted-key overrides, e.g. {"model.layerscale_init": 0.1}."""
    config = get_config(arg)
    config.data.dir = str(data_dir)
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config


def metrics(workdir) -> list[dict]:
    return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def checkpoint_steps(workdir) -> list[int]:
    return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


def saved_state(workdir, step) -> dict:
    return ocp.StandardCheckpointer().restore(pathlib.Path(workdir) / "checkpoints" / str(step) / "state")


def assert_trees_close(a, b, atol):
    flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0, err_msg=str(path))
