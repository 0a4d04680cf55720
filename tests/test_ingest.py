"""`python -m data_prep.ingest` on the real CT of ../shared/data and on bad inputs generated here.

Reference values are computed independently of data_prep: world positions from nibabel's RAS affine, HU by a
hand-written trilinear interpolation, label maps by rounding to the nearest source voxel.
"""
from __future__ import annotations

import gzip
import itertools
import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from data_prep import ingest
from flexict_jax.data import volume_store as vs
from flexict_jax.imaging import readers

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIVER, SPLEEN = 5, 1  # TotalSegmentator `total` classes (shared/data/ct/ts_total_classes.csv)
CT_NAMES = ["pyrad_lung1", "pyrad_lung2", "ts_aorta_ct_cropped", "ts_example_ct", "ts_example_ct_sm",
            "ts_pulmonary_ct_cropped", "ts_torso_20", "vtk_headsq"]
DICOM_ID = "ts_torso_20-cb296a70"  # same name as ct/ts_torso_20.nii.gz: suffixed with its content hash
SPACING = 3.0


def _run(argv, capsys) -> tuple[int, str, str]:
    code = ingest.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _world_lps(entry: dict, zyx: np.ndarray) -> np.ndarray:
    """LPS mm of stored voxels (n, 3) in (z, y, x), straight from the manifest's origin + index * spacing."""
    sz, sy, sx = entry["spacing"]
    return np.asarray(entry["origin_lps"]) + zyx[:, ::-1] * [sx, sy, sz]


def _source_index(img: nib.Nifti1Image, lps: np.ndarray) -> np.ndarray:
    ras = lps * [-1, -1, 1]
    inverse = np.linalg.inv(img.affine)
    return ras @ inverse[:3, :3].T + inverse[:3, 3]


