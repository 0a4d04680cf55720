"""Imports run one way: config → data → model → losses → tasks → trainer → evals/export (and the CLIs).

Every module of the package, the configs and the data-prep jobs has an explicit layer below; an import (at
module level or inside a function) of a module in a higher layer fails the test, as does a module without a
layer. Pure source inspection: nothing is imported.
"""
from __future__ import annotations

import ast
import pathlib

from run_utils import REPO

PACKAGES = ("flexict_jax", "configs", "data_prep")
# Layers, lowest first; a module may import its own layer and the ones before it. A module is matched by its
# dotted name or the longest listed package prefix.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("flexict_jax", "flexict_jax.errors", "flexict_jax.ops", "flexict_jax.resize", "flexict_jax.progress",
              "flexict_jax.parallel",
              "flexict_jax.sharding", "flexict_jax.distributed", "flexict_jax.variants", "flexict_jax.schedules",
              "flexict_jax.optim", "flexict_jax.checkpointing", "flexict_jax.metric_io", "flexict_jax.host_heap")),
    ("config", ("configs",)),
    ("data", ("flexict_jax.data", "flexict_jax.imaging")),
    ("model", ("flexict_jax.models",)),
    ("losses", ("flexict_jax.losses",)),
    ("tasks", ("flexict_jax.tasks",)),
    ("trainer", ("flexict_jax.train_step", "flexict_jax.handoff", "flexict_jax.config_check", "flexict_jax.faults",
                 "flexict_jax.trainer")),
    ("evals/export", ("flexict_jax.evals", "flexict_jax.export", "flexict_jax.import_torch", "flexict_jax.embed",
                      "flexict_jax.torch_format", "flexict_jax.torch_reference", "flexict_jax.plan", "flexict_jax.evaluate",
                      "flexict_jax.visualize",
                      "flexict_jax.train", "data_prep")),
]


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, pathlib.Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))}


def layer_of(name: str) -> int:
    matches = [(len(prefix), index) for index, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
               if name == prefix or name.startswith(prefix + ".")]
    assert matches, f"module {name} has no layer: add it to LAYERS in tests/test_architecture.py"
    return max(matches)[1]


def imported_modules(path: pathlib.Path, known: set[str]) -> set[str]:
    """The project modules `path` imports: `from a.b import c` is module a.b.c when that is a module, else a.b."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                     for alias in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in PACKAGES)
    return found


def test_every_module_has_a_layer():
    for name in modules():
        layer_of(name)


def test_imports_run_one_way():
    known = modules()
    upward = []
    for name, path in known.items():
        for target in sorted(imported_modules(path, set(known))):
            if layer_of(target) > layer_of(name):
                upward.append(f"{name} ({LAYERS[layer_of(name)][0]}) imports {target} "
                              f"({LAYERS[layer_of(target)][0]})")
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path):
    """The checker itself: a function-level import of the trainer from a data module is reported."""
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from flexict_jax import trainer\n    from flexict_jax.data import records\n")
    targets = imported_modules(source, set(modules()))
    assert targets == {"flexict_jax.trainer", "flexict_jax.data.records"}
    assert layer_of("flexict_jax.trainer") > layer_of("flexict_jax.data.pipeline2d")
