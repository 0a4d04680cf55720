"""Frozen-feature evaluation (probes, organ tokens, evaluate CLI), pictures, and the in-training organ monitor."""
from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from matplotlib import image as mpimg
from run_utils import cli_overrides, run_cli, xla_env

from data_prep import ingest, synthetic
from flexict_jax import evaluate, export, torch_format, visualize
from flexict_jax.data import volume_store
from flexict_jax.evals import features, probes
from flexict_jax.models.vit import VisionTransformer

ARCH = torch_format.Architecture(dim=48, depth=2, num_heads=2)
REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> pathlib.Path:
    """Four synthetic phantoms with known labels (four subjects), ingested at 6 mm."""
    root = tmp_path_factory.mktemp("phantoms")
    synthetic.main(["--output", str(root / "raw"), "--count", "4", "--seed", "1"])
    assert run_cli(ingest.main, ["--input", str(root / "raw"), "--output", str(root / "ds"),
                                 "--spacing", "6,6,6"]) == 0
    return root / "ds"


@pytest.fixture(scope="module")
def real_labelled(tmp_path_factory, ct_dir) -> pathlib.Path:
    """The two real CTs with TotalSegmentator label maps (two subjects), ingested at 3 mm."""
    root = tmp_path_factory.mktemp("real_labelled") / "ds"
    inputs = [str(ct_dir / n) for n in ("ts_example_ct_sm.nii.gz", "ts_torso_20.nii.gz")]
    assert run_cli(ingest.main, ["--input", *inputs, "--output", str(root), "--spacing", "3,3,3"]) == 0
    return root


def _export(tmp_path_factory, kind: str) -> pathlib.Path:
    model = VisionTransformer(**ARCH.to_config(), layerscale_init=0.5, rngs=nnx.Rngs(7))
    backbone = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
    out = tmp_path_factory.mktemp("export") / f"tiny_{kind}"
    config = export.safetensors_config(ARCH, kind=kind, rope_bf16=False, meta={}, source={"test": "random init"})
    export.write_safetensors(torch_format.backbone_to_torch(backbone, ARCH, rope_bf16=False), config, out)
    return out


@pytest.fixture(scope="module")
def export_2d(tmp_path_factory) -> pathlib.Path:
    return _export(tmp_path_factory, "2d")


@pytest.fixture(scope="module")
def export_3d(tmp_path_factory) -> pathlib.Path:
    return _export(tmp_path_factory, "3d")


# --- probes ------------------------------------------------------------------------------------------------

def test_trivial_features_give_perfect_probes_and_random_ones_chance(phantoms):
    organ = features.organ_inputs(phantoms, "2d", 8)
    rng = np.random.default_rng(0)
    labels = np.maximum(organ.token_labels, 0)
    onehot = rng.normal(size=labels.shape + (32,)).astype(np.float32) * 0.1
    np.put_along_axis(onehot, labels[..., None], 3.0, axis=-1)  # the feature encodes the label
    x, y, rows, z = features.labelled_tokens(onehot, organ)
    split = features.split_tokens(organ, rows, z)
    names = features.class_names(phantoms, organ.volumes, None, np.unique(y))
    assert names[6] == "liver"  # labels.json beside the phantoms
    trivial = probes.run_probes(x[split.train], y[split.train], x[split.test], y[split.test], names)
    assert trivial["knn"]["balanced_accuracy"] == 1.0 and trivial["linear"]["balanced_accuracy"] == 1.0
    assert trivial["knn"]["macro_f1"] == 1.0 and set(trivial["knn"]["per_class"]) == set(trivial["classes"])
    noise = rng.normal(size=x.shape).astype(np.float32)
    random = probes.run_probes(noise[split.train], y[split.train], noise[split.test], y[split.test], names)
    for probe in ("knn", "linear"):
        assert abs(random[probe]["balanced_accuracy"] - random["chance"]) < 0.1, random[probe]
    assert random["chance"] == pytest.approx(1 / len(random["classes"]))


