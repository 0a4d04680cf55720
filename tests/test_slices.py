"""Stage-1 slice builder: body filter, field-of-view geometry, record layout, index.json, failure handling."""
from __future__ import annotations

import hashlib
import json
import pathlib

import grain
import numpy as np
import pytest

from data_prep import slices
from flexict_jax.data import records, volume_store

SIZE = 96  # small output for speed; the geometry is the same at 384
PIXEL_MM = 342.0 / SIZE

# box_a: an air volume with a soft-tissue box of known size in slices 2..9 only, off the grid centre, on an
# anisotropic in-plane grid. box_b: a water cylinder in every slice. Between them a corrupt and a missing volume.
BOX_A = dict(shape=(12, 90, 110), spacing=(2.0, 1.5, 2.5), origin_lps=(-120.0, -80.0, -300.0))
BOX_A_Z = range(2, 10)
BOX_A_Y, BOX_A_X = slice(20, 80), slice(40, 104)  # 60 x 1.5 = 90 mm (A-P), 64 x 2.5 = 160 mm (L-R)
BOX_B = dict(shape=(6, 64, 64), spacing=(3.0, 3.0, 3.0), origin_lps=(-90.0, -90.0, 40.0))
CYLINDER_RADIUS_MM = 75.0


def _entry(volume_id: str, subject: str, split: str, shape, spacing, origin_lps) -> dict:
    return {"id": volume_id, "path": f"volumes/{volume_id}.zarr", "label_path": None, "shape": list(shape),
            "spacing": list(spacing), "origin_lps": list(origin_lps), "subject": subject, "source": "test",
            "source_sha256": "0" * 64, "split": split}


def _box_a() -> np.ndarray:
    volume = np.full(BOX_A["shape"], -1000, np.int16)
    volume[BOX_A_Z.start:BOX_A_Z.stop, BOX_A_Y, BOX_A_X] = 40
    return volume


def _box_b() -> np.ndarray:
    z, y, x = np.indices(BOX_B["shape"])
    inside = ((y - 31.5) * 3.0) ** 2 + ((x - 31.5) * 3.0) ** 2 <= CYLINDER_RADIUS_MM ** 2
    return np.where(inside, 0, -1000).astype(np.int16)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("dataset")
    bad = _entry("bad", "s9", "train", (8, 32, 32), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    volume_store.write_volume(root / "volumes/box_a.zarr", _box_a(), {})
    volume_store.write_volume(root / "volumes/bad.zarr", np.zeros(bad["shape"], np.int16), {})
    volume_store.write_volume(root / "volumes/box_b.zarr", _box_b(), {})
    # Corrupt the stored chunks of "bad" (its metadata stays valid, so only reading the voxels fails).
    for shard in (root / "volumes/bad.zarr").rglob("*"):
        if shard.is_file() and shard.name != "zarr.json":
            shard.write_bytes(b"\x00 not a shard \xff" * 64)
    entries = [_entry("box_a", "s1", "train", **BOX_A), bad, _entry("box_b", "s2", "val", **BOX_B),
               _entry("missing", "s3", "train", (4, 16, 16), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)),
               dict(_entry("wrong_shape", "s4", "train", **dict(BOX_B, shape=(7, 64, 64))),
                    path="volumes/box_b.zarr")]
    (root / volume_store.MANIFEST_NAME).write_text("".join(json.dumps(e) + "\n" for e in entries))
    return root


@pytest.fixture(scope="module")
def built(dataset, tmp_path_factory):
    """(exit status, slices dir, index) of the CLI over the whole dataset, 5 records per shard."""
    output = tmp_path_factory.mktemp("built") / "slices"
    status = slices.main(["--dataset", str(dataset), "--output", str(output), "--size", str(SIZE),
                          "--records-per-shard", "5"])
    return status, output, json.loads((output / "index.json").read_text())


def _read_all(output: pathlib.Path, index: dict) -> list[tuple[np.ndarray, dict]]:
    source = grain.sources.ArrayRecordDataSource([str(output / s) for s in index["shards"]])
    return [records.decode_array(source[i]) for i in range(len(source))]


