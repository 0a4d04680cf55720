"""In-training organ kNN monitor for stages 1 and 2 (the dino task's evaluator).

Every `config.eval.every_steps` steps the trainer calls `OrganMonitor(state)`: the EMA teacher's backbone
embeds the inputs of a labelled dataset (flexict_jax.evals.features: axial slices for a 2-D stage, cubes for a
3-D one), and a weighted kNN on the patch tokens of some subjects classifies those of the others
(flexict_jax.evals.probes; one subject: alternating z-slabs). Logged: `eval/knn_balanced_accuracy` (the number
that should rise from its random-init value as the features learn), `eval/knn_macro_f1`, `eval/knn_chance`.

The inputs and labels are prepared once, on every process. Each global batch is batch-sharded over the mesh with
every process supplying its own rows, as the stage-3 evaluator does; the features come back replicated, so all
processes compute the same metric, equal to a single-device run (tests/test_evaluate.py checks a 2x4 mesh).
"""
from __future__ import annotations

import functools
import json
import pathlib
import time
from typing import Any

import jax
import ml_collections as mlc
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flexict_jax import distributed, sharding
from flexict_jax.evals import features, probes
from flexict_jax.tasks.common import merge_model

KIND_OF_DATA = {"slices2d": "2d", "slices2d_hires": "2d", "volumes3d": "3d"}


def eval_dataset(config: mlc.ConfigDict) -> str | None:
    """config.eval.dataset, else the training data's own ingested dataset (a 3-D stage's data.dir, or the dataset
    a slices dir was cut from, recorded in its index.json)."""
    if config.eval.get("dataset"):
        return str(config.eval.dataset)
    data_dir = pathlib.Path(config.data.dir)
    if config.data.kind == "volumes3d":
        return str(data_dir)
    index = data_dir / "index.json"
    return json.loads(index.read_text()).get("dataset") if index.is_file() else None


def _patch_tokens(params: dict[str, Any], x: jax.Array, *, graphdef: nnx.GraphDef, abstract_state: nnx.State,
                  patch_size: int) -> jax.Array:
    model = merge_model(graphdef, abstract_state, params)
    return model.backbone(x[..., None], patch_size=patch_size, train=False)["patch"]


class OrganMonitor:
    """Built once per run (inputs, labels, split, compiled forward); `monitor(state)` -> {"eval/...": scalar}.

    Config `eval`: every_steps, dataset (None: the training data's, see `eval_dataset`), patch_size, batch_size
    (global; a multiple of the device and process counts), max_slices (2-D: labelled slices per volume), crop
    (3-D cube size), knn_k, knn_temperature.
    """

    def __init__(self, config: mlc.ConfigDict, program: Any, dataset: str):
        eval_cfg = config.eval
        self.batch = int(eval_cfg.batch_size)
        processes = jax.process_count()
        if self.batch < 1 or self.batch % jax.device_count() or self.batch % processes:
            raise ValueError(f"config.eval.batch_size={self.batch} must be a positive multiple of the device count "
                             f"({jax.device_count()}) and the process count ({processes})")
        kind = KIND_OF_DATA.get(config.data.kind)
        if kind is None:
            raise ValueError(f"config.eval: the organ monitor has no input kind for data.kind={config.data.kind!r}")
        self.patch_size = int(eval_cfg.patch_size)
        self.organ = features.organ_inputs(dataset, kind, self.patch_size, crop=int(eval_cfg.crop),
                                           max_slices_per_volume=eval_cfg.get("max_slices"))
        used = self.organ.token_labels >= 0
        self.names = features.class_names(dataset, self.organ.volumes, eval_cfg.get("classes"),
                                          np.unique(self.organ.token_labels[used]))
        rows = np.broadcast_to(np.arange(len(self.organ.inputs))[:, None], used.shape)[used]
        self.split = features.split_tokens(self.organ, rows, self.organ.token_z_mm[used])
        self.k, self.temperature = int(eval_cfg.knn_k), float(eval_cfg.knn_temperature)
        self.mesh = program.mesh
        n = len(self.organ.inputs)
        padded = -(-n // self.batch) * self.batch
        self.inputs = np.concatenate([self.organ.inputs, np.repeat(self.organ.inputs[-1:], padded - n, axis=0)])
        self._forward = jax.jit(functools.partial(_patch_tokens, graphdef=program.graphdef,
                                                  abstract_state=program.abstract_params, patch_size=self.patch_size),
                                out_shardings=NamedSharding(self.mesh, P()))
        self._compiled = None
        logging.info("organ monitor: %d inputs, %d labelled tokens of %d label values; %s", n, int(used.sum()),
                     len(np.unique(self.organ.token_labels[used])), self.split.description)

    def _global(self, start: int) -> jax.Array:
        """Rows [start, start + batch) as one batch-sharded array, each process supplying its own slice."""
        local = self.batch // jax.process_count()
        rows = self.inputs[start + jax.process_index() * local: start + (jax.process_index() + 1) * local]
        return jax.make_array_from_process_local_data(
            NamedSharding(self.mesh, sharding.batch_spec(rows.ndim)), rows)

    def __call__(self, state: dict[str, Any]) -> dict[str, float]:
        start = time.monotonic()
        params = state["teacher"]
        patches = []
        for first in range(0, len(self.inputs), self.batch):
            x = self._global(first)
            if self._compiled is None:  # all hosts compile before any runs the gathered forward (stage3.py)
                self._compiled = self._forward.lower(params, x).compile()
                distributed.barrier("organ monitor: compiled")
            patches.append(np.asarray(self._compiled(params, x).addressable_data(0)))
        patch = np.concatenate(patches)[:len(self.organ.inputs)]
        x, y, _, _ = features.labelled_tokens(patch, self.organ)
        result = probes.run_probes(x[self.split.train], y[self.split.train], x[self.split.test], y[self.split.test],
                                   self.names, probes=("knn",), k=self.k, temperature=self.temperature)
        return {"eval/knn_balanced_accuracy": result["knn"]["balanced_accuracy"],
                "eval/knn_macro_f1": result["knn"]["macro_f1"], "eval/knn_chance": result["chance"],
                "eval/seconds": time.monotonic() - start}
