"""3-D Grain pipeline: shapes, determinism, host split, resume, workers; region reads; exactness of the region
path against upstream's whole-volume order; real CT (inside the body, orientation); phantom anatomy and flips;
stage-3 views; per-volume statistics side-car; errors."""
from __future__ import annotations

import json
import pathlib
import shutil
import threading

import numpy as np
import pytest
from run_utils import assemble_process_batches, assert_batches_equal, assert_resumes, take, take_closing

from configs import stage2, stage3
from data_prep import ingest, synthetic, volume_stats
from flexict_jax.data import crops3d, pipeline3d, volume_source, volume_store
from flexict_jax.data.crops3d import Box, PaddedVolume
from flexict_jax.data.intensity import IntensityDraw, apply_separable, hu_stats, z_score
from flexict_jax.data.volume_source import Volume, VolumeSource

G, L = 32, 16
PATCH_SIZES = (8, 16)
WINDOW = (-1000.0, 1000.0)
LIVER, SPLEEN, LUNGS = 6, 7, (4, 5)  # data_prep.synthetic.LABELS


def build_dataset(raw_inputs, out: pathlib.Path, spacing: str) -> pathlib.Path:
    assert ingest.main(["--input", *map(str, raw_inputs), "--output", str(out), "--spacing", spacing]) == 0
    assert volume_stats.main(["--dataset", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> pathlib.Path:
    """4 synthetic phantoms (stored LPS, RAS, LAS, LPI) ingested at 6 mm: ~35 x 60 x 60 voxels, with labels."""
    raw = tmp_path_factory.mktemp("phantoms_raw")
    synthetic.write_phantoms(raw, count=4, shape=(24, 40, 40), progress=False)
    return build_dataset([raw], tmp_path_factory.mktemp("phantoms") / "ds", "6,6,6")


@pytest.fixture(scope="module")
def real_ct(tmp_path_factory, ct_dir) -> pathlib.Path:
    """Head & neck (vtk_headsq, LPI on disk) and upper abdomen (ts_example_ct_sm, RAS) ingested at 2 mm."""
    return build_dataset([ct_dir / "vtk_headsq.nii.gz", ct_dir / "ts_example_ct_sm.nii.gz"],
                         tmp_path_factory.mktemp("real_ct") / "ds", "2,2,2")


def data_config(dataset, **overrides):
    data = stage2.get_config("tiny").data  # the lead's config: the key names are the contract
    data.dir = str(dataset)
    data.update(dict(global_crop_size=G, local_crop_size=L, global_crop_extent=(16, 32), local_crop_extent=(6, 12),
                     pad_to=40, n_local_crops=2, num_workers=0, read_threads=1, prefetch_buffer_size=2))
    data.update(overrides)
    return data


def plain(data, **overrides):
    """No intensity augmentation and no flips (in place; returns `data`)."""
    data.update(dict(intensity_augment=False, flip_prob=0.0))
    data.update(overrides)
    return data


def build(data, seed=0, batch_size=4, **kwargs):
    return pipeline3d.build_volumes3d_dataset(data, seed=seed, batch_size=batch_size, patch_sizes=PATCH_SIZES, **kwargs)


def whole_volume(dataset, row):
    entry = volume_store.read_manifest(dataset)[row]
    return volume_store.open_volume(pathlib.Path(dataset) / entry["path"])[...].read().result()


# --- the stream -----------------------------------------------------------------------------------------------

def test_batch_shapes_dtypes_and_masks(phantoms):
    b = 4
    batches = take(build(data_config(phantoms), batch_size=b), 2)
    for t, batch in enumerate(batches):
        assert set(batch) == {"global_crops", "local_crops", "masks_p8", "masks_p16", "index", "volume_row"}
        assert batch["global_crops"].shape == (b, 2, G, G, G, 1) and batch["global_crops"].dtype == np.float32
        assert batch["local_crops"].shape == (b, 2, L, L, L, 1) and batch["local_crops"].dtype == np.float32
        assert batch["masks_p8"].shape == (b, 2, 4 ** 3) and batch["masks_p8"].dtype == bool
        assert batch["masks_p16"].shape == (b, 2, 2 ** 3) and batch["masks_p16"].dtype == bool
        assert batch["index"].dtype == np.int64 and batch["volume_row"].dtype == np.int64
        np.testing.assert_array_equal(batch["index"], np.arange(t * b, (t + 1) * b))
        counts = batch["masks_p8"].sum(-1)
        assert (np.count_nonzero(counts, axis=1) == 1).all()  # one of the two global crops, exact count
        assert ((counts.max(1) >= int(0.1 * 64)) & (counts.max(1) <= int(0.5 * 64))).all()
    crops = np.concatenate([x["global_crops"].ravel() for x in batches])
    assert np.isfinite(crops).all() and abs(crops.mean()) < 1.0 and 0.3 < crops.std() < 2.0


def test_every_epoch_visits_every_volume_in_a_new_order(phantoms):
    batches = take(build(data_config(phantoms)), 4)  # 4 volumes: one epoch per batch
    orders = [b["volume_row"].tolist() for b in batches]
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders) and len({tuple(o) for o in orders}) > 1


def test_same_seed_same_batches_different_seed_differs(phantoms):
    data = data_config(phantoms)
    a, b, c = take(build(data, seed=3), 2), take(build(data, seed=3), 2), take(build(data, seed=4), 2)
    assert_batches_equal(a, b)
    assert not np.array_equal(a[0]["global_crops"], c[0]["global_crops"])


def test_process_shards_concatenate_to_the_single_process_batch(phantoms):
    data = data_config(phantoms)
    whole = take(build(data, seed=5, batch_size=4), 2)
    parts = [take(build(data, seed=5, batch_size=2, process_index=p, process_count=2), 2) for p in range(2)]
    assert_batches_equal(whole, assemble_process_batches(parts))


def test_restored_iterator_continues_with_the_next_batches(phantoms):
    assert_resumes(lambda: build(data_config(phantoms), seed=6), skip=1)


@pytest.mark.slow
def test_two_grain_workers_match_in_process(phantoms):
    in_process = take(build(data_config(phantoms), seed=7), 2)
    assert_batches_equal(take_closing(build(data_config(phantoms, num_workers=2), seed=7), 2), in_process)


# --- region reads and their exactness -------------------------------------------------------------------------

class RecordingVolume(Volume):
    """An in-memory volume that records every box it is asked for."""

    def __init__(self, hu):
        super().__init__(0, "recorded", hu.shape, hu_stats(hu, WINDOW), hu)
        self.reads = []

    def read(self, start, stop):
        self.reads.append((tuple(start), tuple(stop)))
        return super().read(start, stop)


def test_a_crop_reads_only_its_box_inside_the_volume():
    hu = np.random.default_rng(0).integers(-1000, 1000, size=(20, 30, 26)).astype(np.int16)
    volume = RecordingVolume(hu)
    padded = PaddedVolume(volume, WINDOW, pad_to=32)  # padded (32, 32, 32), volume at (6, 1, 3)
    assert padded.shape == (32, 32, 32) and padded.before == (6, 1, 3)
    padded.crop(Box((10, 5, 5), (8, 9, 10)), 16)  # inside the volume
    padded.crop(Box((0, 0, 0), (12, 8, 8)), 16)  # partly in the padding
    padded.crop(Box((26, 0, 0), (6, 6, 6)), 16)  # all padding: nothing to read
    assert volume.reads == [((4, 4, 2), (12, 13, 12)), ((0, 0, 0), (6, 7, 5))]
    # Smoothing (σ <= 1: kernel radius 4, 2 and 3 here) grows the read by its band, clipped to the padded volume.
    volume.reads.clear()
    smooth = PaddedVolume(volume, WINDOW, 32, IntensityDraw(smooth_sigma=(1.0, 0.5, 0.7)))
    smooth.crop(Box((10, 5, 5), (8, 9, 10)), 16)
    smooth.crop(Box((0, 0, 0), (12, 8, 8)), 16)
    assert volume.reads == [((0, 2, 0), (16, 15, 15)), ((0, 0, 0), (10, 9, 8))]


@pytest.mark.parametrize("draw", [
    None,
    IntensityDraw(smooth_sigma=(0.5, 1.0, 0.8)),
    IntensityDraw(lowres_zoom=0.6),
    IntensityDraw(smooth_sigma=(1.0, 0.7, 0.6), scale_factor=-0.2, lowres_zoom=0.55),
    IntensityDraw(scale_factor=0.2, contrast_gamma=1.3),
], ids=["plain", "smooth", "lowres", "smooth+scale+lowres", "scale+contrast"])
def test_region_crops_equal_upstreams_whole_volume_order(real_ct, draw):
    # Upstream: z-score -> pad the whole volume with its minimum -> augment the whole volume -> crop -> resize.
    hu = whole_volume(real_ct, 1)  # ts_example_ct_sm, 45 x 152 x 183 at 2 mm
    volume = Volume.from_array(hu, WINDOW)
    pad_to = 64
    shape, before = crops3d.padding(hu.shape, pad_to)
    x = z_score(hu, WINDOW, volume.stats)
    x = np.pad(x, [(b, s - n - b) for b, s, n in zip(before, shape, hu.shape)], constant_values=x.min())
    if draw is not None:
        x = draw.apply(x, None)
    padded = PaddedVolume(volume, WINDOW, pad_to, draw)
    rng = np.random.default_rng(0)
    for extent, size in (((16, 64), 32), ((6, 12), 16)):
        for _ in range(6):
            box = crops3d.random_box(rng, padded.shape, extent)
            expected = x[tuple(slice(s, s + e) for s, e in zip(*box))]
            expected = apply_separable(expected, [crops3d._trilinear_matrix(e, size) for e in box.size])
            np.testing.assert_allclose(padded.crop(box, size), expected, atol=2e-5)


def test_crop_resize_is_torch_trilinear():
    torch = pytest.importorskip("torch")
    hu = np.random.default_rng(1).integers(-1000, 1000, size=(30, 28, 26)).astype(np.int16)
    padded = PaddedVolume(Volume.from_array(hu, WINDOW), WINDOW, pad_to=32)
    for box in (Box((2, 3, 1), (25, 17, 11)), Box((0, 0, 0), (32, 32, 32)), Box((5, 5, 5), (7, 9, 13))):
        region = torch.from_numpy(padded.read(box.start, [s + e for s, e in zip(*box)]))[None, None]
        expected = torch.nn.functional.interpolate(region, size=(20, 20, 20), mode="trilinear",
                                                   align_corners=False)[0, 0].numpy()
        np.testing.assert_allclose(padded.crop(box, 20), expected, atol=1e-5)


# --- real CT --------------------------------------------------------------------------------------------------

def test_real_ct_crops_stay_in_the_body_and_inside_the_padded_volume(real_ct, monkeypatch):
    reads = []
    original = PaddedVolume.read

    def checked_read(self, start, stop):
        assert all(0 <= a < b <= n for a, b, n in zip(start, stop, self.shape)), (start, stop, self.shape)
        reads.append((self.volume.volume_id, [b - a for a, b in zip(start, stop)]))
        return original(self, start, stop)

    monkeypatch.setattr(PaddedVolume, "read", checked_read)
    source = VolumeSource(real_ct, WINDOW)
    abdomen = [row for row in range(len(source)) if source[row].volume_id == "ts_example_ct_sm"][0]
    stats = source[abdomen].stats
    data = plain(data_config(real_ct, pad_to=G))
    hu = []
    for batch in take(build(data, seed=0), 4):
        assert np.isfinite(batch["global_crops"]).all() and np.isfinite(batch["local_crops"]).all()
        crops = batch["global_crops"][batch["volume_row"] == abdomen]
        hu.append(crops * stats.std + stats.mean)
    # A body-filled abdomen (65% of its voxels in the body): crops average far above air.
    assert np.concatenate([h.ravel() for h in hu]).mean() > -600
    # Every region is one crop's box (no augmentation, so no band): at most the global extent. (Grain may
    # prefetch examples beyond the four batches taken, so the count is a lower bound.)
    assert len(reads) >= 4 * 4 * (2 + 2)
    assert all(max(size) <= 32 for _, size in reads)


def test_head_ct_keeps_superior_at_high_z(real_ct):
    # vtk_headsq: nasal cavity / maxilla (superior) down to the neck; stored LPI, so ingest flips it to LPS.
    source = VolumeSource(real_ct, WINDOW)
    head = [row for row in range(len(source)) if source[row].volume_id == "vtk_headsq"][0]
    data = plain(data_config(real_ct, global_crop_size=64, pad_to=64, global_crop_mode="center"))
    batch = take(build(data, seed=0, batch_size=2), 1)[0]
    crop = batch["global_crops"][batch["volume_row"] == head][0, 0, ..., 0]  # centred 64³ of 70 x 102 x 102
    stats = source[head].stats
    np.testing.assert_allclose(crop, z_score(whole_volume(real_ct, head)[3:67, 19:83, 19:83], WINDOW, stats),
                               atol=1e-6)  # the box itself: no axis swapped or reversed
    body = crop * stats.std + stats.mean > -500
    inferior, superior = body[:16].mean(), body[-16:].mean()
    assert superior > inferior + 0.1  # the head is wider than the neck
    # The neck sits posterior (high y) of the face.
    neck_y = np.argwhere(body[:16])[:, 1].mean()
    face_y = np.argwhere(body[-16:])[:, 1].mean()
    assert neck_y > face_y + 3


# --- synthetic anatomy: orientation and flips -----------------------------------------------------------------

def _label_crop(dataset, row, pad_to):
    entry = volume_store.read_manifest(dataset)[row]
    labels = volume_store.open_volume(pathlib.Path(dataset) / entry["label_path"])[...].read().result()
    shape, before = crops3d.padding(labels.shape, pad_to)
    labels = np.pad(labels, [(b, s - n - b) for b, s, n in zip(before, shape, labels.shape)])
    start, size = crops3d.center_box(shape, pad_to)
    return labels[tuple(slice(s, s + e) for s, e in zip(start, size))]


def _centroid(mask):
    return np.argwhere(mask).mean(axis=0)


def test_phantom_anatomy_orientation_and_flip_of_global_crop_one_only(phantoms):
    size = 64  # centre crop = the whole padded volume (phantoms are ~35 x 60 x 60), no resize
    data = plain(data_config(phantoms, global_crop_size=size, pad_to=size, global_crop_mode="center"))
    batch = take(build(data, seed=0), 1)[0]
    stats = VolumeSource(phantoms, WINDOW).stats
    for crops, row in zip(batch["global_crops"][..., 0], batch["volume_row"]):
        labels = _label_crop(phantoms, row, size)
        lungs, liver, spleen = np.isin(labels, LUNGS), labels == LIVER, labels == SPLEEN
        assert _centroid(lungs)[0] > _centroid(liver)[0] + 5  # lungs superior (high z) to the liver
        assert _centroid(liver)[2] < _centroid(spleen)[2] - 5  # liver on the patient's right (low x)
        hu = crops[0] * stats[row].std + stats[row].mean
        assert np.median(hu[lungs]) < -700 and 0 < np.median(hu[liver]) < 120
        np.testing.assert_array_equal(crops[0], crops[1])  # one deterministic box, no flip

    # Recipe §7: RandAxisFlip only on global crop 1 (index 0); both crops are the same box here.
    flipped = take(build(plain(data_config(phantoms, global_crop_size=size, pad_to=size, global_crop_mode="center"),
                               flip_prob=1.0), seed=1, batch_size=8), 1)[0]["global_crops"][..., 0]
    axes = []
    for first, second in flipped:
        matches = [a for a in range(3) if np.array_equal(first, np.flip(second, axis=a))]
        assert len(matches) == 1 and not np.array_equal(first, second)
        axes.append(matches[0])
    assert len(set(axes)) >= 2  # a random axis per crop


def test_no_flip_without_augmentation_keeps_local_crops_unflipped(phantoms):
    # Local crops get RandAxisFlip(flip_prob) each (docs/recipe.md §7); with 0 nothing is flipped, with 1 all are.
    base = plain(data_config(phantoms, n_local_crops=4))
    unflipped = take(build(base, seed=2), 1)[0]["local_crops"]
    flipped = take(build(plain(data_config(phantoms, n_local_crops=4), flip_prob=1.0), seed=2), 1)[0]["local_crops"]
    assert not np.array_equal(unflipped, flipped)


def test_view_region_keeps_every_crop_of_an_example_in_one_cube(phantoms, monkeypatch):
    # data.view_region (the CPU demo, not the recipe): all crops of an example lie in one random cube of that many
    # voxels per axis; the other random streams (here the masks) do not change.
    boxes, caller = [], threading.get_ident()
    original = PaddedVolume.read

    def recording_read(self, start, stop):
        if threading.get_ident() == caller:  # not the prefetch threads an earlier test's stream may have left
            boxes.append((start, stop))
        return original(self, start, stop)

    monkeypatch.setattr(PaddedVolume, "read", recording_read)
    source = VolumeSource(phantoms, WINDOW)
    spans, masks = {}, {}
    for region in (0, 20):
        transform = pipeline3d.volume_views_transform(plain(data_config(phantoms, view_region=region)), seed=0,
                                                      patch_sizes=PATCH_SIZES)
        for index in range(8):
            boxes.clear()
            example = transform.map_with_index(index, source[index % len(source)])
            assert len(boxes) == 2 + 2  # no augmentation: one read per crop, of its box
            starts, stops = np.array([b[0] for b in boxes]), np.array([b[1] for b in boxes])
            spans.setdefault(region, []).append(int((stops.max(axis=0) - starts.min(axis=0)).max()))
            masks.setdefault(region, []).append(example["masks_p8"])
    assert max(spans[20]) <= 20 < max(spans[0])
    np.testing.assert_array_equal(np.stack(masks[20]), np.stack(masks[0]))


# --- stage 3 views --------------------------------------------------------------------------------------------

def test_stage3_image_views(phantoms):
    data = data_config(phantoms, n_local_crops=8, **stage3.STAGE3_IMAGE_VIEWS)
    data.pad_to = G
    batches = take(build(data, seed=0, batch_size=4), 4)
    other = take(build(data, seed=9, batch_size=4), 4)
    by_row = {}
    for batch in batches + other:
        assert batch["global_crops"].shape == (4, 1, G, G, G, 1) and batch["local_crops"].shape == (4, 8, L, L, L, 1)
        for crop, row in zip(batch["global_crops"], batch["volume_row"]):
            by_row.setdefault(int(row), []).append(crop)
    for crops in by_row.values():  # centre crop, no augmentation, no flip: the same whatever the seed
        for crop in crops[1:]:
            np.testing.assert_array_equal(crop, crops[0])
    masked = np.concatenate([b["masks_p8"].any(-1)[:, 0] for b in batches + other])
    assert 0 < masked.mean() < 1  # iBOT on about half of the samples (docs/recipe.md §8)


# --- statistics side-car and errors ---------------------------------------------------------------------------

def test_volume_stats_match_the_whole_volume_and_rerun_skips(real_ct, capsys):
    document = json.loads((real_ct / volume_source.STATS_NAME).read_text())
    section = document["windows"]["-1000,1000"]
    for row, entry in enumerate(volume_store.read_manifest(real_ct)):
        expected = hu_stats(whole_volume(real_ct, row), WINDOW)
        record = section[entry["id"]]
        assert record["source_sha256"] == entry["source_sha256"]
        for key in ("mean", "std", "min", "max"):
            assert record[key] == pytest.approx(getattr(expected, key), rel=1e-9, abs=1e-9)
    capsys.readouterr()
    assert volume_stats.main(["--dataset", str(real_ct)]) == 0
    assert "0 computed, 2 already present" in capsys.readouterr().out


def test_volume_stats_reports_a_bad_volume_and_writes_the_rest(phantoms, tmp_path, capsys):
    dataset = tmp_path / "ds"
    shutil.copytree(phantoms, dataset)
    (dataset / volume_source.STATS_NAME).unlink()
    entries = volume_store.read_manifest(dataset)
    shard = next(p for p in (dataset / entries[1]["path"]).rglob("*") if p.is_file() and p.name != "zarr.json")
    shard.write_bytes(b"\0garbage" * 64)
    assert volume_stats.main(["--dataset", str(dataset), "--hu-window=-1000,1000"]) == 2
    assert f"failed: {dataset / entries[1]['path']}" in capsys.readouterr().err
    written = json.loads((dataset / volume_source.STATS_NAME).read_text())["windows"]["-1000,1000"]
    assert set(written) == {e["id"] for e in entries} - {entries[1]["id"]}
    # The pipeline refuses a dataset with a volume lacking statistics, naming the fix.
    with pytest.raises(ValueError, match=f"no statistics for volume '{entries[1]['id']}'.*data_prep.volume_stats"):
        build(data_config(dataset))


def test_missing_or_stale_statistics_name_the_command(phantoms, tmp_path):
    dataset = tmp_path / "ds"
    shutil.copytree(phantoms, dataset)
    stats_path = dataset / volume_source.STATS_NAME
    document = json.loads(stats_path.read_text())
    first = volume_store.read_manifest(dataset)[0]["id"]
    document["windows"]["-1000,1000"][first]["source_sha256"] = "0" * 64
    stats_path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match="computed for other content.*python -m data_prep.volume_stats"):
        build(data_config(dataset))
    with pytest.raises(ValueError, match="no statistics.*window -500,500"):
        build(data_config(dataset, hu_window=(-500.0, 500.0)))
    stats_path.unlink()
    with pytest.raises(FileNotFoundError, match="stats.json: missing.*python -m data_prep.volume_stats"):
        build(data_config(dataset))