def test_unreadable_volumes_are_skipped_with_their_reason(built):
    status, _, index = built
    assert status == 2  # written, but some volumes were skipped
    reasons = {s["id"]: s["reason"] for s in index["skipped"]}
    assert list(reasons) == ["bad", "missing", "wrong_shape"]
    assert "bad.zarr" in reasons["bad"] and "missing.zarr" in reasons["missing"]
    assert "box_b.zarr: stored shape [6, 64, 64] differs from the manifest shape [7, 64, 64]" in reasons["wrong_shape"]
    assert list(index["volumes"]) == ["box_a", "box_b"]


def test_records_are_the_body_slices_in_manifest_then_z_order(built):
    _, output, index = built
    decoded = _read_all(output, index)
    order = [(meta["volume_id"], meta["z_index"]) for _, meta in decoded]
    # Air-only slices 0, 1, 10 and 11 of box_a are filtered; every slice of box_b has body.
    assert order == [("box_a", z) for z in BOX_A_Z] + [("box_b", z) for z in range(BOX_B["shape"][0])]
    assert index["num_records"] == len(decoded) == 14
    assert index["slices_below_body_fraction"] == 4


def test_record_layout_and_metadata(built):
    _, output, index = built
    for image, meta in _read_all(output, index):
        assert image.shape == (SIZE, SIZE) and image.dtype == np.int16
        spec = BOX_A if meta["volume_id"] == "box_a" else BOX_B
        assert meta["subject"] == {"box_a": "s1", "box_b": "s2"}[meta["volume_id"]]
        assert meta["split"] == {"box_a": "train", "box_b": "val"}[meta["volume_id"]]
        assert meta["z_mm"] == pytest.approx(spec["origin_lps"][2] + meta["z_index"] * spec["spacing"][0])
        assert meta["pixel_spacing_mm"] == pytest.approx(PIXEL_MM) and meta["fov_mm"] == 342.0
        assert meta["body_fraction"] == pytest.approx(np.mean(image > -500), abs=0.01)
        assert meta["body_fraction"] >= 0.05
        assert image.min() >= -1000 and image.max() <= 40


def _extent_mm(mask: np.ndarray, axis: int) -> float:
    return mask.any(axis=axis).sum() * PIXEL_MM


def test_field_of_view_is_centred_on_the_body_and_spacing_is_honest(built):
    _, output, index = built
    for image, meta in _read_all(output, index):
        body = image > -500
        rows, cols = np.nonzero(body)
        # Centred on the body (the box sits off the grid centre, on an anisotropic grid) and fully inside.
        assert abs(rows.mean() - (SIZE - 1) / 2) <= 1.0 and abs(cols.mean() - (SIZE - 1) / 2) <= 1.0
        assert not body[0].any() and not body[-1].any() and not body[:, 0].any() and not body[:, -1].any()
        if meta["volume_id"] == "box_a":  # 90 mm anterior-posterior (rows) x 160 mm left-right (columns)
            assert _extent_mm(body, axis=1) == pytest.approx(90.0, abs=PIXEL_MM)
            assert _extent_mm(body, axis=0) == pytest.approx(160.0, abs=PIXEL_MM)
            assert np.median(image[body]) == 40  # the interior keeps its HU
        else:
            area_mm2 = body.sum() * PIXEL_MM ** 2
            assert area_mm2 == pytest.approx(np.pi * CYLINDER_RADIUS_MM ** 2, rel=0.05)


