"""Frozen-feature evaluation of a checkpoint: organ probe, volume classification, report retrieval.

    python -m flexict_jax.evaluate --checkpoint=CKPT [--step=N] --kind={2d,3d} --task=organs --dataset=DS \\
        [--classes=CLASSES.csv] --out=DIR
    python -m flexict_jax.evaluate --checkpoint=CKPT --kind=3d --task=classify --labels=LABELS.csv \\
        [--dataset=DS] [--fractions=0.01,0.1,1.0] --out=DIR
    python -m flexict_jax.evaluate --checkpoint=STAGE3_RUN --task=retrieval --reports=REPORTS_DIR --out=DIR

CKPT: a training workdir (its EMA teacher at --step, default the latest), an imported workdir
(`import_torch`), a FlexiCT `.pth` file or a safetensors export folder. --random-init evaluates the same
architecture freshly initialised (a workdir's config), the baseline a trained checkpoint must beat;
--init-seed picks the init and leaves the split as it is; --random-init-baselines=N (organs) scores the checkpoint
and N random inits (seeds 0..N-1) on the same tokens and split and prints them side by side.

  * organs: dense probe on an ingested dataset with label maps (flexict_jax.evals.features): every patch token
    gets the majority label of its voxels; a kNN (cosine, k=20, votes weighted exp(sim/0.07), as DINO's kNN
    eval) and an L2-regularised softmax regression are trained on some subjects and scored on the others
    (manifest `subject`; with one subject, alternating z-slabs). Class names from --classes (a CSV
    "index,name,..." such as ts_total_classes.csv), else labels.json beside the sources (the phantoms).
  * classify: volume-level probes on CLS tokens (2d: the mean CLS over axial slices) from a CSV with columns
    volume id (of --dataset) or image path, label[, split]; rows without a split are split by a seeded
    stratified draw; --fractions sweeps the labelled training fraction as upstream's downstream/2d_classify.
  * retrieval (stage-3 checkpoints): image -> report Recall@1/5/10 and zero-shot AUC per finding with the
    in-training evaluator (flexict_jax.evals.stage3) on a reports dir's split; writes a few examples as PNG.

Writes DIR/results.json (organs: "knn" and "linear" with balanced_accuracy, macro_f1, per_class; "chance",
"n_train", "n_test", the checkpoint and its step) and DIR/results.md. Metrics: balanced accuracy (mean
per-class recall; chance = 1 / #classes), macro-F1, per-class recall. Exit 0 on success, 1 on any error.
"""
from __future__ import annotations

import argparse
import csv
import json
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

TASKS = ("organs", "classify", "retrieval")


def _encode(loaded, inputs: np.ndarray, patch_size: int, batch_size: int, label: str):
    from flexict_jax import embed
    from flexict_jax.progress import Progress

    progress = Progress(len(inputs), label)
    cls, patch = embed.encode(loaded.model, inputs, patch_size, batch_size, progress)
    progress.close()
    return cls, patch


def _identity(args: argparse.Namespace, loaded) -> dict[str, Any]:
    return {"checkpoint": loaded.source, "step": loaded.step, "checkpoint_kind": loaded.kind, "kind": args.kind,
            "random_init": args.random_init, "init_seed": args.init_seed if args.random_init else None}


