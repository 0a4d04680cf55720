"""Stage-3 evaluation during training, on a held-out split (issue #4 item 6; protocol of docs/recipe.md §11.6).

Every `config.eval.every_steps` steps the trainer calls a `Stage3Evaluator` with the current state:

  - image->text retrieval: each volume's embedding (its centred global crop, unmasked, eval mode) against the
    embeddings of all the split's reports (`pipeline_align.report_text`): Recall@1/5/10;
  - zero-shot classification: for every finding the split's records carry labels for (CT-RATE's label columns,
    or the structures and lesions of pseudo-reports), the prompt pair "{finding}." / "No {finding}." scored at
    the model's logit scale; AUC per finding and their mean (`retrieval.zero_shot_auc`).

Embeddings use the *student* backbone, projection and text tower: the VLM head is trained against student
features (docs/recipe.md §8), so pairing it with the EMA backbone would measure the export's mismatch (docs/recipe.md §13 #16),
not training progress. Metrics come back as "eval/..." scalars for the trainer's metric writer; findings with a
single class in the split have no AUC: they are left out and counted (`eval/zero_shot_findings_single_class`),
and with none scored `eval/zero_shot_auc` is absent rather than NaN. `python -m flexict_jax.evaluate
--task=retrieval` runs the same evaluator on a saved checkpoint.

Across hosts each process reads only its rows of every (padded) global evaluation batch; the embeddings come
back replicated, in example order, so every process computes the same metrics (tests/test_stage3.py checks
2 processes x 4 devices against 1 x 8).
"""
from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections as mlc
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flexict_jax import distributed, sharding
from flexict_jax.data import pipeline_align
from flexict_jax.evals import retrieval
from flexict_jax.tasks.common import flatten_crops, merge_model
from flexict_jax.train_step import Program


def _embed_pairs(params: dict[str, Any], crops: jax.Array, tokens: jax.Array, mask: jax.Array, *,
                 graphdef: nnx.GraphDef, abstract_state: nnx.State,
                 patch_size: int) -> tuple[jax.Array, jax.Array]:
    """(image embeddings, report embeddings) [B, E] of global crops [B, 1, G, G, G, 1] and report tokens."""
    model = merge_model(graphdef, abstract_state, params)
    out = model.backbone(flatten_crops(crops), patch_size=patch_size, train=False)
    return model.embed_image(out["cls"], out["patch"]), model.embed_text(tokens, mask)


def _embed_texts(params: dict[str, Any], tokens: jax.Array, mask: jax.Array, *, graphdef: nnx.GraphDef,
                 abstract_state: nnx.State) -> jax.Array:
    return merge_model(graphdef, abstract_state, params).embed_text(tokens, mask)


def _host(x: jax.Array) -> np.ndarray:
    """A replicated array as numpy on every process (each device holds all of it)."""
    return np.asarray(x.addressable_data(0))


class Stage3Evaluator:
    """Built once per run (data, prompt tokens, compiled embedding functions); `evaluator(state)` -> metrics.

    Config `eval`: split (a split of the reports dir, "" = records without a split), batch_size (global;
    divisible by the device and process counts), patch_size (one of config.patch_sizes), max_examples (None =
    the whole split). `program` is the trainer's `Program`; call inside its mesh context.
    """

    def __init__(self, config: mlc.ConfigDict, program: Program):
        eval_cfg = config.eval
        batch, processes = int(eval_cfg.batch_size), jax.process_count()  # checked by the task's validate
        self.dataset, records = pipeline_align.build_eval_dataset(
            config.data, config.text, split=str(eval_cfg.split), batch_size=batch // processes,
            patch_size=int(eval_cfg.patch_size), process_index=jax.process_index(), process_count=processes,
            max_examples=eval_cfg.max_examples)
        self.mesh = program.mesh
        self.n_examples = len(records)
        self.records = records
        self.findings = sorted({name for record in records for name in record["finding_labels"]})
        self.labels = np.array([[record["finding_labels"].get(f, -1) for f in self.findings] for record in records],
                               np.int32).reshape(self.n_examples, len(self.findings))
        replicated = NamedSharding(self.mesh, P())
        positive, negative = retrieval.zero_shot_prompts(self.findings)
        tokenizer = pipeline_align.load_text_tokenizer(config.text, config.data.dir)
        # Prompts are short sentences, as OSL's; every process holds the same tokens, replicated.
        self.prompts = jax.device_put(tokenizer.encode_batch(positive + negative, int(config.text.osl_len)),
                                      replicated)
        model = dict(graphdef=program.graphdef, abstract_state=program.abstract_params)
        self._embed_pairs = jax.jit(functools.partial(_embed_pairs, **model, patch_size=int(eval_cfg.patch_size)),
                                    out_shardings=replicated)
        self._embed_texts = jax.jit(functools.partial(_embed_texts, **model), out_shardings=replicated)
        self._executables: dict[str, Callable] = {}

    def _compiled(self, name: str, function: Callable, *args: Any) -> Callable:
        """`function` compiled for `args` on first use. Every host then waits at a barrier before running it:
        the embeddings are gathered across hosts, and a host still compiling would make the others' CPU (gloo)
        collectives give up after 30 s (see `distributed.barrier`; the trainer does the same per step variant)."""
        if name not in self._executables:
            self._executables[name] = function.lower(*args).compile()
            distributed.barrier(f"stage-3 evaluation: compiled {name}")
        return self._executables[name]

    def embeddings(self, params: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """(image embeddings, report embeddings) [N, E] of the split, in record order, on every process."""
        images, reports = [], []
        for local in self.dataset:  # every global batch is held out examples [t·B, (t+1)·B) in order
            batch = sharding.global_batch(self.mesh, local)
            args = (params, batch["global_crops"], batch["caption_tokens"], batch["caption_mask"])
            image_emb, report_emb = self._compiled("pairs", self._embed_pairs, *args)(*args)
            images.append(_host(image_emb))
            reports.append(_host(report_emb))
        # The rest is padding to whole batches.
        return np.concatenate(images)[:self.n_examples], np.concatenate(reports)[:self.n_examples]

    def metrics(self, params: dict[str, Any], images: np.ndarray, reports: np.ndarray) -> dict[str, float]:
        """Recall@K of the embeddings and the zero-shot AUCs of the findings with both classes in the split; a
        finding without a positive or without a negative example has no AUC: it is counted, never NaN."""
        metrics: dict[str, float] = {"eval/examples": self.n_examples}
        metrics.update({f"eval/{k}": v for k, v in retrieval.recall_at_k(images, reports).items()})
        if self.findings:
            args = (params, *self.prompts)
            prompts = _host(self._compiled("prompts", self._embed_texts, *args)(*args))
            positive, negative = np.split(prompts, 2)
            scale = float(np.exp(_host(params["logit_scale"])))
            probabilities = retrieval.zero_shot_probabilities(images, positive, negative, scale)
            auc = retrieval.zero_shot_auc(probabilities, self.labels, self.findings)
            metrics.update({f"eval/{k}": v for k, v in auc.items() if np.isfinite(v)})
            scored = sum(1 for k, v in auc.items() if k != "zero_shot_auc" and np.isfinite(v))
            metrics["eval/zero_shot_findings_scored"] = scored
            metrics["eval/zero_shot_findings_single_class"] = len(self.findings) - scored
        return metrics

    def __call__(self, state: dict[str, Any]) -> dict[str, float]:
        start = time.monotonic()
        params = state["params"]
        metrics = self.metrics(params, *self.embeddings(params))
        metrics["eval/seconds"] = time.monotonic() - start
        return metrics
