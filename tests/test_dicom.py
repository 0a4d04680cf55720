"""The DICOM series reader on the real JPEG 2000 series ../shared/data/dicom/ts_torso_20 and broken copies."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pydicom
import pytest

from data_prep import ingest
from flexict_jax.data import volume_store as vs
from flexict_jax.imaging import dicom, geometry, readers


@pytest.fixture(scope="module")
def series_files(dicom_dir) -> list:
    """The 20 files ordered by ImagePositionPatient z, inferior first (data README table)."""
    files = sorted((dicom_dir / "ts_torso_20").iterdir())
    return sorted(files, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))


def _copy_series(files, folder, edit=None) -> list:
    """Copies `files` into `folder`; `edit(index, dataset)` may change a copy's header before it is saved."""
    folder.mkdir(parents=True)
    copies = []
    for i, path in enumerate(files):
        target = folder / path.name
        if edit is None:
            shutil.copy(path, target)
        else:
            ds = pydicom.dcmread(path)
            edit(i, ds)
            ds.save_as(target)
        copies.append(target)
    return copies


def _series(folder) -> dicom.DicomSeries:
    series, damaged, _ = dicom.find_series(sorted(folder.iterdir()))
    assert len(series) == 1 and not damaged
    return series[0]


def test_reader_reproduces_reference_conversion(dicom_dir, ct_dir):
    """README note 3: the series must give the world geometry and HU of ct/ts_torso_20.nii.gz."""
    series = _series(dicom_dir / "ts_torso_20")
    volume = dicom.read_series(series)
    reference = readers.read_nifti(ct_dir / "ts_torso_20.nii.gz")
    assert volume.array.shape == (20, 512, 512)
    # Slice step from the positions (2 mm), not SliceThickness (3 mm); pixels 0.9765625 mm.
    np.testing.assert_allclose(np.linalg.norm(volume.affine[:3, :3], axis=0), [2.0, 0.9765625, 0.9765625])
    assert geometry.orientation_code(volume.affine) == "SPL"  # (slice, row, column) of IOP 1,0,0,0,1,0

    got, got_grid = geometry.reorient(volume.array, volume.affine)
    expected, expected_grid = geometry.reorient(reference.array, reference.affine)
    assert got_grid.same_as(expected_grid)
    np.testing.assert_array_equal(got, expected)
    assert got.min() == -1024 and got.max() == 1839  # RescaleIntercept -1024 applied (README)
    # The same voxel through both affines lands on the same world point.
    corner_dicom = volume.affine @ [19, 511, 0, 1]   # top slice, last row, first column
    corner_nifti = reference.affine @ [0, 0, 19, 1]  # LAS: j flipped relative to the DICOM rows
    np.testing.assert_allclose(corner_dicom, corner_nifti, atol=1e-4)


def test_series_hash_is_the_readme_checksum(dicom_dir):
    assert dicom.series_sha256(_series(dicom_dir / "ts_torso_20")) == (
        "cb296a70a6457e000d4244a78eec9240766a55f4aaf7b41682619bc30d617810")


def _refusal(folder) -> str:
    with pytest.raises(readers.SourceError) as error:
        dicom.read_series(_series(folder))
    return str(error.value)


def test_missing_slice_is_refused(series_files, tmp_path):
    files = series_files[:10] + series_files[11:]
    _copy_series(files, tmp_path / "missing")
    message = _refusal(tmp_path / "missing")
    assert str(tmp_path / "missing") in message and "missing slice" in message
    assert files[9].name in message and files[10].name in message  # the gap is named
    assert "step 4.000 mm" in message


def test_duplicate_position_is_refused(series_files, tmp_path):
    def duplicate(i, ds):
        if i == 7:
            ds.ImagePositionPatient = list(pydicom.dcmread(series_files[6]).ImagePositionPatient)

    _copy_series(series_files, tmp_path / "dup", duplicate)
    message = _refusal(tmp_path / "dup")
    assert "duplicate slice position -792.500 mm" in message
    assert series_files[6].name in message and series_files[7].name in message


def test_mixed_orientation_is_refused(series_files, tmp_path):
    def rotate(i, ds):
        if i == 5:
            ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # a coronal slice in an axial series

    _copy_series(series_files, tmp_path / "mixed", rotate)
    message = _refusal(tmp_path / "mixed")
    assert "mixed orientations" in message and series_files[5].name in message


