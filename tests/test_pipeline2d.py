"""Stage-1 Grain pipeline over synthetic slice records: determinism, resume, host split, workers, shapes, errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
from run_utils import (
    CELL,
    NUM_RECORDS,
    assemble_process_batches,
    assert_batches_equal,
    assert_resumes,
    synthetic_slice,
    take,
    take_closing,
    unaugmented,
    write_slices_dir,
)
from run_utils import SLICE_GLOBAL as G
from run_utils import SLICE_LOCAL as L
from run_utils import SLICE_SIZE as S
from run_utils import slices_data_config as data_config

from flexict_jax.data import pipeline2d, records, slice_source
from flexict_jax.data.crops2d import resized_crop
from flexict_jax.data.intensity import normalize_hu

PATCH_SIZES = (8, 16)


@pytest.fixture(scope="module")
def slices_dir(tmp_path_factory):
    return write_slices_dir(tmp_path_factory.mktemp("slices"))


def test_batch_shapes_dtypes_and_stats(slices_dir):
    b = 4
    batches = take(pipeline2d.build_slices2d_dataset(data_config(slices_dir), seed=0, batch_size=b,
                                                 patch_sizes=PATCH_SIZES), 3)
    for t, batch in enumerate(batches):
        assert set(batch) == {"global_crops", "local_crops", "masks_p8", "masks_p16", "index"}
        assert batch["global_crops"].shape == (b, 2, G, G, 1) and batch["global_crops"].dtype == np.float32
        assert batch["local_crops"].shape == (b, 3, L, L, 1) and batch["local_crops"].dtype == np.float32
        assert batch["masks_p8"].shape == (b, 2, (G // 8) ** 2) and batch["masks_p8"].dtype == bool
        assert batch["masks_p16"].shape == (b, 2, (G // 16) ** 2) and batch["masks_p16"].dtype == bool
        assert batch["index"].dtype == np.int64
        np.testing.assert_array_equal(batch["index"], np.arange(t * b, (t + 1) * b))
    crops = np.concatenate([x["global_crops"].ravel() for x in batches])
    assert np.isfinite(crops).all()
    # Crops of a z-scored slice (after mild intensity augmentation): roughly zero mean, unit spread.
    assert abs(crops.mean()) < 0.75 and 0.4 < crops.std() < 2.0


def test_unaugmented_full_crop_is_the_z_scored_slice(slices_dir):
    data = unaugmented(data_config(slices_dir))
    crops = take(pipeline2d.build_slices2d_dataset(data, seed=0, batch_size=4, patch_sizes=PATCH_SIZES), 1)[0]
    g = crops["global_crops"][..., 0]
    np.testing.assert_array_equal(g[:, 0], g[:, 1])  # both global crops are the whole slice
    assert np.abs(g.mean(axis=(-1, -2))).max() < 0.05
    assert np.abs(g.std(axis=(-1, -2)) - 1.0).max() < 0.1


def test_real_ct_slices(ct_dir, tmp_path):
    nib = pytest.importorskip("nibabel")
    volume = np.asarray(nib.load(ct_dir / "vtk_headsq.nii.gz").dataobj)  # 64 x 64 x 93 int16 HU, head & neck
    hu = np.ascontiguousarray(np.moveaxis(volume[:, :, 30:70:5], -1, 0)).astype(np.int16)  # 8 axial slices
    path = write_slices_dir(tmp_path / "slices", num_shards=2, slices=hu)
    data = data_config(path)
    batches = take(pipeline2d.build_slices2d_dataset(data, seed=0, batch_size=4, patch_sizes=PATCH_SIZES), 4)
    for batch in batches:
        assert np.isfinite(batch["global_crops"]).all() and np.isfinite(batch["local_crops"]).all()
        assert (np.count_nonzero(batch["masks_p8"].sum(-1), axis=1) == 1).all()
    # Without augmentation a full-slice crop is the z-scored real slice, bicubic-resized to G.
    unaugmented(data)
    crops = take(pipeline2d.build_slices2d_dataset(data, seed=0, batch_size=8, patch_sizes=PATCH_SIZES), 1)[0]
    expected = {k: resized_crop(normalize_hu(hu[k]), (0, 0, S, S), G) for k in range(len(hu))}
    for crop in crops["global_crops"][:, 0, :, :, 0]:
        assert min(np.abs(crop - e).max() for e in expected.values()) < 1e-5
    assert len({min(expected, key=lambda k: np.abs(crop - expected[k]).max())
                for crop in crops["global_crops"][:, 0, :, :, 0]}) == len(hu)  # one epoch: every slice once


def test_masks_exact_counts_one_masked_global_crop(slices_dir):
    batches = take(pipeline2d.build_slices2d_dataset(data_config(slices_dir), seed=1, batch_size=4,
                                                 patch_sizes=PATCH_SIZES), 4)
    counts8 = np.concatenate([x["masks_p8"].sum(-1) for x in batches])  # [examples, 2 crops]
    assert (np.count_nonzero(counts8, axis=1) == 1).all()  # round(2 * 0.5) = 1 masked crop per example
    assert ((counts8.max(axis=1) >= int(0.1 * 16)) & (counts8.max(axis=1) <= int(0.5 * 16))).all()
    assert set(counts8.argmax(axis=1)) == {0, 1}  # which crop is masked is random
    counts16 = np.concatenate([x["masks_p16"].sum(-1) for x in batches])
    assert (counts16.max(axis=1) <= int(0.5 * 4)).all() and (np.count_nonzero(counts16, axis=1) <= 1).all()


def test_same_seed_same_batches_different_seed_differs(slices_dir):
    data = data_config(slices_dir)
    a = take(pipeline2d.build_slices2d_dataset(data, seed=3, batch_size=4, patch_sizes=PATCH_SIZES), 2)
    b = take(pipeline2d.build_slices2d_dataset(data, seed=3, batch_size=4, patch_sizes=PATCH_SIZES), 2)
    c = take(pipeline2d.build_slices2d_dataset(data, seed=4, batch_size=4, patch_sizes=PATCH_SIZES), 2)
    assert_batches_equal(a, b)
    assert not np.array_equal(a[0]["global_crops"], c[0]["global_crops"])


def test_every_epoch_is_a_new_permutation_of_all_records(slices_dir):
    # Full-slice global crops without augmentation reveal which record each example is (its marker cell).
    data = unaugmented(data_config(slices_dir))
    batches = take(pipeline2d.build_slices2d_dataset(data, seed=0, batch_size=4, patch_sizes=PATCH_SIZES),
                   2 * NUM_RECORDS // 4)
    cell = CELL * G // S
    ids = []
    for batch in batches:
        for crop in batch["global_crops"][:, 0, :, :, 0]:
            r, c = np.unravel_index(np.argmax(crop), crop.shape)
            ids.append(int(r // cell * (G // cell) + c // cell))
    first, second = ids[:NUM_RECORDS], ids[NUM_RECORDS:]
    assert sorted(first) == list(range(NUM_RECORDS)) and sorted(second) == list(range(NUM_RECORDS))
    assert first != second and first != sorted(first)


def test_process_shards_concatenate_to_the_single_process_batch(slices_dir):
    data = data_config(slices_dir)
    whole = take(pipeline2d.build_slices2d_dataset(data, seed=5, batch_size=4, patch_sizes=PATCH_SIZES), 3)
    parts = [take(pipeline2d.build_slices2d_dataset(data, seed=5, batch_size=2, patch_sizes=PATCH_SIZES,
                                                process_index=p, process_count=2), 3) for p in range(2)]
    assert_batches_equal(whole, assemble_process_batches(parts))
    np.testing.assert_array_equal(parts[1][1]["index"], [6, 7])  # contiguous rows, not interleaved


def test_restored_iterator_continues_with_the_next_batches(slices_dir):
    assert_resumes(lambda: pipeline2d.build_slices2d_dataset(data_config(slices_dir), seed=6, batch_size=4,
                                                         patch_sizes=PATCH_SIZES), skip=2)


@pytest.mark.slow
def test_two_grain_workers_match_in_process(slices_dir):
    in_process = take(pipeline2d.build_slices2d_dataset(data_config(slices_dir), seed=7, batch_size=4,
                                                    patch_sizes=PATCH_SIZES), 3)
    ds = pipeline2d.build_slices2d_dataset(data_config(slices_dir, num_workers=2), seed=7, batch_size=4,
                                       patch_sizes=PATCH_SIZES)
    assert_batches_equal(take_closing(ds, 3), in_process)


@pytest.mark.parametrize("breakage, message", [
    ("no_dir", "does not exist"),
    ("no_index", "index.json: missing"),
    ("bad_json", "not valid JSON"),
    ("wrong_format", "key 'format'"),
    ("missing_shard", "missing file"),
    ("zero_records", "key 'num_records' must be a positive"),
    ("count_mismatch", "shards hold 24 records"),
])
def test_bad_slices_dir_gives_clear_error(tmp_path, breakage, message):
    path = write_slices_dir(tmp_path / "slices")
    index_path = path / "index.json"
    index = json.loads(index_path.read_text())
    if breakage == "no_dir":
        path = tmp_path / "nowhere"
    elif breakage == "no_index":
        index_path.unlink()
    elif breakage == "bad_json":
        index_path.write_text("{not json")
    else:
        if breakage == "wrong_format":
            index["format"] = "something_else/2"
        elif breakage == "missing_shard":
            (path / index["shards"][1]).unlink()
        elif breakage == "zero_records":
            index["num_records"] = 0
        elif breakage == "count_mismatch":
            index["num_records"] = 25
        index_path.write_text(json.dumps(index))
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        pipeline2d.build_slices2d_dataset(data_config(path), seed=0, batch_size=4, patch_sizes=PATCH_SIZES)


def test_unset_data_dir_names_the_config_key(slices_dir):
    data = data_config(slices_dir)
    data.dir = None
    with pytest.raises(KeyError, match="data.dir"):
        pipeline2d.build_slices2d_dataset(data, seed=0, batch_size=4, patch_sizes=PATCH_SIZES)


def test_bad_config_values_name_their_key(slices_dir):
    data = data_config(slices_dir)
    data.intensity.noise_probability = 0.5
    with pytest.raises(KeyError, match="data.intensity has unknown key.*noise_probability"):
        pipeline2d.build_slices2d_dataset(data, seed=0, batch_size=4, patch_sizes=PATCH_SIZES)
    with pytest.raises(ValueError, match="data.local_crop_scale"):
        pipeline2d.build_slices2d_dataset(data_config(slices_dir, local_crop_scale=(0.5, 0.1)), seed=0,
                                      batch_size=4, patch_sizes=PATCH_SIZES)


def test_corrupt_record_error_names_the_shard_and_record(tmp_path):
    path = write_slices_dir(tmp_path / "slices", num_records=8, num_shards=1, corrupt=3)
    ds = pipeline2d.build_slices2d_dataset(data_config(path), seed=0, batch_size=8, patch_sizes=PATCH_SIZES)
    with pytest.raises(records.CorruptRecordError,
                       match=r"slices-00000-of-00001.arrayrecord: record 3 \(record 3 of 8\) is corrupt: not a "
                             r"flexict_jax"):
        take(ds, 1)


def test_slice_source_reads_records_in_index_order(slices_dir):
    source = slice_source.open_slice_source(slices_dir)
    assert len(source) == NUM_RECORDS
    hu, meta = slice_source.decode_slice(source[9])
    np.testing.assert_array_equal(hu, synthetic_slice(9))
    assert meta["volume_id"] == "vol1" and meta["z_index"] == 1