def test_index_is_consistent_with_the_shards(built, dataset):
    _, output, index = built
    assert index["format"] == "flexict_slices/1"
    assert index["shards"] == [f"slices-{i:05d}-of-00003.array_record" for i in range(3)]
    assert sorted(p.name for p in output.iterdir()) == sorted(index["shards"] + ["index.json"])
    assert (index["size"], index["fov_mm"], index["pixel_spacing_mm"]) == (SIZE, 342.0, pytest.approx(PIXEL_MM))
    assert index["dataset"] == str(dataset.resolve())
    manifest = (dataset / "manifest.jsonl").read_bytes()
    assert index["manifest_sha256"] == hashlib.sha256(manifest).hexdigest()
    assert index["volumes"] == {"box_a": {"subject": "s1", "num_slices": 8, "first_record": 0},
                                "box_b": {"subject": "s2", "num_slices": 6, "first_record": 8}}
    assert sum(v["num_slices"] for v in index["volumes"].values()) == index["num_records"]
    # The reader the training pipeline uses accepts the directory.
    from flexict_jax.data import slice_source
    assert len(slice_source.open_slice_source(output)) == index["num_records"]
    assert not list(output.parent.glob(".*"))  # no temporary directory left behind


def test_every_split_and_crop(dataset, tmp_path):
    index = slices.build_slices(dataset, tmp_path / "every", slices.SliceOptions(size=SIZE, every=2),
                                progress=False)
    assert [(v, d["num_slices"]) for v, d in index["volumes"].items()] == [("box_a", 4), ("box_b", 3)]
    zs = [meta["z_index"] for _, meta in _read_all(tmp_path / "every", index)]
    assert zs == [2, 4, 6, 8, 0, 2, 4]

    assert slices.main(["--dataset", str(dataset), "--output", str(tmp_path / "val"), "--size", "32",
                        "--split", "val"]) == 0
    index = json.loads((tmp_path / "val" / "index.json").read_text())
    assert list(index["volumes"]) == ["box_b"] and index["skipped"] == [] and index["split"] == "val"

    # A field of view narrower than the body crops it: the box then fills the frame left to right.
    narrow = slices.SliceOptions(fov_mm=100.0, size=50, min_body_fraction=0.5)
    index = slices.build_slices(dataset, tmp_path / "narrow", narrow, split="train", progress=False)
    image, meta = _read_all(tmp_path / "narrow", index)[0]
    assert meta["pixel_spacing_mm"] == 2.0 and (image[:, 0] == 40).sum() > 40


def test_output_is_never_replaced_without_overwrite(built, dataset, tmp_path):
    _, output, _ = built
    before = {p.name: p.read_bytes() for p in output.iterdir()}
    args = ["--dataset", str(dataset), "--output", str(output), "--size", "32"]
    assert slices.main(args) == 1
    assert {p.name: p.read_bytes() for p in output.iterdir()} == before

    user_dir = tmp_path / "precious"
    user_dir.mkdir()
    (user_dir / "notes.txt").write_text("keep me")
    assert slices.main(["--dataset", str(dataset), "--output", str(user_dir), "--overwrite"]) == 1
    assert [p.name for p in user_dir.iterdir()] == ["notes.txt"]

    replaced = tmp_path / "replaced"
    assert slices.main(["--dataset", str(dataset), "--output", str(replaced), "--size", "32"]) == 2
    assert slices.main(["--dataset", str(dataset), "--output", str(replaced), "--size", "48", "--overwrite"]) == 2
    assert json.loads((replaced / "index.json").read_text())["size"] == 48
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious", "replaced"]


def test_fatal_errors_exit_1_and_write_nothing(dataset, tmp_path, capsys):
    assert slices.main(["--dataset", str(tmp_path / "nowhere"), "--output", str(tmp_path / "a")]) == 1
    assert "manifest" in capsys.readouterr().err
    # Nothing passes a body fraction of 1: no output directory, no temporary left.
    assert slices.main(["--dataset", str(dataset), "--output", str(tmp_path / "b"), "--size", "32",
                        "--min-body-fraction", "1.0"]) == 1
    assert "no slice written" in capsys.readouterr().err
    assert slices.main(["--dataset", str(dataset), "--output", str(tmp_path / "c"), "--split", "test"]) == 1
    assert slices.main(["--dataset", str(dataset), "--output", str(tmp_path / "d"), "--every", "0"]) == 1
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SystemExit) as e:
        slices.main(["--help"])
    assert e.value.code == 0 and "--min-body-fraction" in capsys.readouterr().out