def test_gantry_tilt_is_refused(series_files, tmp_path):
    def tilt(i, ds):  # positions step 0.5 mm posterior per 2 mm slice: a 14 degree tilted stack
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 0.5 * i, z]

    _copy_series(series_files, tmp_path / "tilt", tilt)
    assert "gantry tilt" in _refusal(tmp_path / "tilt")


def test_non_ct_modality_is_refused(series_files, tmp_path):
    def to_mr(i, ds):
        ds.Modality = "MR"

    _copy_series(series_files[:3], tmp_path / "mr", to_mr)
    assert "Modality is 'MR', not CT" in _refusal(tmp_path / "mr")


def test_series_sharing_a_folder_are_split_by_uid(series_files, tmp_path):
    def assign_uid(i, ds):
        ds.SeriesInstanceUID = "1.2.3.4" if i < 10 else "1.2.3.5"

    _copy_series(series_files, tmp_path / "two", assign_uid)
    series, _, others = dicom.find_series(sorted((tmp_path / "two").iterdir()))
    assert [(s.uid, len(s.files)) for s in series] == [("1.2.3.4", 10), ("1.2.3.5", 10)]
    assert others == []
    candidates, problems, _ = ingest.discover([str(tmp_path / "two")], str(tmp_path / "out"))
    assert [c.name for c in candidates] == ["1.2.3.4", "1.2.3.5"] and not problems


def test_ingest_refuses_a_broken_series_and_writes_the_rest(series_files, dicom_dir, tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    os.symlink(dicom_dir / "ts_torso_20", raw / "good")
    shutil.copy(dicom_dir / "ts_torso_20_label.nii.gz", raw / "good_label.nii.gz")
    _copy_series(series_files[:10] + series_files[11:], raw / "gap")
    code = ingest.main(["--input", str(raw / "good"), str(raw / "gap"), "--output", str(tmp_path / "out"),
                        "--spacing", "4"])
    err = capsys.readouterr().err
    assert code == ingest.EXIT_REFUSED
    assert f"refused: {raw / 'gap'}: non-uniform slice positions (missing slice?)" in err
    (entry,) = vs.read_manifest(tmp_path / "out")
    assert entry["id"] == "good" and entry["label_path"] == "labels/good.zarr"
    assert entry["shape"] == [10, 125, 125] and entry["spacing"] == [4.0, 4.0, 4.0]  # 40 mm x 500 mm FOV
    labels = vs.open_volume(tmp_path / "out" / entry["label_path"]).read().result()
    liver, spleen = np.argwhere(labels == 5)[:, 2].mean(), np.argwhere(labels == 1)[:, 2].mean()
    assert liver < spleen  # x grows toward patient left: the liver (patient right) has the smaller x


# --- the transfer syntaxes PACS exports use, gantry tilt, enhanced CT, parallel discovery ----------------------

def _reencode(files, folder, syntax) -> None:
    """The series re-encoded (imagecodecs' encoders) with `syntax`: JPEG Lossless SV1 and JPEG-LS keep every
    12-bit value; JPEG baseline is 8-bit, so it stores value >> 4 with RescaleSlope 16."""
    imagecodecs = pytest.importorskip("imagecodecs", reason="imagecodecs encodes the test series")
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit, JPEGLosslessSV1, JPEGLSLossless

    encode = {JPEGLosslessSV1: lambda a: imagecodecs.jpeg8_encode(a, lossless=True, predictor=1, bitspersample=12),
              JPEGLSLossless: lambda a: imagecodecs.jpegls_encode(a, level=0),
              JPEGBaseline8Bit: lambda a: imagecodecs.jpeg8_encode((a >> 4).astype(np.uint8), level=95)}[syntax]

    def edit(i, ds):
        pixels = ds.pixel_array
        ds.PixelData = encapsulate([encode(pixels)])
        ds.file_meta.TransferSyntaxUID = syntax
        if syntax == JPEGBaseline8Bit:
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
            ds.RescaleSlope = 16

    _copy_series(files, folder, edit)


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.50"],
                         ids=["jpeg-lossless-sv1", "jpeg-ls", "jpeg-baseline"])
