"""The stored-volume contract: zarr3 layout, atomic writes, attributes and the manifest."""
from __future__ import annotations

import json

import numpy as np
import pytest

from flexict_jax.data import volume_store as vs


def _entry(volume_id: str, label: bool = False) -> dict:
    return {"id": volume_id, "path": f"volumes/{volume_id}.zarr",
            "label_path": f"labels/{volume_id}.zarr" if label else None, "shape": [20, 30, 40],
            "spacing": [2.0, 1.5, 1.0], "origin_lps": [-10.0, 5.0, 100.0], "subject": "s1",
            "source": f"/data/{volume_id}.nii.gz", "source_sha256": "0" * 64}


def test_round_trip_layout_and_attributes(tmp_path):
    rng = np.random.default_rng(0)
    volume = rng.integers(-1024, 3000, size=(20, 101, 300), dtype=np.int16)
    attrs = {"spacing": (2.0, 1.5, 1.0), "origin_lps": [-10.0, 5.0, 100.0], "kind": "image"}
    path = tmp_path / "volumes" / "v.zarr"
    vs.write_volume(path, volume, attrs)

    store = vs.open_volume(path)
    assert store.shape == volume.shape and store.dtype.numpy_dtype == np.int16
    np.testing.assert_array_equal(store[3:7, 10:80, 250:].read().result(), volume[3:7, 10:80, 250:])
    assert vs.read_attributes(str(path)) == {"spacing": [2.0, 1.5, 1.0], "origin_lps": [-10.0, 5.0, 100.0],
                                             "kind": "image", vs.EVERY_CHUNK_STORED: True}

    meta = json.loads((path / "zarr.json").read_text())
    assert meta["dimension_names"] == ["z", "y", "x"]
    # Shard 64x256x256 clipped to a multiple of the chunk; chunk 16x64x64 clipped to the volume.
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [32, 128, 256]
    sharding = meta["codecs"][0]
    assert sharding["name"] == "sharding_indexed"
    assert sharding["configuration"]["chunk_shape"] == [16, 64, 64]
    assert [c["name"] for c in sharding["configuration"]["codecs"]] == ["bytes", "zstd"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["v.zarr"]  # no temporary left behind


def test_label_dtype_and_refusals(tmp_path):
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[1, 2, 3] = 117
    vs.write_volume(tmp_path / "l.zarr", labels, {"kind": "label"})
    assert vs.open_volume(tmp_path / "l.zarr").read().result()[1, 2, 3] == 117

    with pytest.raises(FileExistsError, match="l.zarr"):
        vs.write_volume(tmp_path / "l.zarr", labels, {})
    with pytest.raises(ValueError, match="float32"):
        vs.write_volume(tmp_path / "f.zarr", labels.astype(np.float32), {})
    with pytest.raises(ValueError, match="3D"):
        vs.write_volume(tmp_path / "f.zarr", labels[0], {})
    with pytest.raises(ValueError, match="missing.zarr"):
        vs.open_volume(tmp_path / "missing.zarr")


def test_affine_matches_origin_plus_index_times_spacing():
    spacing, origin = (2.0, 1.5, 0.75), (-10.0, 5.0, 100.0)
    affine = vs.affine_zyx_to_lps(spacing, origin)
    z, y, x = 3, 7, 11
    np.testing.assert_allclose(affine @ [z, y, x, 1], [-10 + x * 0.75, 5 + y * 1.5, 100 + z * 2.0, 1])


def test_manifest_append_and_read(tmp_path):
    vs.write_volume(tmp_path / "volumes" / "a.zarr", np.zeros((2, 2, 2), np.int16), {})
    vs.write_volume(tmp_path / "labels" / "a.zarr", np.zeros((2, 2, 2), np.uint8), {})
    vs.append_manifest(tmp_path, _entry("a", label=True))
    with pytest.raises(FileNotFoundError, match="not committed"):
        vs.append_manifest(tmp_path, _entry("b"))  # its array was never written
    with pytest.raises(ValueError, match="lacks"):
        vs.append_manifest(tmp_path, {"id": "c"})
    assert [e["id"] for e in vs.read_manifest(tmp_path)] == ["a"]
    assert vs.read_manifest(tmp_path)[0]["label_path"] == "labels/a.zarr"


def test_manifest_errors_name_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.jsonl"):
        vs.read_manifest(tmp_path)
    manifest = tmp_path / vs.MANIFEST_NAME
    good = json.dumps(_entry("a"))
    manifest.write_text(good + "\n" + '{"id": "b", "path": "vol' + "\n")
    with pytest.raises(ValueError, match=r"manifest.jsonl:2: corrupt"):
        vs.read_manifest(tmp_path)
    manifest.write_text(good + "\n\n" + json.dumps({"id": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"manifest.jsonl:3: .*lacks"):
        vs.read_manifest(tmp_path)
    manifest.write_text(good + "\n" + good + "\n")
    with pytest.raises(ValueError, match=r"manifest.jsonl:2: duplicate volume id 'a'"):
        vs.read_manifest(tmp_path)