def run_organs(args: argparse.Namespace) -> dict[str, Any]:
    from flexict_jax.evals import features, probes

    if args.dataset is None:
        raise ValueError("--task=organs needs --dataset (an ingested dataset with label maps)")
    loaded = features.load_encoder(args.checkpoint, args.step, args.kind, random_init=args.random_init,
                                     seed=args.init_seed)
    # Loaded first, so that a checkpoint they cannot be built from fails before any encoding.
    initial = [features.load_encoder(args.checkpoint, args.step, args.kind, random_init=True, seed=seed)
               for seed in range(args.random_init_baselines)]
    patch_size = args.patch_size or loaded.arch.base_patch_size
    organ = features.organ_inputs(args.dataset, args.kind, patch_size, crop=args.crop,
                                  include_background=args.include_background, min_purity=args.min_purity,
                                  max_slices_per_volume=args.max_slices)
    names = features.class_names(args.dataset, organ.volumes, args.classes,
                                 np.unique(organ.token_labels[organ.token_labels >= 0]))

    def probe(encoder, label: str) -> tuple[dict[str, Any], features.Split]:
        _, patch = _encode(encoder, organ.inputs, patch_size, args.batch_size, label)
        x, y, rows, z = features.labelled_tokens(patch, organ)
        split = features.split_tokens(organ, rows, z, test_fraction=args.test_fraction, slab_mm=args.slab_mm,
                                      seed=args.seed)
        return probes.run_probes(x[split.train], y[split.train], x[split.test], y[split.test], names,
                                 k=args.knn_k, temperature=args.knn_temperature, l2=args.l2), split

    result, split = probe(loaded, "evaluate: features")
    print(f"evaluate: {int(split.train.sum() + split.test.sum())} labelled tokens; {split.description}",
          file=sys.stderr)
    # The baselines see the same tokens and split (by subject, not by features): only the init differs.
    baselines = []
    for seed, encoder in enumerate(initial):
        at_init, _ = probe(encoder, f"evaluate: random init {seed}")
        baselines.append({"init_seed": seed, "knn": at_init["knn"], "linear": at_init["linear"]})
    return {"task": "organs", **_identity(args, loaded), "patch_size": patch_size, "dataset": str(args.dataset),
            "spacing_mm": list(organ.spacing), "split": split.description, **result,
            **({"random_init_baselines": baselines} if baselines else {}),
            "settings": {"knn_k": args.knn_k, "knn_temperature": args.knn_temperature, "linear_l2": args.l2,
                         "min_purity": args.min_purity, "include_background": args.include_background}}


def read_label_csv(path: pathlib.Path) -> list[tuple[str, str, str | None]]:
    """(volume id or path, label, split or None) rows of a --labels CSV (header optional)."""
    rows = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            if not row or not "".join(row).strip():
                continue
            if line_no == 1 and [c.strip().lower() for c in row[:2]] in (["volume", "label"], ["id", "label"],
                                                                         ["path", "label"]):
                continue
            if len(row) < 2 or not row[1].strip():
                raise ValueError(f"{path}:{line_no}: expected 'volume id or path,label[,split]', got {row}")
            rows.append((row[0].strip(), row[1].strip(), row[2].strip() if len(row) > 2 and row[2].strip() else None))
    if not rows:
        raise ValueError(f"{path}: no labelled rows")
    return rows


def _volume_inputs(name: str, args: argparse.Namespace, patch_size: int, line: str) -> np.ndarray:
    """Model inputs of one CSV row: a volume of --dataset by id, else an image file or DICOM folder."""
    from flexict_jax import embed
    from flexict_jax.data import volume_store

    preprocessing = embed.Preprocessing.preset(args.kind)
    if args.dataset is not None:
        entries = {e["id"]: e for e in volume_store.read_manifest(args.dataset)}
        if name in entries:
            hu = volume_store.open_volume(args.dataset / entries[name]["path"]).read().result().astype(np.float32)
            if args.kind == "2d":
                return embed.slices_2d(hu, np.eye(4), preprocessing, patch_size,
                                       range(0, len(hu), args.slice_step))[0]
            return embed.volume_3d(hu, np.eye(4), preprocessing, patch_size)[0]
    path = pathlib.Path(name)
    if not path.exists():
        where = f" nor a volume id of {args.dataset}" if args.dataset is not None else " (and no --dataset given)"
        raise ValueError(f"{line}: {name!r} is neither an image file / DICOM folder{where}")
    inputs, _ = embed.prepare(path, args.kind, preprocessing, patch_size, None)
    return inputs[::args.slice_step] if args.kind == "2d" else inputs