@pytest.mark.parametrize("overrides, message", [
    (dict(global_crop_mode="middle"), "global crops .*data.global_crop_mode.*crop mode"),
    (dict(flip_global_crops=(2,)), "data.flip_global_crops"),
    (dict(global_crop_extent=(16.5, 32)), "data.global_crop_extent must be an integer"),
    (dict(local_crop_extent=(12, 6)), "local crops .*1 <= min <= max"),
    (dict(pad_to=0), "data.pad_to"),
    (dict(view_region=-1), "data.view_region"),
    (dict(dir=None), "data.dir is missing"),
])
def test_bad_config_names_the_key(phantoms, overrides, message):
    with pytest.raises((KeyError, ValueError), match=message):
        build(data_config(phantoms, **overrides))


def test_non_boolean_intensity_switch_names_the_key(phantoms):
    data = data_config(phantoms).to_dict()  # a plain mapping: ConfigDict itself would refuse the string
    data["intensity_augment"] = "yes"
    with pytest.raises(ValueError, match="data.intensity_augment must be True or False"):
        build(data)


def test_bad_mask_config_names_the_key(phantoms):
    data = data_config(phantoms)
    data.mask.kind = "block"
    with pytest.raises(ValueError, match="data.mask.kind"):
        build(data)
    data = data_config(phantoms)
    data.mask.min_block_patches = 4
    with pytest.raises(KeyError, match="data.mask has unknown key.*min_block_patches"):
        build(data)


def test_corrupt_volume_error_names_example_and_volume(phantoms, tmp_path):
    dataset = tmp_path / "ds"
    shutil.copytree(phantoms, dataset)
    for path in (dataset / volume_store.VOLUMES_DIR).rglob("*"):
        if path.is_file() and path.name != "zarr.json":
            path.write_bytes(b"\0garbage" * 64)
    with pytest.raises(ValueError, match=r"3-D example \d+ \(seed 0\): volume 'phantom_00\d' \(manifest row \d"):
        take(build(data_config(dataset)), 1)