def test_subject_split_never_leaks(phantoms):
    organ = features.organ_inputs(phantoms, "2d", 8)
    used = organ.token_labels >= 0
    rows = np.broadcast_to(np.arange(len(organ.inputs))[:, None], used.shape)[used]
    subjects = organ.subjects()[rows]
    for seed in range(4):
        split = features.split_tokens(organ, rows, organ.token_z_mm[used], seed=seed)
        assert not set(subjects[split.train]) & set(subjects[split.test])
        assert split.train.any() and split.test.any() and (split.train ^ split.test).all()
    # One subject: alternating slabs along z, each slab wholly on one side.
    z = np.arange(0, 200, 3.0)
    test = probes.slab_split(z, 32.0)
    assert test.any() and (~test).any()
    assert all(len(set(test[(z // 32) == s])) == 1 for s in np.unique(z // 32))


def test_knn_votes_are_temperature_weighted():
    train = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    labels = np.array([0, 1, 1])
    query = np.array([[1.0, 0.05]])
    # Two votes for class 1 at cos ~0.05 lose to one vote for class 0 at cos ~1 when T is small ...
    assert probes.knn_predict(train, labels, query, 2, k=3, temperature=0.07)[0] == 0
    # ... and win when the weights flatten out.
    assert probes.knn_predict(train, labels, query, 2, k=3, temperature=100.0)[0] == 1


# --- evaluate CLI --------------------------------------------------------------------------------------------

def _evaluate(argv, capsys) -> tuple[int, str]:
    code = run_cli(evaluate.main, argv)
    return code, capsys.readouterr().err


def test_organ_probe_on_real_ct_with_totalsegmentator_labels(real_labelled, export_2d, ct_dir, tmp_path, capsys):
    out = tmp_path / "organs"
    code, err = _evaluate(["--checkpoint", str(export_2d), "--kind", "2d", "--task", "organs", "--dataset",
                           str(real_labelled), "--classes", str(ct_dir / "ts_total_classes.csv"), "--out", str(out),
                           "--patch-size", "8"], capsys)
    assert code == 0, err
    assert "ETA" in err and "subject split" in err
    result = json.loads((out / "results.json").read_text())
    for probe in ("knn", "linear"):
        assert set(result[probe]) >= {"balanced_accuracy", "macro_f1", "per_class"}
        assert 0 <= result[probe]["balanced_accuracy"] <= 1
    assert {"liver", "spleen", "stomach"} <= set(result["classes"])
    assert result["chance"] == pytest.approx(1 / len(result["classes"]))
    assert result["n_train"] > 100 and result["n_test"] > 100
    assert result["checkpoint"] == str(export_2d) and result["checkpoint_kind"] == "2d"
    assert "kNN recall" in (out / "results.md").read_text()


def test_random_init_baselines_share_the_checkpoints_tokens_and_split(phantoms, export_2d, tmp_path, capsys,
                                                                      monkeypatch):
    """--random-init-baselines scores each init on the checkpoint's own tokens and subject split: a "random init"
    that is the checkpoint itself scores exactly as the checkpoint, another init differs; both are printed."""
    load = features.load_encoder

    def fake_init(checkpoint, step, kind, *, random_init=False, seed=0):
        loaded = load(checkpoint, step, kind)
        if not random_init or seed == 0:  # seed 0: the checkpoint's own weights, for the identity check
            return loaded
        model = VisionTransformer(**ARCH.to_config(), layerscale_init=0.5, rngs=nnx.Rngs(100 + seed))
        return dataclasses.replace(loaded, model=model, source=f"random init (seed {seed})", step=0)

    monkeypatch.setattr(features, "load_encoder", fake_init)
    out = tmp_path / "baselines"
    code = run_cli(evaluate.main, ["--checkpoint", str(export_2d), "--kind", "2d", "--task", "organs", "--dataset",
                                   str(phantoms), "--out", str(out), "--patch-size", "8", "--seed", "3",
                                   "--random-init-baselines", "2"])
    printed = capsys.readouterr().out
    assert code == 0
    result = json.loads((out / "results.json").read_text())
    same, other = result["random_init_baselines"]
    assert (same["init_seed"], other["init_seed"]) == (0, 1)
    for probe in ("knn", "linear"):
        assert same[probe] == result[probe]
    assert other["knn"] != result["knn"]
    assert "random init, seed 1" in printed and "random init, seed 1" in (out / "results.md").read_text()


def test_clear_one_line_errors(real_labelled, export_2d, ct_dir, tmp_path, capsys):
    def error(argv) -> str:
        code, err = _evaluate(argv + ["--out", str(tmp_path / "out")], capsys)
        assert code == 1
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("evaluate: error: "), err
        return lines[0]

    base = ["--checkpoint", str(export_2d), "--task", "organs"]
    # A 2D checkpoint used as 3D.
    assert "2-D checkpoint" in error(base + ["--kind", "3d", "--dataset", str(real_labelled)])
    # A dataset without label maps.
    unlabelled = tmp_path / "unlabelled"
    assert run_cli(ingest.main, ["--input", str(ct_dir / "vtk_headsq.nii.gz"), "--output", str(unlabelled),
                                 "--spacing", "6,6,6"]) == 0
    capsys.readouterr()  # the ingest's own progress lines
    assert "has a label map" in error(base + ["--kind", "2d", "--dataset", str(unlabelled)])
    # A class CSV that does not name the label values.
    classes = tmp_path / "classes.csv"
    classes.write_text("index,name\n0,background\n1,spleen\n")
    message = error(base + ["--kind", "2d", "--dataset", str(real_labelled), "--classes", str(classes)])
    assert str(classes) in message and "no name for label value" in message
    # A label map on another grid than its volume.
    broken = tmp_path / "broken"
    shutil.copytree(real_labelled, broken)
    entry = volume_store.read_manifest(broken)[0]
    shutil.rmtree(broken / entry["label_path"])
    volume_store.write_volume(broken / entry["label_path"], np.zeros((3, 4, 5), np.uint8), {})
    message = error(base + ["--kind", "2d", "--dataset", str(broken)])
    assert "label map grid (3, 4, 5) differs" in message and entry["label_path"] in message


def test_classify_sweeps_training_fractions(phantoms, export_3d, tmp_path, capsys):
    entries = volume_store.read_manifest(phantoms)
    labels = tmp_path / "labels.csv"
    rows = [f"{e['id']},{'even' if i % 2 == 0 else 'odd'},{'test' if i >= 2 else 'train'}"
            for i, e in enumerate(entries)]
    labels.write_text("volume,label,split\n" + "\n".join(rows) + "\n")
    out = tmp_path / "classify"
    code, err = _evaluate(["--checkpoint", str(export_3d), "--kind", "3d", "--task", "classify", "--labels",
                           str(labels), "--dataset", str(phantoms), "--fractions", "0.5,1.0", "--out", str(out),
                           "--patch-size", "16"], capsys)
    assert code == 0, err
    result = json.loads((out / "results.json").read_text())
    assert set(result["fractions"]) == {"0.5", "1"} and result["split"] == "split column of the CSV"
    assert result["n_train"] == 2 and result["n_test"] == 2 and result["chance"] == 0.5
    assert result["fractions"]["0.5"]["n_train"] == 2  # at least one example per class
    assert "training fraction" in (out / "results.md").read_text()
    labels.write_text("volume,label\nnope,y\n" + "\n".join(f"{e['id']},x" for e in entries) + "\n")
    code, err = _evaluate(["--checkpoint", str(export_3d), "--task", "classify", "--labels", str(labels),
                           "--dataset", str(phantoms), "--out", str(out)], capsys)
    assert code == 1 and "'nope' is neither an image file" in err


# --- pictures ------------------------------------------------------------------------------------------------

def _png_size(path: pathlib.Path) -> tuple[int, int]:
    assert path.stat().st_size > 1000
    height, width = mpimg.imread(path).shape[:2]
    return width, height


def test_feature_pictures_are_written_at_the_stated_size(export_2d, ct_dir, tmp_path):
    out = tmp_path / "pictures"
    assert run_cli(visualize.main, ["features", "--checkpoint", str(export_2d), "--kind", "2d", "--input",
                                    str(ct_dir / "ts_example_ct_sm.nii.gz"), "--out", str(out),
                                    "--patch-size", "16", "--query", "15,100,120"]) == 0
    for plane in visualize.PLANES:
        assert _png_size(out / f"pca_{plane}.png") == (800, 400)
    assert _png_size(out / "similarity_0.png") == (1200, 400)
    assert not (out / "similarity_1.png").exists()


def test_curves_deduplicate_resumed_steps(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": 10, "loss": 5.0, "lr": 1e-4}, {"step": 20, "loss": 4.0, "lr": 2e-4},
            {"step": 20, "loss": 3.5, "lr": 2e-4},  # resumed from step 10: step 20 logged again
            {"step": 20, "eval/knn_balanced_accuracy": 0.4}, {"step": 30, "loss": "nan", "lr": 3e-4}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "config.json").write_text(json.dumps({"heads": {"num_prototypes": 128}}))
    records = visualize.read_metrics(run)
    assert [r["step"] for r in records] == [10, 20, 30]
    assert records[1]["loss"] == 3.5 and records[1]["eval/knn_balanced_accuracy"] == 0.4
    assert run_cli(visualize.main, ["curves", "--workdir", str(run), "--out", str(tmp_path / "pictures")]) == 0
    assert _png_size(tmp_path / "pictures" / "curves.png") == (1500, 450)


# --- in-training monitor -----------------------------------------------------------------------------------

def _monitor_metric(config, mesh_shape, devices) -> dict:
    from flexict_jax import evals, sharding, train_step

    mesh = sharding.make_mesh(mesh_shape, devices)
    with sharding.activate(mesh, config.sharding_rules):
        program = train_step.build_program(config, mesh)
        state = jax.jit(program.init_state, out_shardings=program.state_shardings)()
        monitor = evals.organ_monitor(config, program)
        return monitor(state)


@pytest.mark.slow
def test_monitor_on_a_2x4_mesh_equals_one_device(real_labelled, real_ct_volumes):
    from run_utils import config_with

    from configs import stage2

    config = config_with(stage2.get_config, "tiny", real_ct_volumes, **{
        "eval.every_steps": 2, "eval.dataset": str(real_labelled), "eval.patch_size": 8, "eval.crop": 32,
        "eval.batch_size": 8, "model.layerscale_init": 0.5})
    eight = _monitor_metric(config, (2, 4, 1), jax.devices())
    one = _monitor_metric(config, (1, 1, 1), jax.devices()[:1])
    assert 0 < eight["eval/knn_balanced_accuracy"] <= 1
    assert eight["eval/knn_balanced_accuracy"] == pytest.approx(one["eval/knn_balanced_accuracy"], abs=1e-6)
    assert eight["eval/knn_chance"] == one["eval/knn_chance"]


def test_monitor_is_off_in_recipe_configs_and_on_in_demo():
    from configs import stage1, stage2
    for module in (stage1, stage2):
        assert module.get_config().eval.every_steps == 0
        assert module.get_config("demo").eval.every_steps > 0


@pytest.mark.slow
def test_retrieval_cli_reuses_the_stage3_evaluator_and_writes_examples(tmp_path):
    """A 2-step tiny stage-3 run on phantom pseudo-reports, then `evaluate --task=retrieval`, both through their
    CLIs on one device as users run them (stage-3 compiles on 8 fake devices are slow, see test_stage3): Recall@K,
    zero-shot counts instead of NaN, and example PNGs."""
    from data_prep import reports, tokenizer, volume_stats

    synthetic.main(["--output", str(tmp_path / "raw"), "--count", "8", "--seed", "0"])
    assert run_cli(ingest.main, ["--input", str(tmp_path / "raw"), "--output", str(tmp_path / "ds"),
                                 "--spacing", "8,8,8", "--split", "train"]) == 0
    assert run_cli(volume_stats.main, ["--dataset", str(tmp_path / "ds")]) == 0
    assert run_cli(reports.main, ["--dataset", str(tmp_path / "ds"), "--output", str(tmp_path / "reports")]) == 0
    assert run_cli(tokenizer.main, ["--corpus", str(tmp_path / "reports"), "--vocab-size", "300"]) == 0
    overrides = {"total_steps": 2, "patch_sizes": "(16,)", "patch_size_probs": "(1.0,)", "data.n_local_crops": 1,
                 "eval.split": "train", "eval.every_steps": 2, "eval.patch_size": 16, "mesh": "(1,1,1)"}
    env = xla_env(1)
    out = tmp_path / "eval"
    for argv in (["-m", "flexict_jax.train", f"--config={REPO / 'configs/stage3.py'}:tiny",
                  f"--workdir={tmp_path / 'stage3'}", f"--config.data.dir={tmp_path / 'reports'}"]
                 + cli_overrides(overrides),
                 ["-m", "flexict_jax.evaluate", f"--checkpoint={tmp_path / 'stage3'}", "--task=retrieval",
                  f"--reports={tmp_path / 'reports'}", f"--out={out}", "--examples=2"]):
        proc = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    metrics = result["metrics"]
    assert result["n_test"] == 8 and 0 <= metrics["recall@1"] <= 1 and metrics["recall@10"] == 1.0
    assert "nan" not in (out / "results.json").read_text().lower()
    assert metrics["zero_shot_findings_scored"] + metrics["zero_shot_findings_single_class"] > 0
    assert _png_size(out / "retrieval_0.png") == (1400, 450) and (out / "retrieval_1.png").is_file()
