"""Stage-1.1 multi-resolution pipeline: per-step resolution, Gram crops, determinism, resume, host split."""
from __future__ import annotations

import numpy as np
import pytest
from run_utils import SLICE_SIZE as S
from run_utils import assert_batches_equal, synthetic_slice, take, unaugmented, write_slices_dir
from run_utils import slices_data_config as data_config

from flexict_jax import variants
from flexict_jax.data import pipeline2d, slice_source
from flexict_jax.data.crops2d import resize_crops, resized_crop
from flexict_jax.data.intensity import normalize_hu

PATCH_SIZES, PATCH_PROBS = (16, 8), (0.5, 0.5)
# (global, local, Gram) at 1/16 of docs/recipe.md §6's first two rows, plus a row whose Gram crop is the global size.
RESOLUTIONS = ((24, 8, 32), (32, 8, 48), (32, 16, 32))
RESOLUTION_PROBS = (0.4, 0.4, 0.2)


@pytest.fixture(scope="module")
def slices_dir(tmp_path_factory):
    return write_slices_dir(tmp_path_factory.mktemp("slices"))


def hires(data, *, seed=0, batch_size=4, **kwargs):
    args = dict(seed=seed, batch_size=batch_size, patch_sizes=PATCH_SIZES, patch_size_probs=PATCH_PROBS,
                resolutions=RESOLUTIONS, resolution_probs=RESOLUTION_PROBS)
    return pipeline2d.build_slices2d_hires_dataset(data, **{**args, **kwargs})


def step_resolution(seed: int, step: int) -> int:
    """The trainer's draw for `step` (flexict_jax.variants)."""
    return variants.variant_for_step(seed, step, PATCH_SIZES, PATCH_PROBS, RESOLUTION_PROBS).resolution_index