@pytest.mark.slow
def test_parallel_workers_write_the_same_records(dataset, built, tmp_path):
    _, output, index = built
    parallel = slices.build_slices(dataset, tmp_path / "parallel", slices.SliceOptions(size=SIZE),
                                   records_per_shard=5, workers=2, progress=False)
    assert parallel["volumes"] == index["volumes"] and parallel["skipped"] == index["skipped"]
    for name in index["shards"]:
        assert (tmp_path / "parallel" / name).read_bytes() == (output / name).read_bytes()


def _centroid_offset_px(image: np.ndarray) -> float:
    rows, cols = np.nonzero(image > -500)
    return float(np.hypot(rows.mean() - (image.shape[0] - 1) / 2, cols.mean() - (image.shape[1] - 1) / 2))


def test_synthetic_phantoms_through_ingest_and_slices(tmp_path):
    from data_prep import ingest, synthetic
    synthetic.write_phantoms(tmp_path / "raw", count=4, seed=11, shape=(24, 64, 64), progress=False)
    dataset, output = tmp_path / "dataset", tmp_path / "slices"
    assert ingest.main(["--input", str(tmp_path / "raw"), "--output", str(dataset), "--spacing", "native"]) == 0
    assert slices.main(["--dataset", str(dataset), "--output", str(output), "--size", "64"]) == 0
    index = json.loads((output / "index.json").read_text())
    entries = {e["id"]: e for e in volume_store.read_manifest(dataset)}
    assert list(index["volumes"]) == list(entries) and len(entries) == 4 and index["skipped"] == []
    # The phantoms have body in every slice, so every slice is kept.
    assert index["num_records"] == sum(e["shape"][0] for e in entries.values())
    by_volume: dict[str, list] = {}
    for image, meta in _read_all(output, index):
        by_volume.setdefault(meta["volume_id"], []).append((image, meta))
        assert _centroid_offset_px(image) < 2.0
    for volume_id, items in by_volume.items():
        entry = entries[volume_id]
        assert [m["z_index"] for _, m in items] == list(range(entry["shape"][0]))
        z_mm = np.array([m["z_mm"] for _, m in items])
        np.testing.assert_allclose(z_mm, entry["origin_lps"][2] + np.arange(len(items)) * entry["spacing"][0])
        # Whatever the NIfTI storage order, superior is up: the lungs are in the upper slices.
        lung_pixels = np.array([np.sum(image < -700) - np.sum(image < -950) for image, _ in items])
        assert z_mm[np.argmax(lung_pixels)] > np.median(z_mm), volume_id


def test_real_ct_abdomen_slices(ct_dir, tmp_path):
    from data_prep import ingest
    dataset, output = tmp_path / "dataset", tmp_path / "slices"
    source = ct_dir / "ts_example_ct.nii.gz"  # abdomen + pelvis, 122 x 101 x 112 at 3 mm, RAS
    assert ingest.main(["--input", str(source), "--output", str(dataset), "--spacing", "native"]) == 0
    assert slices.main(["--dataset", str(dataset), "--output", str(output), "--size", "128"]) == 0
    index = json.loads((output / "index.json").read_text())
    (entry,) = volume_store.read_manifest(dataset)
    assert entry["shape"] == [112, 101, 122]
    # Every slice of this abdomen/pelvis scan has body, so the body-content filter keeps them all.
    assert index["num_records"] == 112 and index["slices_below_body_fraction"] == 0
    for image, meta in _read_all(output, index):
        assert image.shape == (128, 128) and meta["pixel_spacing_mm"] == pytest.approx(342 / 128)
        assert meta["body_fraction"] > 0.3
        body = image[image > -500]
        assert -150 < np.median(body) < 150  # soft tissue, not air or bone
        assert _centroid_offset_px(image) < 0.15 * 128
        # The scan's own field of view (303 mm A-P) is narrower than 342 mm: the rows beyond it are padding.
        assert (image[0] == -1000).all() and (image[-1] == -1000).all()