def test_jpeg_series_decode_like_the_original(series_files, dicom_dir, tmp_path, syntax):
    _reencode(series_files, tmp_path / "jpeg", syntax)
    assert str(pydicom.dcmread(next((tmp_path / "jpeg").iterdir())).file_meta.TransferSyntaxUID) == syntax
    original = dicom.read_series(_series(dicom_dir / "ts_torso_20"))
    decoded = dicom.read_series(_series(tmp_path / "jpeg"))
    np.testing.assert_array_equal(decoded.affine, original.affine)
    if syntax == "1.2.840.10008.1.2.4.50":  # lossy, 8 bits: within a few quantisation steps of 16 HU
        error = np.abs(decoded.array - original.array)
        assert error.mean() < 16 and error.max() <= 16 * 16
    else:  # lossless: voxel for voxel
        np.testing.assert_array_equal(decoded.array, original.array)


def test_gantry_tilt_resampled_onto_the_orthogonal_grid(series_files, dicom_dir, tmp_path):
    """Each slice 1 pixel further posterior than the one below (a 26° tilt at 2 mm steps): the sheared affine
    maps every slice's first voxel to its ImagePositionPatient, and on an LPS grid aligned with the first slice
    output voxel (z, y, x) is source voxel (z, y - z, x) exactly."""
    original = dicom.read_series(_series(dicom_dir / "ts_torso_20"))
    pixel = float(original.affine[1, 1])  # IOP 1,0,0,0,1,0: rows advance toward P

    def tilt(i, ds):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + pixel * i, z]

    _copy_series(series_files, tmp_path / "tilt", tilt)
    assert "--gantry-tilt=resample" in _refusal(tmp_path / "tilt")
    tilted = dicom.read_series(_series(tmp_path / "tilt"), gantry_tilt="resample")
    for k, path in enumerate(series_files):
        position = pydicom.dcmread(tmp_path / "tilt" / path.name).ImagePositionPatient
        np.testing.assert_allclose(tilted.affine @ [k, 0, 0, 1], [*map(float, position), 1])
    first = tilted.affine[:3, 3]
    grid = geometry.Grid(shape=(20, 531, 512), spacing=(2.0, pixel, pixel), origin_lps=tuple(first))
    out = geometry.resample(tilted.array, tilted.affine, grid, order=1, fill=-1024)
    for z in (0, 7, 19):
        np.testing.assert_allclose(out[z, z:z + 512], original.array[z], atol=1e-3)
        assert (out[z, :z] == -1024).all()


def test_ingest_resamples_a_tilted_series_when_asked(series_files, tmp_path, capsys):
    def tilt(i, ds):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 0.5 * i, z]

    _copy_series(series_files, tmp_path / "raw" / "tilt", tilt)
    argv = ["--input", str(tmp_path / "raw"), "--output", str(tmp_path / "out"), "--spacing", "4"]
    assert ingest.main(argv) == ingest.EXIT_FATAL and "gantry tilt" in capsys.readouterr().err
    assert ingest.main(argv + ["--gantry-tilt", "resample"]) == 0
    (entry,) = vs.read_manifest(tmp_path / "out")
    assert entry["spacing"] == [4.0, 4.0, 4.0] and entry["shape"][0] == 10


def test_enhanced_multiframe_ct_is_refused_with_the_reason(series_files, tmp_path):
    def enhanced(i, ds):
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT Image Storage
        ds.NumberOfFrames = 2
        del ds.ImagePositionPatient  # per-frame functional groups hold the positions

    copies = _copy_series(series_files[:1], tmp_path / "enhanced", enhanced)
    series, damaged, others = dicom.find_series(copies)
    assert not series and not others
    assert damaged[0][0] == copies[0] and "enhanced multi-frame CT (2 frames" in damaged[0][1]


@pytest.mark.slow
def test_discovery_in_worker_processes_matches_one_process(series_files, tmp_path, monkeypatch):
    copies = _copy_series(series_files, tmp_path / "series")
    (tmp_path / "series" / "notes.txt").write_text("not DICOM")
    files = copies + [tmp_path / "series" / "notes.txt"]
    monkeypatch.setattr(dicom, "HEADERS_PER_TASK", 4)  # 6 tasks over 2 workers
    assert dicom.find_series(files, workers=2, progress=True) == dicom.find_series(files)