def run_classify(args: argparse.Namespace) -> dict[str, Any]:
    from flexict_jax import embed
    from flexict_jax.evals import features, probes
    from flexict_jax.progress import Progress

    if args.labels is None:
        raise ValueError("--task=classify needs --labels=CSV (volume id or path, label[, split])")
    loaded = features.load_encoder(args.checkpoint, args.step, args.kind, random_init=args.random_init,
                                     seed=args.init_seed)
    patch_size = args.patch_size or loaded.arch.base_patch_size
    rows = read_label_csv(args.labels)
    class_of = {name: i for i, name in enumerate(sorted({label for _, label, _ in rows}))}
    names = {i: name for name, i in class_of.items()}
    progress = Progress(len(rows), "evaluate: volumes")
    cls = []
    for line_no, (name, _, _) in enumerate(rows, start=1):
        inputs = _volume_inputs(name, args, patch_size, f"{args.labels} row {line_no}")
        c, _ = embed.encode(loaded.model, inputs, patch_size, args.batch_size)
        cls.append(c.mean(axis=0))  # 2d: the volume is the mean of its slices' CLS tokens
        progress.advance(1, name)
    progress.close()
    x = np.stack(cls)
    y = np.asarray([class_of[label] for _, label, _ in rows])
    splits = [s for _, _, s in rows]
    rng = np.random.default_rng(args.seed)
    if all(s is not None for s in splits):
        test = np.asarray([s.lower() in ("test", "val", "validation") for s in splits])
        how = "split column of the CSV"
    else:  # stratified: test_fraction of every class, at least one per side when it has two examples
        test = np.zeros(len(y), bool)
        for c in np.unique(y):
            members = rng.permutation(np.flatnonzero(y == c))
            test[members[:min(len(members) - 1, round(args.test_fraction * len(members)))]] = True
        how = f"seeded stratified draw ({args.test_fraction:g} of every class to test)"
    train_idx = np.flatnonzero(~test)
    sweep = {}
    for fraction in args.fractions:
        chosen = []
        for c in np.unique(y[train_idx]):  # at least one example per class, as a few-shot sweep needs
            members = rng.permutation(train_idx[y[train_idx] == c])
            chosen += members[:max(1, round(fraction * len(members)))].tolist()
        chosen = np.asarray(sorted(chosen))
        sweep[f"{fraction:g}"] = probes.run_probes(x[chosen], y[chosen], x[test], y[test], names, k=args.knn_k,
                                                   temperature=args.knn_temperature, l2=args.l2)
    full = sweep[f"{max(args.fractions):g}"]
    return {"task": "classify", **_identity(args, loaded), "patch_size": patch_size, "labels": str(args.labels),
            "split": how, "knn": full.get("knn"), "linear": full.get("linear"), "chance": full["chance"],
            "n_train": full["n_train"], "n_test": full["n_test"], "fractions": sweep}


