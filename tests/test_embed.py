"""Embeddings CLI on real CT (../shared/data) with a tiny exported model: preprocessing, outputs, parity."""
from __future__ import annotations

import json
import pathlib

import jax
import nibabel as nib
import numpy as np
import pytest
from flax import nnx

from flexict_jax import embed, export, import_torch, torch_format
from flexict_jax.imaging import geometry
from flexict_jax.models.vit import VisionTransformer

torch = pytest.importorskip("torch")
from flexict_jax import torch_reference  # noqa: E402  (imports torch)

ARCH = torch_format.Architecture(dim=48, depth=2, num_heads=2)


def _cli(argv) -> tuple[int, dict | None]:
    """Runs the CLI; returns (exit code, the output arrays when written)."""
    try:
        code = embed.main(argv)
    except SystemExit as e:
        code = e.code
    out = pathlib.Path(argv[argv.index("--out") + 1]) if "--out" in argv else None
    arrays = dict(np.load(out)) if code == 0 and out and out.exists() else None
    return int(code or 0), arrays


@pytest.fixture(scope="module")
def backbone() -> dict:
    # LayerScale 0.5: the blocks visibly change the tokens (the default 1e-5 would leave the patch embedding).
    model = VisionTransformer(**ARCH.to_config(), layerscale_init=0.5, rngs=nnx.Rngs(7))
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))


@pytest.fixture(scope="module")
def exported(backbone, tmp_path_factory) -> pathlib.Path:
    """A tiny model in the safetensors export format (bf16 RoPE, as the released weights)."""
    out = tmp_path_factory.mktemp("export") / "tiny_2d"
    config = export.safetensors_config(ARCH, kind="2d", rope_bf16=True, meta={}, source={"test": "random init"})
    export.write_safetensors(torch_format.backbone_to_torch(backbone, ARCH), config, out)
    return out


@pytest.fixture(scope="module")
def abdomen_2d(exported, ct_dir, tmp_path_factory) -> tuple[pathlib.Path, dict]:
    out = tmp_path_factory.mktemp("embed") / "abdomen.npz"
    code, arrays = _cli(["--checkpoint", str(exported), "--kind", "2d", "--input",
                         str(ct_dir / "ts_example_ct_sm.nii.gz"), "--out", str(out), "--slices", "0,15,-1",
                         "--save-inputs", "--batch-size", "2"])
    assert code == 0
    return out, arrays


def _assert_close(a: np.ndarray, b: np.ndarray, max_abs: float = 1e-3, min_cos: float = 0.99999) -> None:
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    assert np.abs(a - b).max() <= max_abs and cos.min() >= min_cos, (np.abs(a - b).max(), cos.min())


def _source_centre_lps(path: pathlib.Path) -> np.ndarray:
    image = nib.load(path)
    centre = (np.asarray(image.shape[:3]) - 1) / 2
    return (geometry.RAS_TO_LPS @ image.affine @ np.append(centre, 1.0))[:3]


def test_2d_slices_of_a_real_ct(abdomen_2d, ct_dir):
    """ts_example_ct_sm: 122 x 101 x 30 voxels of 3 mm, RAS -> LPS at 1.5 mm in-plane: 202 x 244 pixels,
    air-padded to 208 x 248 = a 26 x 31 grid of patch 8."""
    _, arrays = abdomen_2d
    assert arrays["cls"].shape == (3, 48) and arrays["patch"].shape == (3, 26 * 31, 48)
    assert arrays["grid"].tolist() == [26, 31] and int(arrays["patch_size"]) == 8 and str(arrays["kind"]) == "2d"
    assert arrays["slice_index"].tolist() == [0, 15, 29]
    assert arrays["resampled_shape"].tolist() == [30, 202, 244] and arrays["spacing_mm"].tolist() == [3, 1.5, 1.5]
    inputs = arrays["inputs"]
    assert inputs.shape == (3, 208, 248) and inputs.dtype == np.float32
    np.testing.assert_allclose(inputs.mean(axis=(1, 2)), 0.0, atol=1e-5)  # z-scored per slice
    np.testing.assert_allclose(inputs.reshape(3, -1).std(axis=1, ddof=1), 1.0, rtol=1e-5)
    assert np.all(inputs[:, :3] == inputs[:, :3, :1])  # padded rows: air, one value per slice
    preprocessing = json.loads(str(arrays["preprocessing"]))
    assert preprocessing["orientation"] == "LPS" and preprocessing["hu_window"] == [-1000.0, 1000.0]
    assert preprocessing["applied"] and preprocessing["rope_bf16"]
    # The model input's centre (z centre between slices 14 and 15) is the centre of the source volume.
    centre = arrays["input_affine_zyx_to_lps"] @ np.array([14.5, 103.5, 123.5, 1.0])
    np.testing.assert_allclose(centre[:3], _source_centre_lps(ct_dir / "ts_example_ct_sm.nii.gz"), atol=1e-3)
    # Superior is up whatever the storage order: the last slice is the highest.
    positions = [(arrays["input_affine_zyx_to_lps"] @ np.array([z, 0, 0, 1.0]))[2] for z in (0, 29)]
    assert positions[1] > positions[0]
    assert np.all(np.isfinite(arrays["patch"])) and np.std(arrays["cls"], axis=0).max() > 1e-3