def _trilinear(array: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    base = np.minimum(np.floor(ijk).astype(int), np.array(array.shape) - 2)
    frac = ijk - base
    total = np.zeros(len(ijk))
    for corner in itertools.product((0, 1), repeat=3):
        weight = np.prod([frac[:, a] if c else 1 - frac[:, a] for a, c in enumerate(corner)], axis=0)
        total += weight * array[base[:, 0] + corner[0], base[:, 1] + corner[1], base[:, 2] + corner[2]]
    return total


def _save_nifti(path, array, affine=None) -> None:
    affine = np.diag([-2.0, -2.0, 3.0, 1.0]) if affine is None else affine  # LPS storage, 2x2x3 mm
    img = nib.Nifti1Image(array, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    nib.save(img, str(path))


def _phantom(shape=(24, 20, 10), seed=0) -> np.ndarray:
    """A body-like int16 CT: air around a soft-tissue ellipsoid with some bone."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    body = (grid[0] ** 2 + grid[1] ** 2) < 0.6
    rng = np.random.default_rng(seed)
    hu = np.where(body, 40 + rng.normal(0, 20, shape), -1000 + rng.normal(0, 10, shape))
    hu[body & (np.abs(grid[0]) < 0.15)] = 700
    return np.round(hu).astype(np.int16)


# --- real CT -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ingested(ct_dir, dicom_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dataset")
    code = ingest.main(["--input", str(ct_dir), str(dicom_dir / "ts_torso_20"), "--output", str(out),
                        "--spacing", str(SPACING)])
    assert code == 0
    return out, {e["id"]: e for e in vs.read_manifest(out)}


def _source_image(entry: dict, ct_dir) -> nib.Nifti1Image:
    # The DICOM series and ct/ts_torso_20.nii.gz hold the same voxels and world geometry (data README note 3).
    return nib.load(str(ct_dir / "ts_torso_20.nii.gz")) if entry["id"] == DICOM_ID else nib.load(entry["source"])


def test_every_volume_listed_with_its_label(ingested):
    _, entries = ingested
    assert sorted(entries) == sorted(CT_NAMES + [DICOM_ID])
    with_label = {i for i, e in entries.items() if e["label_path"]}
    assert with_label == {"pyrad_lung1", "pyrad_lung2", "ts_example_ct_sm", "ts_torso_20", DICOM_ID}
    assert entries[DICOM_ID]["label_source"].endswith("dicom/ts_torso_20_label.nii.gz")
    assert entries[DICOM_ID]["source_sha256"] == (
        "cb296a70a6457e000d4244a78eec9240766a55f4aaf7b41682619bc30d617810")  # data README
    assert entries["vtk_headsq"]["source_sha256"] == (
        "c89ae7889824896b4bcf46e9243fa133a6dbeeeeb1d711e069f88d097ba6d418")
    for entry in entries.values():
        assert entry["spacing"] == [SPACING] * 3 and entry["subject"] == entry["id"]


def test_hu_at_world_points_matches_source(ingested, ct_dir):
    out, entries = ingested
    rng = np.random.default_rng(0)
    for volume_id, entry in entries.items():
        stored = vs.open_volume(out / entry["path"]).read().result()
        assert stored.dtype == np.int16 and list(stored.shape) == entry["shape"]
        img = _source_image(entry, ct_dir)
        source = np.asanyarray(img.dataobj).astype(np.float64)
        body = np.argwhere(stored > -200)  # inside the patient
        zyx = body[rng.choice(len(body), size=min(400, len(body)), replace=False)]
        ijk = _source_index(img, _world_lps(entry, zyx))
        inside = np.all((ijk >= 0) & (ijk <= np.array(source.shape) - 1), axis=1)
        assert inside.mean() > 0.9, volume_id
        expected = _trilinear(source, ijk[inside])
        got = stored[tuple(zyx[inside].T)]
        # Same linear interpolation, then rounding to int16: within half an HU (plus float32 error).
        np.testing.assert_allclose(got, expected, atol=0.51, rtol=0, err_msg=volume_id)


def test_field_of_view_preserved(ingested, ct_dir):
    _, entries = ingested
    for volume_id, entry in entries.items():
        img = _source_image(entry, ct_dir)
        shape = np.array(img.shape[:3])
        zooms = np.array(img.header.get_zooms()[:3])
        world_axis = np.abs(img.affine[:3, :3]).argmax(axis=0)  # RAS axis of each voxel axis
        source_extent = np.zeros(3)
        source_extent[world_axis] = shape * zooms  # per world axis (R/L, A/P, S/I)
        stored_extent = (np.array(entry["shape"]) * entry["spacing"])[::-1]  # (x, y, z) = (L, P, S)
        assert np.all(np.abs(stored_extent - source_extent) <= SPACING / 2 + 1e-6), volume_id
        centre_ras = img.affine @ [*((shape - 1) / 2), 1]
        stored_centre = _world_lps(entry, (np.array(entry["shape"])[None] - 1) / 2)[0]
        np.testing.assert_allclose(stored_centre, centre_ras[:3] * [-1, -1, 1], atol=1e-3, err_msg=volume_id)


def test_labels_stay_aligned(ingested, ct_dir, dicom_dir):
    out, entries = ingested
    rng = np.random.default_rng(1)
    for volume_id, entry in entries.items():
        if not entry["label_path"]:
            continue
        labels = vs.open_volume(out / entry["label_path"]).read().result()
        assert labels.dtype == np.uint8 and list(labels.shape) == entry["shape"]
        attrs = vs.read_attributes(out / entry["label_path"])
        assert attrs["kind"] == "label" and attrs["spacing"] == entry["spacing"]
        source_img = nib.load(entry["label_source"])
        source = np.asanyarray(source_img.dataobj)
        foreground = np.argwhere(labels > 0)
        zyx = np.concatenate([foreground[rng.choice(len(foreground), 200)],
                              np.argwhere(labels >= 0)[rng.choice(labels.size, 200)]])
        ijk = _source_index(source_img, _world_lps(entry, zyx))
        nearest = np.rint(ijk).astype(int)
        tie = np.any(np.abs(ijk - np.floor(ijk) - 0.5) < 1e-6, axis=1)  # halfway: either neighbour is right
        use = np.all((nearest >= 0) & (nearest < source.shape), axis=1) & ~tie
        assert use.mean() > 0.25, volume_id  # 2 mm -> 3 mm puts every other slice on a tie
        np.testing.assert_array_equal(labels[tuple(zyx[use].T)], source[tuple(nearest[use].T)],
                                      err_msg=volume_id)

        if LIVER in labels and SPLEEN in labels:  # liver on the patient's right: smaller L than the spleen
            liver_l = _world_lps(entry, np.argwhere(labels == LIVER).astype(float))[:, 0].mean()
            spleen_l = _world_lps(entry, np.argwhere(labels == SPLEEN).astype(float))[:, 0].mean()
            assert liver_l < spleen_l - 50, volume_id
    for volume_id in ("ts_example_ct_sm", "ts_torso_20", DICOM_ID):
        labels = vs.open_volume(out / entries[volume_id]["label_path"]).read().result()
        assert LIVER in labels and SPLEEN in labels, volume_id


def test_stored_attributes(ingested):
    out, entries = ingested
    entry = entries["ts_example_ct"]
    attrs = vs.read_attributes(out / entry["path"])
    assert attrs["orientation"] == "LPS" and attrs["axes"] == "zyx" and attrs["kind"] == "image"
    assert attrs["source_orientation"] == "RAS" and attrs["source_sha256"] == entry["source_sha256"]
    assert attrs["resampling"] == "exact reorientation"  # already 3 mm: only axes flipped
    assert vs.read_attributes(out / entries["pyrad_lung1"]["path"])["resampling"] == "linear"
    assert vs.read_attributes(out / entries["pyrad_lung1"]["label_path"])["resampling"] == "nearest"
    affine = np.array(attrs["affine_zyx_to_lps"])
    np.testing.assert_allclose(affine @ [2, 3, 4, 1], [*_world_lps(entry, np.array([[2.0, 3, 4]]))[0], 1])


def test_native_spacing_is_an_exact_reorientation(ct_dir, tmp_path, capsys):
    names = ["vtk_headsq", "ts_example_ct_sm", "ts_torso_20"]  # LPI, RAS, LAS storage
    code, _, err = _run(["--input", *[ct_dir / f"{n}.nii.gz" for n in names], "--output", tmp_path,
                         "--spacing", "native"], capsys)
    assert code == 0, err
    entries = {e["id"]: e for e in vs.read_manifest(tmp_path)}
    for name in names:
        for key, source in (("path", ct_dir / f"{name}.nii.gz"), ("label_path", ct_dir / f"{name}_label.nii.gz")):
            if not entries[name][key]:
                continue
            canonical = nib.as_closest_canonical(nib.load(str(source)))  # RAS: flip x, y and reverse axes
            expected = np.asanyarray(canonical.dataobj)[::-1, ::-1, :].transpose(2, 1, 0)
            np.testing.assert_array_equal(vs.open_volume(tmp_path / entries[name][key]).read().result(),
                                          expected, err_msg=f"{name} {key}")
            np.testing.assert_allclose(entries[name]["spacing"], canonical.header.get_zooms()[::-1])


# --- synthetic inputs --------------------------------------------------------------------------------------

def test_oblique_volume_is_resampled_in_world_space(tmp_path, capsys):
    """A float HU ramp, linear in world position, on a rotated grid: trilinear resampling reproduces it."""
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine_ras = np.eye(4)
    affine_ras[:3, :3] = rotation @ np.diag([2.0, 2.0, 3.0])
    affine_ras[:3, 3] = [-30.0, 12.0, 100.0]
    gradient_lps = np.array([9.0, -6.0, 4.0])
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in (30, 26, 20)], indexing="ij"), -1).reshape(-1, 3)
    lps = (ijk @ affine_ras[:3, :3].T + affine_ras[:3, 3]) * [-1, -1, 1]
    offset = -1100 - (lps @ gradient_lps).min()  # from air upward, so that it passes as CT

    def ramp(lps):
        return lps @ gradient_lps + offset

    _save_nifti(tmp_path / "oblique.nii.gz", ramp(lps).reshape(30, 26, 20).astype(np.float32), affine_ras)

    code, _, err = _run(["--input", tmp_path / "oblique.nii.gz", "--output", tmp_path / "out",
                         "--spacing", "2.5,1.5,2"], capsys)
    assert code == 0, err
    (entry,) = vs.read_manifest(tmp_path / "out")
    stored = vs.open_volume(tmp_path / "out" / entry["path"]).read().result()
    zyx = np.argwhere(np.ones(stored.shape, bool))
    world = _world_lps(entry, zyx.astype(float))
    source_index = (world * [-1, -1, 1] - affine_ras[:3, 3]) @ np.linalg.inv(affine_ras[:3, :3]).T
    inside_hull = np.all((source_index >= 0) & (source_index <= [29, 25, 19]), axis=1)
    outside_fov = np.any((source_index < -0.5) | (source_index > [29.5, 25.5, 19.5]), axis=1)
    values = stored[tuple(zyx.T)]
    np.testing.assert_allclose(values[inside_hull], ramp(world[inside_hull]), atol=0.51)
    assert outside_fov.any() and np.all(values[outside_fov] == -1024)
    # The bounding box of the rotated field of view, at the requested spacing.
    assert entry["spacing"] == [2.5, 1.5, 2.0]


def _write_bad_inputs(folder) -> dict[str, str]:
    """Bad sources and the reason each must be refused for (a word of the message)."""
    folder.mkdir()
    _save_nifti(folder / "good.nii.gz", _phantom())
    _save_nifti(folder / "squeezable.nii.gz", _phantom()[..., None])  # (x, y, z, 1): accepted
    _save_nifti(folder / "good_label.nii.gz", (_phantom() > 0).astype(np.uint8))
    raw = gzip.compress(nib.Nifti1Image(_phantom(), np.eye(4)).to_bytes())
    (folder / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    _save_nifti(folder / "flat.nii.gz", _phantom()[:, :, 0])
    _save_nifti(folder / "series.nii.gz", np.stack([_phantom()] * 3, axis=-1))
    nan = _phantom().astype(np.float32)
    nan[3, 4, 5] = np.nan
    _save_nifti(folder / "nan.nii.gz", nan)
    _save_nifti(folder / "photo.nii.gz", ((_phantom() + 1024) // 16).clip(0, 255).astype(np.uint8))
    _save_nifti(folder / "unit.nii.gz", ((_phantom() + 1024) / 4000).astype(np.float32))
    _save_nifti(folder / "ghost_label.nii.gz", np.zeros((4, 4, 4), np.uint8))
    _save_nifti(folder / "far.nii.gz", _phantom(seed=3))
    far_affine = np.diag([-2.0, -2.0, 3.0, 1.0])
    far_affine[2, 3] = 1000.0  # a label map of some other region
    _save_nifti(folder / "far_label.nii.gz", (_phantom() > 0).astype(np.uint8), far_affine)
    (folder / "notes.txt").write_text("not a volume")
    return {"far.nii.gz": "does not overlap its image", "truncated.nii.gz": "truncated",
            "flat.nii.gz": "not a 3D volume", "series.nii.gz": "4D",
            "nan.nii.gz": "NaN", "photo.nii.gz": "not CT HU", "unit.nii.gz": "not CT HU",
            "ghost_label.nii.gz": "without its image"}


def test_bad_inputs_are_reported_and_the_rest_written(tmp_path, capsys):
    refusals = _write_bad_inputs(tmp_path / "raw")
    out = tmp_path / "dataset"
    code, stdout, err = _run(["--input", tmp_path / "raw", "--output", out, "--spacing", "native"], capsys)
    assert code == ingest.EXIT_REFUSED
    refused_lines = [line for line in err.splitlines() if line.startswith("refused: ")]
    assert len(refused_lines) == len(refusals), err
    for name, reason in refusals.items():
        assert any(str(tmp_path / "raw" / name) in line and reason in line for line in refused_lines), (name, err)
    assert "2 written, 0 skipped (already ingested), 8 refused" in stdout
    entries = {e["id"]: e for e in vs.read_manifest(out)}
    assert sorted(entries) == ["good", "squeezable"]
    assert entries["good"]["label_path"] == "labels/good.zarr" and entries["squeezable"]["label_path"] is None
    expected = _phantom().transpose(2, 1, 0)  # written in LPS voxel order, stored as (z, y, x)
    np.testing.assert_array_equal(vs.open_volume(out / entries["squeezable"]["path"]).read().result(), expected)

    # Re-running skips what is done and refuses the same files again.
    code, stdout, _ = _run(["--input", tmp_path / "raw", "--output", out, "--spacing", "native"], capsys)
    assert code == ingest.EXIT_REFUSED
    assert "0 written, 2 skipped (already ingested), 8 refused" in stdout
    assert len(vs.read_manifest(out)) == 2


def test_fatal_errors_exit_1(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = _run(["--input", tmp_path / "empty", "--output", tmp_path / "out"], capsys)
    assert code == ingest.EXIT_FATAL and "no NIfTI file or DICOM CT series found" in err
    assert not (tmp_path / "out").exists()

    code, _, err = _run(["--input", tmp_path / "missing", "--output", tmp_path / "out"], capsys)
    assert code == ingest.EXIT_FATAL and "missing: no such file or directory" in err

    _save_nifti(tmp_path / "nan.nii.gz", np.full((4, 4, 4), np.nan, np.float32))
    code, _, err = _run(["--input", tmp_path / "nan.nii.gz", "--output", tmp_path / "out"], capsys)
    assert code == ingest.EXIT_FATAL and "no volume could be ingested" in err

    (tmp_path / "out" / vs.MANIFEST_NAME).write_text("{not json\n")
    _save_nifti(tmp_path / "good.nii.gz", _phantom())
    code, _, err = _run(["--input", tmp_path / "good.nii.gz", "--output", tmp_path / "out"], capsys)
    assert code == ingest.EXIT_FATAL and "manifest.jsonl:1: corrupt manifest line" in err

    with pytest.raises(SystemExit) as exit_info:
        ingest.main(["--input", str(tmp_path), "--output", str(tmp_path / "out"), "--spacing", "1,x,2"])
    assert exit_info.value.code == ingest.EXIT_FATAL and "--spacing" in capsys.readouterr().err


def test_interrupted_run_leaves_nothing_listed_and_is_cleaned(tmp_path, capsys, monkeypatch):
    raw, out = tmp_path / "raw", tmp_path / "dataset"
    raw.mkdir()
    for i in range(3):
        _save_nifti(raw / f"v{i}.nii.gz", _phantom(seed=i))

    # Interrupt after the second volume's arrays are committed but before its manifest line.
    real_append = vs.append_manifest
    appended = []

    def append_then_die(dataset_dir, entry):
        if appended:
            raise KeyboardInterrupt
        appended.append(entry["id"])
        real_append(dataset_dir, entry)

    monkeypatch.setattr(vs, "append_manifest", append_then_die)
    assert ingest.main(["--input", str(raw), "--output", str(out)]) == 130
    monkeypatch.setattr(vs, "append_manifest", real_append)
    assert [e["id"] for e in vs.read_manifest(out)] == ["v0"]
    assert (out / "volumes" / "v1.zarr").is_dir()  # committed, not listed
    stale = out / "volumes" / f"{vs.TMP_PREFIX}v2.zarr-0123abcd"  # a worker killed mid-write
    shutil.copytree(out / "volumes" / "v0.zarr", stale)

    code, stdout, err = _run(["--input", raw, "--output", out], capsys)
    assert code == 0, err
    assert "removed" in err and "v1.zarr" in err and stale.name in err
    assert "2 written, 1 skipped" in stdout
    entries = vs.read_manifest(out)
    assert sorted(e["id"] for e in entries) == ["v0", "v1", "v2"]
    assert sorted(p.name for p in (out / "volumes").iterdir()) == ["v0.zarr", "v1.zarr", "v2.zarr"]


def test_duplicate_names_subjects_and_provenance(tmp_path, capsys):
    for folder, seed in (("a", 0), ("b", 1), ("c", 0)):  # c/vol is a byte copy of a/vol
        (tmp_path / folder).mkdir()
        _save_nifti(tmp_path / folder / "vol.nii.gz", _phantom(seed=seed))
    shutil.copy(tmp_path / "a" / "vol.nii.gz", tmp_path / "c" / "vol.nii.gz")
    subjects = tmp_path / "subjects.csv"
    subjects.write_text("volume,subject\nvol,patient-7\n")
    code, stdout, err = _run(["--input", tmp_path / "a", tmp_path / "b", tmp_path / "c", "--output",
                              tmp_path / "out", "--subjects", subjects, "--licence", "CC-BY-4.0",
                              "--split", "train"], capsys)
    assert code == 0, err
    assert "2 written, 1 skipped" in stdout
    entries = {e["id"]: e for e in vs.read_manifest(tmp_path / "out")}
    b_sha = readers.file_sha256(str(tmp_path / "b" / "vol.nii.gz"))
    assert sorted(entries) == sorted(["vol", f"vol-{b_sha[:8]}"])
    assert entries["vol"]["source"] == str(tmp_path / "a" / "vol.nii.gz")
    for entry in entries.values():  # the suffixed id falls back to its base name `vol`
        assert (entry["subject"], entry["licence"], entry["split"]) == ("patient-7", "CC-BY-4.0", "train")

    subjects_json = tmp_path / "subjects.json"
    subjects_json.write_text(json.dumps({f"vol-{b_sha[:8]}": "patient-9"}))
    assert ingest.load_subjects(str(subjects_json)) == {f"vol-{b_sha[:8]}": "patient-9"}
    subjects_json.write_text("{broken")
    with pytest.raises(ingest.FatalError, match="subjects.json:1"):
        ingest.load_subjects(str(subjects_json))


@pytest.mark.slow
def test_cli_subprocess_with_workers(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(2):
        _save_nifti(raw / f"p{i}.nii.gz", _phantom(seed=i))
    _save_nifti(raw / "p0_seg.nii.gz", (_phantom(seed=0) > 300).astype(np.uint8))
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    command = [sys.executable, "-m", "data_prep.ingest", "--input", str(raw), "--output", str(tmp_path / "out"),
               "--workers", "2", "--spacing", "2"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ingest: 2/2" in result.stderr  # the progress line
    entries = {e["id"]: e for e in vs.read_manifest(tmp_path / "out")}
    assert sorted(entries) == ["p0", "p1"] and entries["p0"]["label_path"] == "labels/p0.zarr"
    assert entries["p1"]["spacing"] == [2.0, 2.0, 2.0]

    help_text = subprocess.run([sys.executable, "-m", "data_prep.ingest", "--help"], capture_output=True,
                               text=True, env=env, cwd=REPO_ROOT, timeout=60)
    assert help_text.returncode == 0 and "--spacing" in help_text.stdout
