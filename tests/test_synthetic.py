"""Synthetic CT phantoms: determinism, HU per structure, world-space anatomy, files and CLI behaviour."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from data_prep import synthetic

SMALL = (32, 64, 64)  # enough voxels for every organ, fast to write


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms")
    synthetic.write_phantoms(out, count=4, seed=7, shape=SMALL, progress=False)
    return out


@pytest.fixture(scope="module")
def full_size_phantom():
    return synthetic.make_phantom(seed=0, index=0)


def test_same_seed_same_volume_other_seed_differs():
    a = synthetic.make_phantom(3, 1, SMALL)
    b = synthetic.make_phantom(3, 1, SMALL)
    np.testing.assert_array_equal(a.hu, b.hu)
    np.testing.assert_array_equal(a.label, b.label)
    assert (a.spacing, a.origin_lps, a.orientation) == (b.spacing, b.origin_lps, b.orientation)
    other_seed, other_index = synthetic.make_phantom(4, 1, SMALL), synthetic.make_phantom(3, 2, SMALL)
    for other in (other_seed, other_index):
        assert other.spacing != a.spacing
        assert other.label.shape == a.label.shape and not np.array_equal(other.label, a.label)


def test_written_files_are_byte_identical_for_the_same_seed(phantom_dir, tmp_path):
    synthetic.write_phantoms(tmp_path, count=4, seed=7, shape=SMALL, progress=False)
    names = sorted(p.name for p in phantom_dir.iterdir())
    assert names == sorted(p.name for p in tmp_path.iterdir())
    for name in names:
        assert (phantom_dir / name).read_bytes() == (tmp_path / name).read_bytes(), name


def test_hounsfield_units_per_structure(full_size_phantom):
    hu, label = full_size_phantom.hu, full_size_phantom.label
    assert hu.dtype == np.int16 and label.dtype == np.uint8 and hu.shape == label.shape == synthetic.DEFAULT_SHAPE

    def median(*names):
        mask = np.isin(label, [k for k, v in synthetic.LABELS.items() if v in names])
        assert mask.sum() > 50, names
        return float(np.median(hu[mask]))

    assert abs(median("background") + 1000) < 25
    assert -900 < median("lung_left", "lung_right") < -780
    assert -130 < median("fat") < -70
    assert 20 < median("muscle") < 60
    assert 45 < median("liver") < 75
    assert 35 < median("spleen") < 65
    assert median("vertebrae") > 300 and median("ribs") > 300
    assert hu.min() >= -1024 and hu.max() <= 3071
    # The body is tissue (> -500 HU) and the air around it is not.
    body = label > 0
    lungs = np.isin(label, [4, 5])
    assert np.mean(hu[body & ~lungs] > -500) > 0.97 and np.mean(hu[~body] < -500) > 0.99


def test_lesions_stay_inside_organs_and_can_be_switched_off():
    with_lesions = [synthetic.make_phantom(1, i, SMALL) for i in range(3)]
    assert all((p.label == 14).any() for p in with_lesions)
    without = synthetic.make_phantom(1, 0, SMALL, lesions=False)
    assert not (without.label == 14).any()
    # Every lesion voxel replaced an organ voxel of the lesion-free twin (same draws up to the lesions).
    organs = [6, 7, 8, 9, 4, 5]
    assert np.isin(without.label[with_lesions[0].label == 14], organs).all()


def _world_centroid(image: nib.Nifti1Image, mask: np.ndarray) -> np.ndarray:
    ijk = np.argwhere(mask)
    return nib.affines.apply_affine(image.affine, ijk).mean(axis=0)  # RAS+ mm: +x is the patient's right


def test_anatomy_is_correct_in_world_space_for_every_storage_order(phantom_dir):
    labels = {int(k): v for k, v in json.loads((phantom_dir / "labels.json").read_text()).items()}
    assert labels == synthetic.LABELS
    index = {v: k for k, v in labels.items()}
    orientations = []
    for i in range(4):
        image = nib.load(phantom_dir / f"phantom_{i:03d}.nii.gz")
        label_image = nib.load(phantom_dir / f"phantom_{i:03d}_label.nii.gz")
        assert image.get_data_dtype() == np.int16 and label_image.get_data_dtype() == np.uint8
        assert image.shape == label_image.shape
        np.testing.assert_array_equal(image.affine, label_image.affine)
        orientations.append("".join(nib.aff2axcodes(image.affine)))
        label = np.asarray(label_image.dataobj)

        def x_right(name):
            return _world_centroid(label_image, label == index[name])[0]

        def z_up(name):
            return _world_centroid(label_image, label == index[name])[2]

        body_x = _world_centroid(label_image, label > 0)[0]
        assert x_right("liver") > body_x > x_right("spleen"), orientations[-1]
        assert x_right("lung_right") > body_x > x_right("lung_left")
        assert x_right("kidney_right") > body_x > x_right("kidney_left")
        assert x_right("heart") < body_x  # the heart sits slightly left
        assert z_up("lung_right") > z_up("liver") and z_up("heart") > z_up("kidney_left")
        # The image's HU agree with its label map voxel for voxel (same grid).
        hu = np.asarray(image.dataobj)
        assert np.median(hu[label == index["liver"]]) > 30 and np.median(hu[label == index["lung_left"]]) < -700
    assert orientations == list(synthetic.ORIENTATIONS)
    assert len({tuple(np.diag(nib.load(phantom_dir / f"phantom_{i:03d}.nii.gz").affine)) for i in range(4)}) == 4


def test_cli_writes_refuses_to_overwrite_and_overwrites_on_request(tmp_path, capsys):
    argv = ["--output", str(tmp_path), "--count", "2", "--seed", "5", "--shape", "16,48,48",
            "--spacing", "6,7,7", "--no-lesions"]
    assert synthetic.main(argv) == 0
    image = nib.load(tmp_path / "phantom_001.nii.gz")
    assert image.shape == (48, 48, 16) and np.allclose(nib.affines.voxel_sizes(image.affine), (7, 7, 6))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(before) == {"phantom_000.nii.gz", "phantom_000_label.nii.gz", "phantom_001.nii.gz",
                           "phantom_001_label.nii.gz", "labels.json"}

    assert synthetic.main(argv) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before

    assert synthetic.main(argv + ["--overwrite"]) == 0
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        synthetic.main(["--help"])
    assert e.value.code == 0 and "--no-lesions" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        synthetic.main(["--output", str(tmp_path), "--count", "1", "--shape", "16,48"])
    assert e.value.code == 2
    assert synthetic.main(["--output", str(tmp_path), "--count", "0"]) == 1
    assert synthetic.main(["--output", str(tmp_path), "--count", "1", "--spacing", "1,0,1"]) == 1
    assert synthetic.main(["--output", str(tmp_path), "--count", "1", "--spacing", "1,nan,1"]) == 1
    assert not any(tmp_path.iterdir())