def test_npy_input_reproduces_the_nifti_run_bit_for_bit_and_matches_torch(abdomen_2d, exported, tmp_path):
    _, arrays = abdomen_2d
    npy = tmp_path / "inputs.npy"
    np.save(npy, arrays["inputs"])
    code, again = _cli(["--checkpoint", str(exported), "--kind", "2d", "--input", str(npy),
                        "--out", str(tmp_path / "again.npz")])
    assert code == 0
    np.testing.assert_array_equal(again["cls"], arrays["cls"])
    np.testing.assert_array_equal(again["patch"], arrays["patch"])
    assert again["slice_index"].tolist() == [0, 1, 2] and not json.loads(str(again["preprocessing"]))["applied"]
    reference, _ = torch_reference.load_safetensors(exported)
    with torch.no_grad():
        out = reference(torch.from_numpy(arrays["inputs"])[:, None])
    _assert_close(arrays["cls"], out["cls_token"].numpy())
    _assert_close(arrays["patch"], out["patch_tokens"].numpy())


def test_dicom_series_equals_its_nifti_conversion(exported, shared_data, tmp_path):
    """The DICOM series (LPS storage) and its NIfTI conversion (LAS storage) give the same model input."""
    runs = {}
    for name, path in (("dicom", shared_data / "dicom" / "ts_torso_20"), ("nifti", shared_data / "ct" /
                                                                             "ts_torso_20.nii.gz")):
        code, runs[name] = _cli(["--checkpoint", str(exported), "--kind", "2d", "--input", str(path),
                                 "--out", str(tmp_path / f"{name}.npz"), "--slices", "0,19", "--patch-size", "16",
                                 "--save-inputs"])
        assert code == 0
    dicom, nifti = runs["dicom"], runs["nifti"]
    assert dicom["inputs"].shape == (2, 336, 336) and dicom["grid"].tolist() == [21, 21]
    np.testing.assert_array_equal(dicom["inputs"], nifti["inputs"])
    np.testing.assert_array_equal(dicom["input_affine_zyx_to_lps"], nifti["input_affine_zyx_to_lps"])
    np.testing.assert_array_equal(dicom["cls"], nifti["cls"])


def test_3d_hugging_face_preset(exported, ct_dir, tmp_path):
    """2 mm, z-score, min-pad to 160³ then centre-crop 160³ (docs/recipe.md §9); patch 16 gives a 10³ grid."""
    code, arrays = _cli(["--checkpoint", str(exported), "--kind", "3d", "--input",
                         str(ct_dir / "ts_example_ct_sm.nii.gz"), "--out", str(tmp_path / "volume.npz"),
                         "--patch-size", "16", "--save-inputs"])
    assert code == 0
    assert arrays["cls"].shape == (1, 48) and arrays["patch"].shape == (1, 1000, 48)
    assert arrays["grid"].tolist() == [10, 10, 10] and arrays["slice_index"].tolist() == [0]
    assert arrays["resampled_shape"].tolist() == [45, 152, 183]  # 90 x 303 x 366 mm at 2 mm
    inputs = arrays["inputs"][0]
    assert inputs.shape == (160, 160, 160)
    # z (45 slices) is padded with the volume minimum on both sides; y and x are cropped.
    assert np.all(inputs[:57] == inputs.min()) and np.all(inputs[-58:] == inputs.min())
    assert not np.all(inputs[57] == inputs.min())
    centre = arrays["input_affine_zyx_to_lps"] @ np.array([79.5, 79.5, 79.5, 1.0])
    np.testing.assert_allclose(centre[:3], _source_centre_lps(ct_dir / "ts_example_ct_sm.nii.gz"), atol=2.0)
    assert json.loads(str(arrays["preprocessing"]))["crop"] == 160


