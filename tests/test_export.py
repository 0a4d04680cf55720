"""Export of a real (tiny) stage-1 run to the upstream .pth payload and to safetensors, and import back; a tiny
released-style VLM imported, continued in stage 3 and exported again.

The run trains the tiny config for two steps on slices of synthetic phantoms (seconds), so the exported
teacher and student are real training outputs with both checkpoint steps on disk.
"""
from __future__ import annotations

import json
import pathlib

import jax
import ml_dtypes
import numpy as np
import pytest
from run_utils import ONE_VARIANT, config_with, metrics, run_cli, saved_state

from configs import stage1, stage3
from data_prep import ingest, slices, synthetic
from flexict_jax import checkpointing, embed, export, handoff, import_torch, sharding, torch_format, train_step, trainer
from flexict_jax.errors import ConfigError
from flexict_jax.imaging.readers import file_sha256

torch = pytest.importorskip("torch")
from run_utils import QWEN3_TINY, last_bf16_bit_flipped  # noqa: E402

from flexict_jax import torch_reference  # noqa: E402  (imports torch)

pytestmark = pytest.mark.slow  # end to end: trains real runs (the fast loop is `pytest -m "not slow"`)

TINY_ARCH = dict(dim=48, depth=2, num_heads=2)
PHANTOM_LICENCE = "CC0-1.0 (synthetic phantoms)"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> pathlib.Path:
    """A stage-1 workdir with checkpoints at steps 1 and 2."""
    root = tmp_path_factory.mktemp("stage1_phantoms")
    synthetic.write_phantoms(root / "raw", count=2, seed=3, shape=(16, 48, 48), progress=False)
    assert ingest.main(["--input", str(root / "raw"), "--output", str(root / "dataset"), "--spacing", "native",
                        "--licence", PHANTOM_LICENCE]) == 0
    assert slices.main(["--dataset", str(root / "dataset"), "--output", str(root / "slices"), "--size", "64"]) == 0
    config = stage1.get_config("tiny")
    config.data.dir = str(root / "slices")
    config.total_steps = 2
    config.ckpt.every_steps = 1
    workdir = root / "run"
    assert trainer.train(config, str(workdir)) == 0
    assert checkpointing.latest_step(workdir) == 2
    teacher, _, _ = checkpointing.read_subtree(workdir, "teacher")
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(teacher)), "the tiny run diverged"
    return workdir


@pytest.fixture(scope="module")
def pth(run, tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("pth") / "FlexiCT_tiny.pth"
    assert run_cli(export.main, ["--workdir", str(run), "--kind", "2d", "--format", "flexict", "--out", str(out),
                                 "--allow-custom-architecture"]) == 0
    return out


def _leaves(tree) -> dict[str, np.ndarray]:
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _assert_trees_equal(a, b, what: str = "") -> None:
    """Same leaf paths (string and int block keys alike), bit-identical values."""
    a, b = _leaves(a), _leaves(b)
    assert sorted(a) == sorted(b), what
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=f"{what} {key}")