def run_retrieval(args: argparse.Namespace) -> dict[str, Any]:
    """The stage-3 evaluator (one implementation with the trainer's) on a saved checkpoint's student."""
    import jax
    import ml_collections as mlc
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from flexict_jax import checkpointing, sharding, tasks
    from flexict_jax.evals import stage3

    if args.reports is None:
        raise ValueError("--task=retrieval needs --reports=DIR (from `python -m data_prep.reports`)")
    params, step, meta = checkpointing.read_subtree(args.checkpoint, "params", args.step)
    config = mlc.ConfigDict(meta.get("config", {}))
    if config.get("task") != "align":
        raise ValueError(f"{args.checkpoint}: a {meta.get('stage')!r} checkpoint; --task=retrieval needs a stage-3 "
                         f"(configs/stage3.py) run")
    config.data.dir = str(args.reports)
    if args.split is not None:
        config.eval.split = args.split
    config.eval.batch_size = jax.device_count() * max(1, args.batch_size // jax.device_count())
    if args.patch_size:
        config.eval.patch_size = args.patch_size
    mesh = sharding.make_mesh((1, -1, 1))
    with sharding.activate(mesh, config.sharding_rules):
        abstract = nnx.eval_shape(lambda: tasks.get(config).build_model(config, config.seed))
        graphdef, abstract_params = nnx.split(abstract)
        program = _EvalProgram(mesh, graphdef, abstract_params)
        evaluator = stage3.Stage3Evaluator(config, program)
        params = jax.device_put(checkpointing.conform(params, nnx.to_pure_dict(abstract_params), what="params"),
                                NamedSharding(mesh, P()))
        images, reports = evaluator.embeddings(params)
        metrics = evaluator.metrics(params, images, reports)
    if args.out is not None:
        from flexict_jax import visualize
        written = visualize.retrieval_examples(evaluator, images, reports, args.out, count=args.examples)
        print(f"evaluate: retrieval examples -> {', '.join(map(str, written))}", file=sys.stderr)
    return {"task": "retrieval", "checkpoint": f"{args.checkpoint} step {step}", "step": step,
            "reports": str(args.reports), "split": str(config.eval.split), "patch_size": int(config.eval.patch_size),
            "n_test": evaluator.n_examples, "chance": {"recall@1": 1 / evaluator.n_examples},
            "metrics": {k.removeprefix("eval/"): v for k, v in metrics.items()}}


class _EvalProgram:
    """What `Stage3Evaluator` reads of the trainer's Program: the mesh and the abstract model."""

    def __init__(self, mesh, graphdef, abstract_params):
        self.mesh, self.graphdef, self.abstract_params = mesh, graphdef, abstract_params


def results_markdown(result: dict[str, Any]) -> str:
    """A short table of a results.json."""
    lines = [f"# {result['task']}: {result.get('checkpoint')}", ""]
    if result["task"] == "retrieval":
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                  for k, v in result["metrics"].items()]
        lines += ["", f"{result['n_test']} examples of split {result['split']!r}; chance Recall@1 = "
                      f"{result['chance']['recall@1']:.3g}"]
        return "\n".join(lines) + "\n"
    lines += [f"{result['split']}; {result['n_train']} train / {result['n_test']} test examples, "
              f"{len(result.get('classes', []))} classes, chance (balanced accuracy) {result['chance']:.3f}", ""]
    lines += ["| probe | balanced accuracy | macro-F1 |", "|---|---|---|"]
    for probe in ("knn", "linear"):
        if result.get(probe):
            lines.append(f"| {probe} | {result[probe]['balanced_accuracy']:.3f} | {result[probe]['macro_f1']:.3f} |")
    if result.get("random_init_baselines"):
        lines += ["", baseline_table(result).rstrip("\n")]
    if result["task"] == "classify":
        lines += ["", "| training fraction | kNN balanced acc. | linear balanced acc. | n_train |", "|---|---|---|---|"]
        for fraction, r in result["fractions"].items():
            lines.append(f"| {fraction} | {r['knn']['balanced_accuracy']:.3f} | "
                         f"{r['linear']['balanced_accuracy']:.3f} | {r['n_train']} |")
    if result.get("knn"):
        lines += ["", "| class | kNN recall | linear recall |", "|---|---|---|"]
        for name, recall in result["knn"]["per_class"].items():
            lines.append(f"| {name} | {recall:.3f} | {result['linear']['per_class'][name]:.3f} |")
    if result.get("dropped_classes"):
        lines += ["", f"Not scored (absent from one side of the split): {', '.join(result['dropped_classes'])}"]
    return "\n".join(lines) + "\n"