def test_imported_workdir_embeds_like_its_export(backbone, exported, abdomen_2d, tmp_path):
    pth = tmp_path / "tiny.pth"
    export.write_pth({"teacher": torch_format.params_to_torch({"backbone": backbone}, ARCH)}, pth)
    import_torch.import_checkpoint(pth, kind="2d", workdir=tmp_path / "imported")
    npy = tmp_path / "inputs.npy"
    np.save(npy, abdomen_2d[1]["inputs"])
    code, arrays = _cli(["--checkpoint", str(tmp_path / "imported"), "--kind", "2d", "--input", str(npy),
                         "--out", str(tmp_path / "out.npz")])
    assert code == 0
    np.testing.assert_array_equal(arrays["cls"], abdomen_2d[1]["cls"])


def _bad_npy(tmp_path: pathlib.Path, array: np.ndarray) -> str:
    path = tmp_path / "bad.npy"
    np.save(path, array)
    return str(path)


@pytest.mark.parametrize("make_input,extra,message", [
    (lambda d, p: _bad_npy(p, np.full((16, 16), np.nan, np.float32)), [], "256 NaN/inf values"),
    (lambda d, p: _bad_npy(p, np.zeros((16, 16), np.float32)), ["--kind", "3d"],
     "expected a float [D, H, W] array for --kind=3d"),
    (lambda d, p: _bad_npy(p, np.zeros((20, 16), np.float32)), [], "not a multiple of the patch size 8"),
    (lambda d, p: _bad_npy(p, np.zeros((16, 16), np.int16)), [], "expected a float [H, W] or [N, H, W]"),
    (lambda d, p: str(d / "ct" / "ts_example_ct_sm.nii.gz"), ["--slices", "30"], "slice 30 is out of range"),
    (lambda d, p: str(d / "ct" / "ts_example_ct_sm_label.nii.gz"), [], "intensity range is not CT HU"),
    (lambda d, p: str(p / "missing.nii.gz"), [], "missing.nii.gz"),
    (lambda d, p: str(d / "reports"), [], "found 0 DICOM series, expected exactly one"),
], ids=["nan", "npy-rank", "npy-not-multiple", "npy-int", "slice-range", "label-map", "missing", "no-dicom"])
def test_bad_inputs_exit_1_with_the_reason(exported, shared_data, tmp_path, capsys, make_input, extra, message):
    argv = ["--checkpoint", str(exported), "--kind", "2d", "--input", make_input(shared_data, tmp_path),
            "--out", str(tmp_path / "out.npz"), *extra]
    code, _ = _cli(argv)
    assert code == 1 and message in capsys.readouterr().err
    assert not (tmp_path / "out.npz").exists()


def test_existing_output_is_kept_and_bad_checkpoint(exported, tmp_path, capsys):
    out = tmp_path / "out.npz"
    out.write_bytes(b"keep")
    npy = _bad_npy(tmp_path, np.zeros((16, 16), np.float32))
    assert _cli(["--checkpoint", str(exported), "--kind", "2d", "--input", npy, "--out", str(out)])[0] == 1
    assert "pass --overwrite" in capsys.readouterr().err and out.read_bytes() == b"keep"
    assert _cli(["--checkpoint", str(tmp_path), "--kind", "2d", "--input", npy, "--out", str(out),
                 "--overwrite"])[0] == 1
    assert "neither a safetensors export" in capsys.readouterr().err
    assert _cli(["--help"])[0] == 0 and "--slices" in capsys.readouterr().out
