"""Helpers shared by the end-to-end training and input-pipeline tests (imported by test files; not a test module)."""
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


def take(ds_or_iter, n) -> list:
    """The first `n` elements (batches) of a dataset or iterator."""
    it = iter(ds_or_iter)
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    """Two lists of batches (dicts of arrays) are equal, key by key."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def take_closing(ds, n) -> list:
    """`take` from a fresh iterator of `ds`, closed afterwards: it stops the Grain worker processes."""
    it = iter(ds)
    try:
        return take(it, n)
    finally:
        it.close()


def assemble_process_batches(parts) -> list:
    """Per-process lists of batches (process 0 first) joined into the global batches, batch by batch."""
    return [{k: np.concatenate([part[t][k] for part in parts]) for k in parts[0][t]} for t in range(len(parts[0]))]


def assert_resumes(build, skip: int, n: int = 2):
    """An iterator of the dataset `build()`, saved after `skip` batches and restored into a fresh iterator,
    continues with the same `n` batches."""
    it = iter(build())
    take(it, skip)
    state = it.get_state()
    expected = take(it, n)
    fresh = iter(build())
    fresh.set_state(state)
    assert_batches_equal(take(fresh, n), expected)


def restore_latest(workdir, config):
    """`Checkpointer.restore_latest` of a run's checkpoints onto `config`'s mesh and abstract state, without
    training (no step compiled); returns checkpointing.Restored or None."""
    from flexict_jax import checkpointing, sharding, trainer
    mesh = sharding.make_mesh(config.mesh)
    with sharding.activate(mesh, config.sharding_rules):
        program = trainer.build_program(config, mesh)
        ckpt = checkpointing.Checkpointer(pathlib.Path(workdir) / "checkpoints", **config.ckpt.to_dict())
        try:
            return ckpt.restore_latest(program.abstract_state, global_batch_size=config.global_batch_size,
                                       topology=checkpointing.topology(mesh))
        finally:
            ckpt.close()


def read_meta(workdir, step) -> dict:
    return json.loads((pathlib.Path(workdir) / "checkpoints" / str(step) / "meta" / "metadata").read_text())