def baseline_table(result: dict[str, Any]) -> str:
    """The checkpoint's balanced accuracies beside its random-init baselines', one row per model."""
    rows = [(str(result['checkpoint']), result)]
    rows += [(f"random init, seed {b['init_seed']}", b) for b in result["random_init_baselines"]]
    lines = ["| model | kNN balanced acc. | linear balanced acc. |", "|---|---|---|"]
    lines += [f"| {name} | {r['knn']['balanced_accuracy']:.3f} | {r['linear']['balanced_accuracy']:.3f} |"
              for name, r in rows]
    lines.append(f"| chance | {result['chance']:.3f} | {result['chance']:.3f} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flexict_jax.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=pathlib.Path,
                        help="training/imported workdir, .pth file or safetensors export folder")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step of a workdir (default: latest)")
    parser.add_argument("--kind", choices=("2d", "3d"), default="3d", help="2d: axial slices; 3d: volumes")
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--out", required=True, type=pathlib.Path, help="output folder (results.json, results.md)")
    parser.add_argument("--patch-size", type=int, default=None, help="runtime patch size (default: the model's)")
    parser.add_argument("--random-init", action="store_true",
                        help="evaluate the checkpoint's architecture at random init (a workdir's config) instead")
    parser.add_argument("--dataset", type=pathlib.Path, default=None, help="ingested dataset (organs, classify)")
    parser.add_argument("--classes", default=None, help="organs: CSV 'index,name,...' of the label values")
    parser.add_argument("--labels", type=pathlib.Path, default=None,
                        help="classify: CSV 'volume id or path,label[,split]'")
    parser.add_argument("--fractions", default="0.01,0.1,1.0",
                        help="classify: training fractions to sweep (default %(default)s)")
    parser.add_argument("--reports", type=pathlib.Path, default=None, help="retrieval: reports dir")
    parser.add_argument("--split", default=None, help="retrieval: reports split (default: the run's eval.split)")
    parser.add_argument("--examples", type=int, default=4, help="retrieval: example PNGs to write")
    parser.add_argument("--crop", type=int, default=64, help="3d organs: cube size the volume is tiled into")
    parser.add_argument("--max-slices", type=int, default=None, help="2d organs: labelled slices per volume")
    parser.add_argument("--slice-step", type=int, default=4, help="2d classify: every n-th axial slice")
    parser.add_argument("--include-background", action="store_true", help="organs: score label 0 as a class")
    parser.add_argument("--min-purity", type=float, default=0.5,
                        help="organs: least fraction of a token's voxels its majority label must cover")
    parser.add_argument("--test-fraction", type=float, default=0.5, help="share of subjects (rows) tested")
    parser.add_argument("--slab-mm", type=float, default=32.0, help="organs, one subject: z-slab thickness")
    parser.add_argument("--knn-k", type=int, default=20)
    parser.add_argument("--knn-temperature", type=float, default=0.07)
    parser.add_argument("--l2", type=float, default=1e-3, help="linear probe L2 weight (standardised features)")
    parser.add_argument("--batch-size", type=int, default=8, help="inputs per forward pass")
    parser.add_argument("--seed", type=int, default=0, help="split and subsampling seed")
    parser.add_argument("--random-init-baselines", type=int, default=0, metavar="N",
                        help="organs: also score N random inits (seeds 0..N-1) of the workdir's architecture on the "
                             "same tokens and split, and print them beside the checkpoint")
    parser.add_argument("--init-seed", type=int, default=0,
                        help="--random-init: the init's seed (the split keeps --seed, so seeds compare the same "
                             "tokens)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        fractions = sorted(float(f) for f in args.fractions.split(","))
    except ValueError:
        fractions = []
    if not fractions or not all(0 < f <= 1 for f in fractions):
        print(f"evaluate: error: --fractions {args.fractions!r}: expected numbers in (0, 1], e.g. 0.01,0.1,1.0",
              file=sys.stderr)
        return 1
    args.fractions = fractions
    runners = {"organs": run_organs, "classify": run_classify, "retrieval": run_retrieval}
    from flexict_jax.imaging.readers import SourceError
    try:
        result = runners[args.task](args)
    except (ValueError, KeyError, OSError, SourceError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "results.md").write_text(results_markdown(result))
    summary = (f"recall@1 {result['metrics'].get('recall@1', float('nan')):.3f}" if args.task == "retrieval" else
               f"kNN balanced accuracy {result['knn']['balanced_accuracy']:.3f}, linear "
               f"{result['linear']['balanced_accuracy']:.3f} (chance {result['chance']:.3f})")
    print(f"evaluate: {summary} -> {args.out / 'results.json'}")
    if result.get("random_init_baselines"):
        print(baseline_table(result), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