def _cls_and_patch(model, x: np.ndarray, patch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    return embed.encode(model, x, patch_size, batch_size=len(x))


def _assert_close(a: np.ndarray, b: np.ndarray, max_abs: float = 1e-3, min_cos: float = 0.99999) -> None:
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    assert np.abs(a - b).max() <= max_abs and cos.min() >= min_cos, (np.abs(a - b).max(), cos.min())


# --- --format=flexict -----------------------------------------------------------------------------------------

def test_upstream_format_refuses_sizes_the_wrappers_cannot_build(run, tmp_path, capsys):
    out = tmp_path / "model.pth"
    assert run_cli(export.main, ["--workdir", str(run), "--kind", "2d", "--format", "flexict", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "upstream FlexiCT wrappers cannot build" in err and "dim=48 (upstream builds 864)" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_pth_payload_keys_dtypes_and_periods(run, pth):
    payload = torch.load(pth, map_location="cpu", weights_only=True)
    assert set(payload) == {"teacher", "iteration"} and payload["iteration"] == 2
    teacher = payload["teacher"]
    backbone = [k for k in teacher if k.startswith("backbone.")]
    assert len(backbone) == 9 + 13 * TINY_ARCH["depth"] + 2
    assert {k.split(".")[0] for k in teacher} == {"backbone", "dino_head", "ibot_head"}
    assert all(isinstance(v, torch.Tensor) and v.is_contiguous() for v in teacher.values())
    periods = {k: v for k, v in teacher.items() if k.endswith("periods")}
    assert {k: v.dtype for k, v in periods.items()} == {"backbone.rope_embed_2D.periods": torch.bfloat16,
                                                        "backbone.rope_embed_3D.periods": torch.bfloat16}
    assert all(v.dtype == torch.float32 for k, v in teacher.items() if k not in periods)
    # head_dim 24: the first 6 (2-D) / 4 (3-D) of upstream's bf16 list for head_dim 24 (base 100 ** (2j/12)).
    expected = torch_reference.RopeEmbedding(24, 2, 100.0, torch.bfloat16).periods
    assert torch.equal(teacher["backbone.rope_embed_2D.periods"], expected)
    # Values are the run's EMA teacher, bit for bit.
    saved, _, _ = checkpointing.read_subtree(run, "teacher")
    np.testing.assert_array_equal(teacher["backbone.blocks.1.mlp.fc1.weight"].numpy(),
                                  saved["backbone"]["blocks"]["1"]["mlp"]["fc1"]["kernel"].T)


def test_pth_loads_strictly_into_the_reference_and_matches_jax(run, pth):
    reference = torch_reference.load_pth(pth, **TINY_ARCH)  # load_state_dict(strict=True) inside
    assert not reference.training
    teacher, _, meta = checkpointing.read_subtree(run, "teacher")
    arch = torch_format.Architecture.from_config(meta["config"]["model"])
    x = np.random.default_rng(0).normal(size=(2, 32, 48)).astype(np.float32)
    with torch.no_grad():
        out = reference(torch.from_numpy(x)[:, None])
    theirs = out["cls_token"].numpy(), out["patch_tokens"].numpy()
    # Upstream runs bf16 RoPE: our model with the emulation matches it to the §6.4 tolerance ...
    emulated = _cls_and_patch(embed.backbone_module(arch, teacher["backbone"], rope_bf16=True), x)
    for ours, ref in zip(emulated, theirs):
        _assert_close(ours, ref)
    # ... and the run's own float32-RoPE model only to the loose one.
    trained = _cls_and_patch(embed.load_backbone(run).model, x)
    for ours, ref in zip(trained, theirs):
        _assert_close(ours, ref, max_abs=2e-2, min_cos=0.9999)


# --- --format=safetensors -------------------------------------------------------------------------------------

def test_safetensors_export_config_and_parity(run, tmp_path):
    out = tmp_path / "flexict_tiny_3d"
    assert run_cli(export.main, ["--workdir", str(run), "--kind", "3d", "--format", "safetensors",
                                 "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flexict_tiny_3d"]  # no temporary left
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == torch_format.Architecture(**TINY_ARCH).to_config()
    assert config["kind"] == "3d" and config["patch_size"]["base"] == 8 and config["patch_size"]["runtime"] == [8, 16]
    assert config["rope"]["dtype"] == "float32" and config["rope"]["base"] == 100.0  # what the run trained with
    assert config["preprocessing"] == {"kind": "3d", "spacing_mm": [2.0, 2.0, 2.0], "crop": 160,
                                       "orientation": "LPS", "hu_window": [-1000.0, 1000.0],
                                       "normalization": "zscore"}
    assert config["source"]["step"] == 2 and config["source"]["params"] == "teacher"
    reference, _ = torch_reference.load_safetensors(out)
    reference.set_patch_size(16)
    x = np.random.default_rng(1).normal(size=(1, 32, 32, 16)).astype(np.float32)
    with torch.no_grad():
        out_t = reference(torch.from_numpy(x)[:, None])
    ours = _cls_and_patch(embed.load_backbone(out).model, x, patch_size=16)
    for a, b in zip(ours, (out_t["cls_token"].numpy(), out_t["patch_tokens"].numpy())):
        _assert_close(a, b)


def test_from_pretrained_loads_the_export_strictly_and_the_card_names_the_licences(run, tmp_path):
    out = tmp_path / "export"
    assert run_cli(export.main, ["--workdir", str(run), "--kind", "3d", "--format", "safetensors",
                                 "--out", str(out)]) == 0
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {
        "README.md": 0o644, "config.json": 0o644, "model.safetensors": 0o644}
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "flexict" and config["architectures"] == ["FlexiCTModel"]
    card = (out / "README.md").read_text()
    for text in ("stage 1 (2D axial SSL", "step 2", "width 48, depth 2, 2 heads", "2 CT volumes",
                 f"licence {PHANTOM_LICENCE}: 2 volume(s)", "orientation LPS", "HU clamped to [-1000, 1000]",
                 "ras.permute(2, 1, 0).flip(1, 2)", "not a medical device"):
        assert text in card, text
    model = torch_reference.FlexiCTModel.from_pretrained(out)  # strict load_state_dict inside
    plain, _ = torch_reference.load_safetensors(out)
    assert not model.training and model.config == config and model.model_card == card
    x = torch.from_numpy(np.random.default_rng(2).normal(size=(1, 1, 16, 16, 16)).astype(np.float32))
    with torch.no_grad():
        np.testing.assert_array_equal(model(x)["cls_token"].numpy(), plain(x)["cls_token"].numpy())
    model.save_pretrained(tmp_path / "copy")
    again = torch_reference.FlexiCTModel.from_pretrained(tmp_path / "copy")
    assert again.config == config and again.model_card == card
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        torch_reference.FlexiCTModel.from_pretrained("ricklisz/FlexiCT")


def test_pth_export_has_its_card_beside_it(pth):
    card = export.card_path(pth)
    assert card.name == "FlexiCT_tiny.README.md" and f"licence {PHANTOM_LICENCE}" in card.read_text()
    assert pth.stat().st_mode & 0o777 == card.stat().st_mode & 0o777 == 0o644


def test_torch_reference_imports_without_jax():
    """The file stays copyable into a torch-only project: it imports no jax or flax."""
    import subprocess
    import sys
    code = ("import sys, importlib.util; sys.modules['jax'] = sys.modules['flax'] = None\n"
            f"spec = importlib.util.spec_from_file_location('torch_reference', {torch_reference.__file__!r})\n"
            "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
            "module.FlexiCTModel(dim=32, depth=1, num_heads=2)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --- options and errors ---------------------------------------------------------------------------------------

def test_random_init_baseline_of_a_training_workdir(run):
    """The probe's random-init baseline builds from the workdir's config.model, whose task-only keys
    (compute_dtype) the backbone does not take; each seed is a different init of the same architecture."""
    from flax import nnx

    from flexict_jax.evals import features

    trained = features.load_encoder(run, None, "2d")
    inits = [features.load_encoder(run, None, "2d", random_init=True, seed=s) for s in (0, 1)]
    assert all(i.arch == trained.arch and i.step == 0 and "random init" in i.source for i in inits)
    weights = [_leaves(nnx.to_pure_dict(nnx.state(m.model))) for m in (trained, *inits)]
    assert sorted(weights[0]) == sorted(weights[1]) == sorted(weights[2])
    for a, b in ((1, 2), (0, 1)):
        assert any(not np.array_equal(weights[a][k], weights[b][k]) for k in weights[a]), (a, b)


def test_student_and_step_select_what_is_exported(run, tmp_path):
    def backbone_of(*extra) -> dict[str, torch.Tensor]:
        out = tmp_path / f"{len(list(tmp_path.iterdir()))}.pth"
        assert run_cli(export.main, ["--workdir", str(run), "--kind", "2d", "--format", "flexict", "--out", str(out),
                                     "--allow-custom-architecture", *extra]) == 0
        return torch.load(out, weights_only=True)

    teacher, student, step1 = backbone_of(), backbone_of("--params", "student"), backbone_of("--step", "1")
    assert step1["iteration"] == 1
    key = "backbone.blocks.0.attn.qkv.weight"
    saved, _, _ = checkpointing.read_subtree(run, "params")
    np.testing.assert_array_equal(student["teacher"][key].numpy(),
                                  saved["backbone"]["blocks"]["0"]["attn"]["qkv"]["kernel"].T)
    assert not torch.equal(student["teacher"][key], teacher["teacher"][key])
    assert not torch.equal(step1["teacher"][key], teacher["teacher"][key])


def test_existing_output_is_kept_unless_overwrite(run, tmp_path, capsys):
    out = tmp_path / "model.pth"
    out.write_bytes(b"user data")
    argv = ["--workdir", str(run), "--kind", "2d", "--format", "flexict", "--out", str(out),
            "--allow-custom-architecture"]
    assert run_cli(export.main, argv) == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err and out.read_bytes() == b"user data"
    assert run_cli(export.main, argv + ["--overwrite"]) == 0
    assert "teacher" in torch.load(out, weights_only=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.README.md", "model.pth"]  # no temporary left


@pytest.mark.parametrize("argv,message", [
    (["--kind", "vlm", "--format", "flexict", "--params", "teacher"],
     "no 'vision_projection' in the parameters"),
    (["--kind", "2d", "--format", "flexict", "--params", "recipe-vlm"], "applies to --kind=vlm only"),
    (["--kind", "2d", "--format", "safetensors", "--step", "7"], "no checkpoint state"),
], ids=["vlm-of-stage1", "recipe-vlm-2d", "missing-step"])
def test_clear_errors(run, tmp_path, capsys, argv, message):
    assert run_cli(export.main, ["--workdir", str(run), "--out", str(tmp_path / "x"), *argv]) == 1
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_missing_workdir(tmp_path, capsys):
    assert run_cli(export.main, ["--workdir", str(tmp_path / "nope"), "--kind", "2d", "--format", "safetensors",
                                 "--out", str(tmp_path / "x")]) == 1
    assert "no checkpoint under" in capsys.readouterr().err


def test_help_describes_the_cli(capsys):
    for main in (export.main, import_torch.main):
        assert run_cli(main, ["--help"]) == 0
    assert "--allow-pickle" in capsys.readouterr().out


# --- import -----------------------------------------------------------------------------------------------------

def test_import_round_trip_is_bitwise_and_exports_again(run, pth, tmp_path):
    imported = tmp_path / "imported"
    assert run_cli(import_torch.main, ["--checkpoint", str(pth), "--kind", "2d", "--workdir", str(imported)]) == 0
    assert [p.name for p in (imported / "checkpoints").iterdir()] == ["0"]
    original, _, _ = checkpointing.read_subtree(run, "teacher")
    for name in ("teacher", "params"):  # both set to the file's teacher
        restored, step, meta = checkpointing.read_subtree(imported, name)
        assert step == 0
        a, b = _leaves(original), _leaves(restored)
        assert sorted(a) == sorted(b)
        for key in a:
            assert b[key].dtype == np.float32
            np.testing.assert_array_equal(b[key], a[key], err_msg=key)
    assert meta["stage"] == "imported" and meta["kind"] == "2d" and meta["source"] == str(pth.resolve())
    assert meta["source_sha256"] == file_sha256(pth) and meta["source_iteration"] == 2
    assert meta["config"]["model"] == {**torch_format.Architecture(**TINY_ARCH).to_config(), "rope_bf16": True}
    assert meta["config"]["heads"] == {"hidden_dim": 64, "bottleneck_dim": 32, "num_prototypes": 128}
    # Exported again, every tensor is the same.
    again = tmp_path / "again.pth"
    assert run_cli(export.main, ["--workdir", str(imported), "--kind", "2d", "--format", "flexict", "--out", str(again),
                                 "--allow-custom-architecture"]) == 0
    first, second = (torch.load(p, weights_only=True)["teacher"] for p in (pth, again))
    assert list(first) == list(second)
    assert all(torch.equal(first[k], second[k]) and first[k].dtype == second[k].dtype for k in first)
    # An imported backbone embeds like the file does under the reference (bf16 RoPE recorded in its meta).
    loaded = embed.load_backbone(imported)
    assert loaded.rope_bf16
    x = np.random.default_rng(2).normal(size=(1, 24, 32)).astype(np.float32)
    with torch.no_grad():
        out = torch_reference.load_pth(pth, **TINY_ARCH)(torch.from_numpy(x)[:, None])
    _assert_close(_cls_and_patch(loaded.model, x)[0], out["cls_token"].numpy())


def _handoff(config) -> tuple[dict, dict]:
    """The trainer's hand-off of `config` (its first state and record) on the config's mesh."""
    mesh = sharding.make_mesh(config.mesh)
    with sharding.activate(mesh, config.sharding_rules):
        state, record = handoff.handoff_state(config, train_step.build_program(config, mesh))
    return jax.device_get(state), record


def test_imported_workdir_is_a_training_hand_off_source(run, pth, tmp_path):
    """`--config.init.from_workdir=IMPORTED` (mode "continue") starts from the file's teacher and heads: the
    trainer's hand-off (no train step compiled: that part is the trainer's own tests)."""
    imported = tmp_path / "imported"
    import_torch.import_checkpoint(pth, kind="2d", workdir=imported)
    config = stage1.get_config("tiny")
    config.data.dir = str(run.parent / "slices")
    config.init.from_workdir, config.init.mode = str(imported), "continue"
    state, record = _handoff(config)
    assert record["from_stage"] == "imported" and record["step"] == 0
    source, _, _ = checkpointing.read_subtree(imported, "teacher")
    for name in ("params", "teacher"):
        _assert_trees_equal(state[name], source, name)


def test_import_backbone_only_file(run, pth, tmp_path):
    payload = torch.load(pth, weights_only=True)
    payload["teacher"] = {k: v for k, v in payload["teacher"].items() if k.startswith("backbone.")}
    path = tmp_path / "backbone_only.pth"
    torch.save(payload, path)
    meta = import_torch.import_checkpoint(path, kind="3d", workdir=tmp_path / "w")
    assert "heads" not in meta["config"] and meta["kind"] == "3d"
    restored, _, _ = checkpointing.read_subtree(tmp_path / "w", "teacher")
    assert list(restored) == ["backbone"]


def _drop_mask_token(teacher: dict) -> dict:
    return {k: v for k, v in teacher.items() if k != "backbone.mask_token"}


def _add_qkv_bias(teacher: dict) -> dict:
    return {**teacher, "backbone.blocks.0.attn.qkv.bias": torch.zeros(144)}


def _transpose_fc2(teacher: dict) -> dict:
    key = "backbone.blocks.0.mlp.fc2.weight"
    return {**teacher, key: teacher[key].T.clone()}


def _numpy_value(teacher: dict) -> dict:
    return {**teacher, "dino_head.mlp.0.bias": teacher["dino_head.mlp.0.bias"].numpy()}


@pytest.mark.parametrize("edit,extra,message", [
    (_drop_mask_token, [], "missing key backbone.mask_token"),
    (_add_qkv_bias, [], "unexpected key backbone.blocks.0.attn.qkv.bias"),
    (_transpose_fc2, [], "key backbone.blocks.0.mlp.fc2.weight has shape (192, 48), expected (48, 192)"),
    (_numpy_value, [], "pass --allow-pickle"),
    (_numpy_value, ["--allow-pickle"], "key dino_head.mlp.0.bias holds a ndarray, not a torch.Tensor"),
    (None, [], "no 'teacher' entry"),
], ids=["missing-key", "extra-key", "wrong-shape", "numpy-value", "numpy-value-pickle", "no-teacher"])
def test_bad_files_name_the_first_offending_key(pth, tmp_path, capsys, edit, extra, message):
    payload = torch.load(pth, weights_only=True)
    payload = {"student": payload["teacher"]} if edit is None else {**payload, "teacher": edit(payload["teacher"])}
    path = tmp_path / "bad.pth"
    torch.save(payload, path)
    workdir = tmp_path / "w"
    assert run_cli(import_torch.main, ["--checkpoint", str(path), "--kind", "2d", "--workdir", str(workdir),
                                       *extra]) == 1
    err = capsys.readouterr().err
    assert message in err and str(path) in err
    assert not workdir.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.pth"]


def test_truncated_file(pth, tmp_path, capsys):
    path = tmp_path / "truncated.pth"
    path.write_bytes(pth.read_bytes()[: pth.stat().st_size // 2])
    assert run_cli(import_torch.main, ["--checkpoint", str(path), "--kind", "2d", "--workdir",
                                       str(tmp_path / "w")]) == 1
    assert "cannot read, truncated or not a PyTorch checkpoint" in capsys.readouterr().err


def test_import_refuses_a_non_empty_workdir_and_a_wrong_kind(pth, tmp_path, capsys):
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("keep me")
    assert run_cli(import_torch.main, ["--checkpoint", str(pth), "--kind", "2d", "--workdir", str(workdir)]) == 1
    assert "not an empty directory" in capsys.readouterr().err
    assert [p.name for p in workdir.iterdir()] == ["notes.txt"]
    assert run_cli(import_torch.main, ["--checkpoint", str(pth), "--kind", "vlm", "--workdir",
                                       str(tmp_path / "v")]) == 1
    assert "no 'model' entry" in capsys.readouterr().err


def test_periods_written_by_export_are_bf16_bit_patterns():
    """The numpy side keeps bf16 (ml_dtypes) and the tensor conversion reinterprets the bits exactly."""
    values = torch_format.periods(torch_format.UPSTREAM, 2)
    assert values.dtype == ml_dtypes.bfloat16
    tensor = torch_reference.to_torch(values)
    assert tensor.dtype == torch.bfloat16 and tensor.float().numpy().tolist() == values.astype(np.float32).tolist()


# --- the VLM (stage 3) ------------------------------------------------------------------------------------------

VLM_PERIODS_3D = "vision_model.rope_embed_3D.periods"


@pytest.fixture(scope="module")
def vlm_pth(tmp_path_factory) -> tuple[pathlib.Path, dict]:
    """A tiny released-style VLM file, {"model": {...}}, and the params it holds: the tiny backbone and a Qwen3 text
    tower of test_stage3's tiny folder architecture (other weights). Its 3-D RoPE periods are one bf16 bit off
    ours, as those of a file made on a GPU may be (docs/torch_format.md §1.3)."""
    from flax import nnx

    from flexict_jax.models import qwen3
    from flexict_jax.models.vit import VisionTransformer
    from flexict_jax.models.vlm import VisionLanguageHead

    arch = torch_format.Architecture(**TINY_ARCH)
    text = qwen3.Qwen3Config.from_hf_dict(QWEN3_TINY)
    rngs = nnx.Rngs(0)
    model = {"backbone": VisionTransformer(**arch.to_config(), layerscale_init=0.5, rngs=rngs),
             "head": VisionLanguageHead(qwen3.qwen3_encoder(text, rngs=rngs), vision_width=arch.dim, rngs=rngs)}
    state = jax.tree.map(np.asarray, {name: nnx.to_pure_dict(nnx.state(m, nnx.Param)) for name, m in model.items()})
    params = {"backbone": state["backbone"], **state["head"], "logit_scale": np.float32(3.0)}  # not the init value
    payload = torch_format.vlm_to_torch(params, arch)
    payload[VLM_PERIODS_3D] = last_bf16_bit_flipped(payload[VLM_PERIODS_3D], 2)
    path = tmp_path_factory.mktemp("vlm") / "FlexiCT_VLM_tiny.pth"
    export.write_pth({"model": payload}, path)
    return path, params


def test_vlm_import_and_export_round_trip(vlm_pth, tmp_path):
    path, params = vlm_pth
    workdir = tmp_path / "vlm_run"
    assert run_cli(import_torch.main, ["--checkpoint", str(path), "--kind", "vlm", "--workdir", str(workdir)]) == 0
    teacher, _, meta = checkpointing.read_subtree(workdir, "teacher")
    assert sorted(teacher) == ["backbone", "logit_scale", "text_tower", "vision_projection"]
    a, b = _leaves(params), _leaves(teacher)
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert meta["kind"] == "vlm" and meta["config"]["text_tower"]["num_hidden_layers"] == 1
    file_periods = torch.load(path, weights_only=True)["model"][VLM_PERIODS_3D]
    assert meta["config"]["model"]["rope_periods_3d"] == file_periods.float().tolist()
    assert meta["config"]["model"]["rope_periods_2d"] is None  # the file's 2-D periods are ours
    # Upstream-format export: refused at this size, then written with every key bit-identical to the source.
    out = tmp_path / "again.pth"
    argv = ["--workdir", str(workdir), "--kind", "vlm", "--format", "flexict", "--out", str(out)]
    assert run_cli(export.main, argv) == 1
    assert run_cli(export.main, argv + ["--allow-custom-architecture"]) == 0
    first, second = (torch.load(p, weights_only=True)["model"] for p in (path, out))
    assert list(first) == list(second) and all(torch.equal(first[k], second[k]) for k in first)
    assert second["logit_scale"].shape == (1,) and second["vision_model.rope_embed_3D.periods"].dtype == torch.bfloat16
    # safetensors: the same keys, the text tower's config, and the vision tower loads into the reference.
    st = tmp_path / "vlm_st"
    assert run_cli(export.main, ["--workdir", str(workdir), "--kind", "vlm", "--format", "safetensors",
                                 "--out", str(st)]) == 0
    config = json.loads((st / "config.json").read_text())
    assert config["vision_language"]["text_tower"]["hidden_size"] == QWEN3_TINY["hidden_size"]
    assert config["preprocessing"]["crop"] == 160 and config["rope"]["dtype"] == "bfloat16"
    reference, _ = torch_reference.load_safetensors(st)
    x = np.random.default_rng(3).normal(size=(1, 16, 16, 16)).astype(np.float32)
    with torch.no_grad():
        cls = reference(torch.from_numpy(x)[:, None])["cls_token"].numpy()
    _assert_close(_cls_and_patch(embed.load_backbone(st).model, x)[0], cls)


def test_recipe_vlm_pairs_the_teacher_backbone_with_the_student_text_tower(vlm_pth, tmp_path, capsys):
    """A stage-3 state: the EMA teacher tracks the image side only (docs/recipe.md §8), the student has everything."""
    _, params = vlm_pth
    student = jax.tree.map(lambda a: a + np.float32(1.0), params)
    workdir = tmp_path / "stage3"
    meta = {"stage": "stage3", "config": {"model": {**torch_format.Architecture(**TINY_ARCH).to_config(),
                                                    "rope_bf16": False}}}
    import_torch.write_workdir(workdir, {"step": np.int32(5), "params": student,
                                         "teacher": {"backbone": params["backbone"]}}, meta)
    exported = {}
    for which in ("teacher", "student", "recipe-vlm", "default"):
        out = tmp_path / f"{which}.pth"
        code = run_cli(export.main, ["--workdir", str(workdir), "--kind", "vlm", "--format", "flexict", "--out",
                                     str(out), "--allow-custom-architecture"]
                       + ([] if which == "default" else ["--params", which]))
        if which == "teacher":
            assert code == 1 and "use --params=recipe-vlm" in capsys.readouterr().err
            continue
        assert code == 0
        exported[which] = torch.load(out, weights_only=True)["model"]
    vision, text = "vision_model.blocks.0.attn.qkv.weight", "text_model.backbone.layers.0.mlp.up_proj.weight"
    mixed, student_sd = exported["recipe-vlm"], exported["student"]
    assert all(torch.equal(mixed[k], exported["default"][k]) for k in mixed)
    np.testing.assert_array_equal(mixed[vision].numpy(),
                                  params["backbone"]["blocks"][0]["attn"]["qkv"]["kernel"].T)
    assert not torch.equal(mixed[vision], student_sd[vision])
    for key in (text, "vlm_vision_projection.weight", "logit_scale"):
        assert torch.equal(mixed[key], student_sd[key])


def test_stage3_continues_an_imported_vlm_and_another_stage3_run(vlm_pth, phantom_reports, qwen3_folder, run,
                                                                  tmp_path, capsys):
    """`configs/stage3.py:tiny --config.init.from=IMPORTED --config.init.mode=vlm`, with the Qwen3 tower of the file
    (the local folder gives config.json and the tokenizer): step 0 holds the file's backbone, vision projection,
    text tower and logit scale, and new DINO/iBOT heads (the released VLM has none); the run uses the file's RoPE
    periods (one bf16 bit off ours) and exports them back bit for bit. A stage-3 run started from this one in the
    same mode takes everything: the EMA teacher's image side and the student's text side."""
    path, params = vlm_pth
    folder, folder_weights = qwen3_folder
    imported = tmp_path / "imported"
    import_torch.import_checkpoint(path, kind="vlm", workdir=imported)
    workdir = tmp_path / "stage3"

    def stage3_config(source, **overrides):
        return config_with(stage3.get_config, "tiny", phantom_reports, **{
            "init.from_workdir": str(source), "init.mode": "vlm", "text.tower": "qwen3",
            "text.hf_folder": str(folder), "total_steps": 2, "eval.every_steps": 0,
            # One compiled step variant, the cheaper one: patch 16 only, one local crop.
            **ONE_VARIANT, "data.n_local_crops": 1, **overrides})

    assert trainer.train(stage3_config(imported), str(workdir)) == 0
    start = saved_state(workdir, 0)
    vlm_parts = ("backbone", "vision_projection", "text_tower", "logit_scale")
    for part in vlm_parts:
        _assert_trees_equal(start["params"][part], params[part], part)
    # The file's tower, not the folder's (other weights, which a "vlm" hand-off does not read).
    assert not np.array_equal(params["text_tower"]["embed_tokens"]["embedding"],
                              folder_weights["embed_tokens"]["embedding"])
    _assert_trees_equal(start["teacher"]["backbone"], params["backbone"], "teacher")
    meta = json.loads((workdir / "checkpoints" / "0" / "meta" / "metadata").read_text())
    assert meta["init"]["mode"] == "vlm" and meta["init"]["fresh"] == ["dino_head", "ibot_head"]
    file_periods = torch.load(path, weights_only=True)["model"][VLM_PERIODS_3D]
    assert meta["config"]["model"]["rope_periods_3d"] == file_periods.float().tolist()
    assert [r["step"] for r in metrics(workdir) if np.isfinite(r["loss"])] == [1, 2]
    out = tmp_path / "continued.pth"
    assert run_cli(export.main, ["--workdir", str(workdir), "--kind", "vlm", "--format", "flexict", "--out", str(out),
                                 "--allow-custom-architecture"]) == 0
    exported = torch.load(out, weights_only=True)["model"][VLM_PERIODS_3D]
    assert exported.dtype == torch.bfloat16 and torch.equal(exported.view(torch.int16), file_periods.view(torch.int16))
    # A resume (the command run again, without --config.init.from) takes them from the run's own checkpoint;
    # other periods in the config are refused.
    resumed = stage3.get_config("tiny")
    handoff.adopt_rope_periods(resumed, workdir)
    assert list(resumed.model.rope_periods_3d) == file_periods.float().tolist()
    resumed.model.rope_periods_3d = tuple(torch_format.periods(torch_format.Architecture(**TINY_ARCH), 3).tolist())
    with pytest.raises(ConfigError, match="config.model.rope_periods_3d=.* differs from the periods"):
        handoff.adopt_rope_periods(resumed, workdir)

    # Stage 3 from stage 3: what the hand-off takes (the step above showed how it is taken) is the EMA teacher's
    # backbone and heads and the student's text side; nothing starts fresh.
    source, step, source_meta = checkpointing.read_subtree(workdir, "teacher")
    taken = handoff.vlm_source(stage3_config(workdir), str(workdir), step, source, source_meta)
    end = saved_state(workdir, 2)
    assert sorted(taken) == sorted(end["params"])
    for part in ("backbone", "dino_head", "ibot_head"):
        _assert_trees_equal(taken[part], end["teacher"][part], part)
    for part in ("vision_projection", "text_tower", "logit_scale"):
        _assert_trees_equal(taken[part], end["params"][part], part)

    # Refused: the Qwen3 tower as a from-scratch one, and a source without a text side.
    with pytest.raises(checkpointing.IncompatibleCheckpointError,
                       match="its text tower is 'qwen3' but config.text.tower='scratch'; pass --config.text"):
        _handoff(stage3_config(imported, **{"text.tower": "scratch", "text.hf_folder": None}))
    with pytest.raises(checkpointing.IncompatibleCheckpointError, match="so not a vision-language checkpoint"):
        _handoff(stage3_config(run))