def test_batch_t_has_the_shapes_of_step_t(slices_dir):
    b, n_steps, seed = 2, 10, 0
    batches = take(hires(data_config(slices_dir, hflip_prob=0.0), seed=seed, batch_size=b), n_steps)
    seen = set()
    for t, batch in enumerate(batches):
        r = int(batch["resolution_index"])
        assert batch["resolution_index"].shape == () and r == step_resolution(seed, t)
        seen.add(r)
        g, l, gg = RESOLUTIONS[r]
        assert set(batch) == {"global_crops", "gram_crops", "local_crops", "masks_p8", "masks_p16", "index",
                              "resolution_index"}
        assert batch["global_crops"].shape == (b, 2, g, g, 1) and batch["global_crops"].dtype == np.float32
        assert batch["gram_crops"].shape == (b, 2, gg, gg, 1) and batch["gram_crops"].dtype == np.float32
        assert batch["local_crops"].shape == (b, 3, l, l, 1)
        assert batch["masks_p8"].shape == (b, 2, (g // 8) ** 2) and batch["masks_p16"].shape == (b, 2, (g // 16) ** 2)
        np.testing.assert_array_equal(batch["index"], np.arange(t * b, (t + 1) * b))
        assert np.isfinite(batch["gram_crops"]).all()
        # One masked global crop per example (round(2 * 0.5)), sized for this resolution's patch grid.
        assert (np.count_nonzero(batch["masks_p8"].sum(-1), axis=1) == 1).all()
    assert seen == {0, 1, 2}  # every resolution occurs within the first steps


def test_gram_crop_is_the_global_crop_at_higher_resolution(slices_dir):
    # Same crop box, flip and intensity augmentation: bicubic-downsampling the Gram crop gives the global crop.
    batches = take(hires(data_config(slices_dir, hflip_prob=0.5), seed=1), 6)
    for batch in batches:
        g = batch["global_crops"].shape[2]
        np.testing.assert_allclose(resize_crops(batch["gram_crops"][..., 0], g), batch["global_crops"][..., 0],
                                   atol=1e-6)
        if batch["gram_crops"].shape[2] > g:  # and the Gram crop does carry more detail
            upsampled = resize_crops(batch["global_crops"][..., 0], batch["gram_crops"].shape[2])
            assert np.abs(upsampled - batch["gram_crops"][..., 0]).max() > 1e-2


def test_unaugmented_gram_crop_is_the_whole_slice_at_the_gram_size(slices_dir):
    data = unaugmented(data_config(slices_dir))
    batch = take(hires(data, seed=2, batch_size=8), 1)[0]
    _, _, gram = RESOLUTIONS[int(batch["resolution_index"])]
    for index, crop in zip(batch["index"], batch["gram_crops"][:, 0, :, :, 0]):
        # Which record an example reads is the shuffle's business; one of them must match exactly.
        errors = [np.abs(crop - resized_crop(normalize_hu(synthetic_slice(k)), (0, 0, S, S), gram)).max()
                  for k in range(24)]
        assert min(errors) < 1e-5, f"example {index}"


@pytest.mark.slow
def test_deterministic_and_independent_of_the_worker_count(slices_dir):
    data = data_config(slices_dir)
    a = take(hires(data, seed=3), 4)
    assert_batches_equal(a, take(hires(data, seed=3), 4))
    it = iter(hires(data_config(slices_dir, num_workers=2), seed=3))
    try:
        assert_batches_equal(take(it, 4), a)
    finally:
        it.close()
    # Another seed draws other crops and another resolution sequence.
    assert [step_resolution(3, t) for t in range(8)] != [step_resolution(4, t) for t in range(8)]


def test_resume_continues_with_the_resolutions_of_the_next_steps(slices_dir):
    seed = 6
    it = iter(hires(data_config(slices_dir), seed=seed))
    take(it, 3)
    state = it.get_state()
    expected = take(it, 3)
    fresh = iter(hires(data_config(slices_dir), seed=seed))
    fresh.set_state(state)
    resumed = take(fresh, 3)
    assert_batches_equal(resumed, expected)
    assert [int(b["resolution_index"]) for b in resumed] == [step_resolution(seed, t) for t in (3, 4, 5)]


def test_process_shards_concatenate_to_the_single_process_batch(slices_dir):
    data = data_config(slices_dir)
    whole = take(hires(data, seed=5), 3)
    parts = [take(hires(data, seed=5, batch_size=2, process_index=p, process_count=2), 3) for p in range(2)]
    for t in range(3):
        for part in parts:  # every host builds step t at the same resolution
            assert part[t]["resolution_index"] == whole[t]["resolution_index"]
        assembled = {k: np.concatenate([parts[0][t][k], parts[1][t][k]]) for k in whole[t]
                     if k != "resolution_index"}
        assert_batches_equal([{k: v for k, v in whole[t].items() if k != "resolution_index"}], [assembled])


def test_stage1_examples_are_unchanged_by_the_generalisation(slices_dir):
    # A resolution whose Gram crop equals the global crop reproduces the stage-1 example exactly.
    data = data_config(slices_dir, global_crop_size=32, local_crop_size=16)
    stage1 = pipeline2d.stage1_transform(data, seed=0, patch_sizes=PATCH_SIZES)
    same = pipeline2d.stage1_transform(data, seed=0, patch_sizes=PATCH_SIZES, resolution=(32, 16, 32))
    record = slice_source.open_slice_source(slices_dir)[5]
    a, b = stage1.map_with_index(11, record), same.map_with_index(11, record)
    np.testing.assert_array_equal(b.pop("gram_crops"), b["global_crops"])
    assert_batches_equal([a], [b])


@pytest.mark.parametrize("kwargs, message", [
    (dict(resolution_probs=(0.5, 0.5)), "one probability per entry of data.resolutions"),
    (dict(resolution_probs=(0.5, 0.4, 0.4)), "sum to 1"),
    (dict(resolutions=((24, 8, 32), (32, 0, 48), (32, 16, 32))), r"data.resolutions\[1\] must be three positive"),
    (dict(resolutions=((24, 8), (32, 8, 48), (32, 16, 32))), r"data.resolutions\[0\] must be three positive"),
    (dict(resolutions=((8, 8, 16), (32, 8, 48), (32, 16, 32))), r"global crop size \(data.resolutions\[0\] = 8\)"),
    (dict(patch_size_probs=(1.0,)), "patch_size_probs"),
])
def test_bad_resolution_config_names_the_key(slices_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        hires(data_config(slices_dir), **kwargs)
