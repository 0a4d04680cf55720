"""Stage-1 per-slice transforms: HU z-score, MONAI-equivalent intensity augmentations, RandomResizedCrop + flip."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special

from flexict_jax.data import intensity
from flexict_jax.data.crops2d import MultiCrop, resized_crop, sample_crop_box
from flexict_jax.data.intensity import IntensityAugment

S = 64


def phantom(size: int = S) -> np.ndarray:
    """int16 HU: air, a soft-tissue ellipse body, a lung-like ellipse in it, and a bone spot on the left."""
    yy, xx = np.mgrid[:size, :size] / size
    hu = np.full((size, size), -1000, np.int16)
    hu[((yy - 0.5) / 0.4) ** 2 + ((xx - 0.5) / 0.3) ** 2 < 1] = 40
    hu[((yy - 0.5) / 0.15) ** 2 + ((xx - 0.4) / 0.1) ** 2 < 1] = -850
    hu[((yy - 0.5) / 0.05) ** 2 + ((xx - 0.3) / 0.05) ** 2 < 1] = 1500
    return hu


def only(**kwargs) -> IntensityAugment:
    """An IntensityAugment with every probability 0 except the ones given."""
    probs = dict(noise_prob=0.0, smooth_prob=0.0, scale_prob=0.0, lowres_prob=0.0, contrast_prob=0.0)
    return IntensityAugment(**{**probs, **kwargs})


# --- HU window + z-score --------------------------------------------------------------------------------------

def test_normalize_hu_clamps_then_z_scores_with_unbiased_std():
    hu = phantom()
    x = intensity.normalize_hu(hu, (-1000.0, 1000.0))
    assert x.dtype == np.float32
    clamped = np.clip(hu.astype(np.float64), -1000, 1000)
    np.testing.assert_allclose(x, (clamped - clamped.mean()) / clamped.std(ddof=1), atol=1e-5)
    assert abs(x.mean()) < 1e-5 and abs(x.std(ddof=1) - 1.0) < 1e-5
    # 1500 HU bone is clamped to 1000: the result equals that of the image with bone at exactly 1000.
    np.testing.assert_array_equal(x, intensity.normalize_hu(np.clip(hu, -1000, 1000).astype(np.int16)))


def test_normalize_hu_flat_slice_is_only_mean_centred():
    x = intensity.normalize_hu(np.full((8, 8), 300, np.int16))
    np.testing.assert_array_equal(x, np.zeros((8, 8), np.float32))


# --- intensity augmentations (MONAI semantics) -----------------------------------------------------------------

def test_gaussian_noise_std_is_uniform_up_to_max():
    image = np.zeros((64, 64), np.float32)
    stds = [intensity.gaussian_noise(image, np.random.default_rng(k), 0.1).std() for k in range(300)]
    # MONAI RandGaussianNoise(sample_std=True): std ~ U(0, 0.1), so the mean std is ~0.05, none above 0.1.
    assert max(stds) < 0.1 * 1.05
    assert abs(np.mean(stds) - 0.05) < 0.006
    assert min(stds) < 0.01


def test_noise_via_augment_with_probability_one():
    image = intensity.normalize_hu(phantom())
    out = only(noise_prob=1.0, noise_std=0.1)(image, np.random.default_rng(0))
    residual = out - image
    assert out.dtype == np.float32 and 0 < residual.std() <= 0.1 * 1.05 and abs(residual.mean()) < 0.01


def test_gaussian_smooth_impulse_response_is_pixel_integrated_erf_kernel():
    image = np.zeros((31, 31), np.float32)
    image[15, 15] = 1.0
    sigma_rows, sigma_cols = 0.5, 1.0
    out = intensity.gaussian_smooth(image, (sigma_rows, sigma_cols))

    def pixel_mass(offset, sigma):  # Gaussian mass over [offset - 1/2, offset + 1/2]
        t = 1 / (math.sqrt(2) * sigma)
        return 0.5 * (scipy.special.erf(t * (offset + 0.5)) - scipy.special.erf(t * (offset - 0.5)))

    assert out[15, 15] == pytest.approx(pixel_mass(0, sigma_rows) * pixel_mass(0, sigma_cols), rel=1e-5)
    assert out[16, 15] == pytest.approx(pixel_mass(1, sigma_rows) * pixel_mass(0, sigma_cols), rel=1e-5)
    assert out[15, 17] == pytest.approx(pixel_mass(0, sigma_rows) * pixel_mass(2, sigma_cols), rel=1e-5)
    # Truncated at radius int(4σ + 0.5): 2 rows and 4 columns either side.
    rows, cols = np.nonzero(out)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (13, 17, 11, 19)
    assert out.sum() == pytest.approx(1.0, abs=1e-4)


def test_gaussian_smooth_pads_with_zeros():
    out = intensity.gaussian_smooth(np.ones((20, 20), np.float32), (1.0, 1.0))
    assert out[10, 10] == pytest.approx(1.0, abs=1e-4)
    # At a corner half of each 1-D kernel (plus half the centre tap) falls on zero padding.
    half = 0.5 + 0.5 * scipy.special.erf(0.5 / math.sqrt(2))
    assert out[0, 0] == pytest.approx(half ** 2, rel=1e-4)


def test_smooth_via_augment_draws_sigma_in_range():
    image = np.zeros((21, 21), np.float32)
    image[10, 10] = 1.0
    for seed in range(20):
        out = only(smooth_prob=1.0, smooth_sigma=(0.5, 1.0))(image, np.random.default_rng(seed))
        # Peak between the σ=1 and σ=0.5 impulse peaks.
        assert intensity.gaussian_smooth(image, (1.0, 1.0))[10, 10] <= out[10, 10]
        assert out[10, 10] <= intensity.gaussian_smooth(image, (0.5, 0.5))[10, 10]


def test_scale_intensity_multiplies_by_one_plus_factor():
    image = intensity.normalize_hu(phantom())
    np.testing.assert_allclose(intensity.scale_intensity(image, -0.2), image * 0.8, rtol=1e-6)
    for seed in range(20):
        out = only(scale_prob=1.0, scale_factor=0.25)(image, np.random.default_rng(seed))
        ratio = out[image != 0] / image[image != 0]
        assert np.ptp(ratio) < 1e-5 and 0.75 <= ratio[0] <= 1.25


@pytest.mark.parametrize("shape, zoom", [((64, 64), 0.5), ((60, 60), 44 / 60), ((37, 53), 0.61), ((64, 64), 1.0)])
def test_simulate_low_resolution_matches_torch_nearest_then_bilinear(shape, zoom):
    torch = pytest.importorskip("torch")
    image = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    low = tuple(int(v) for v in np.round(np.array(shape) * zoom))
    x = torch.from_numpy(image)[None, None]
    down = torch.nn.functional.interpolate(x, size=low, mode="nearest")
    expected = torch.nn.functional.interpolate(down, size=shape, mode="bilinear", align_corners=False)[0, 0]
    np.testing.assert_allclose(intensity.simulate_low_resolution(image, zoom), expected.numpy(), atol=1e-5)


def test_lowres_via_augment_changes_image_but_keeps_range():
    image = intensity.normalize_hu(phantom())
    out = only(lowres_prob=1.0, lowres_zoom=(0.5, 0.6))(image, np.random.default_rng(0))
    assert out.shape == image.shape and not np.allclose(out, image)
    # Nearest + linear interpolation are convex combinations: no overshoot.
    assert image.min() - 1e-5 <= out.min() and out.max() <= image.max() + 1e-5


def test_adjust_contrast_is_min_range_normalised_gamma():
    image = intensity.normalize_hu(phantom())
    lo, hi = image.min(), image.max()
    out = intensity.adjust_contrast(image, 1.5)
    assert out.min() == pytest.approx(lo, abs=1e-5) and out.max() == pytest.approx(hi, abs=1e-5)
    u = (image - lo) / (hi - lo)
    np.testing.assert_allclose(out, u ** 1.5 * (hi - lo) + lo, atol=1e-5)
    np.testing.assert_allclose(intensity.adjust_contrast(image, 1.0), image, atol=1e-5)
    for seed in range(10):  # gamma ~ U(0.7, 1.5): the midpoint moves to (1/2)^gamma
        out = only(contrast_prob=1.0, contrast_gamma=(0.7, 1.5))(image, np.random.default_rng(seed))
        order = np.argsort(image.ravel(), kind="stable")
        assert np.all(np.diff(out.ravel()[order]) >= -1e-5)  # monotone


def test_intensity_augment_all_off_is_identity_and_seeded():
    image = intensity.normalize_hu(phantom())
    np.testing.assert_array_equal(only()(image, np.random.default_rng(0)), image)
    always = IntensityAugment(noise_prob=1, smooth_prob=1, scale_prob=1, lowres_prob=1, contrast_prob=1)
    a = always(image, np.random.default_rng(3))
    np.testing.assert_array_equal(a, always(image, np.random.default_rng(3)))
    assert not np.array_equal(a, always(image, np.random.default_rng(4)))


def test_intensity_augment_rejects_bad_config():
    with pytest.raises(ValueError, match="data.intensity.noise_prob"):
        IntensityAugment(noise_prob=2.0)
    with pytest.raises(ValueError, match="data.intensity.lowres_zoom"):
        IntensityAugment(lowres_zoom=(0.0, 1.0))


# --- RandomResizedCrop + flip ----------------------------------------------------------------------------------

def test_crop_boxes_follow_scale_and_ratio():
    rng = np.random.default_rng(0)
    for _ in range(300):
        top, left, h, w = sample_crop_box(rng, 64, 64, (0.05, 0.32), (3 / 4, 4 / 3))
        assert 0 <= top and top + h <= 64 and 0 <= left and left + w <= 64
        # Rounding each side to whole pixels moves area and aspect slightly off the drawn values.
        assert 0.05 * 64 * 64 * 0.8 <= h * w <= 0.32 * 64 * 64 * 1.2
        assert 3 / 4 * 0.8 <= w / h <= 4 / 3 * 1.25


def test_crop_box_falls_back_to_centre_crop():
    # A 64x16 slice cannot hold a full-area box with aspect in [3/4, 4/3]: torchvision's fallback is the
    # centred box of width 16 and height round(16 / (3/4)) = 21.
    assert sample_crop_box(np.random.default_rng(0), 64, 16, (1.0, 1.0), (3 / 4, 4 / 3)) == (21, 0, 21, 16)
    assert sample_crop_box(np.random.default_rng(0), 16, 64, (1.0, 1.0), (3 / 4, 4 / 3)) == (0, 21, 16, 21)
    assert sample_crop_box(np.random.default_rng(0), 40, 40, (1.0, 1.0), (1.0, 1.0)) == (0, 0, 40, 40)


def test_resized_crop_matches_torch_bicubic_antialias():
    torch = pytest.importorskip("torch")
    image = np.random.default_rng(1).normal(size=(64, 64)).astype(np.float32)
    for box, size in [((3, 5, 40, 50), 32), ((10, 2, 12, 9), 16), ((0, 0, 64, 64), 32)]:
        top, left, h, w = box
        x = torch.from_numpy(np.ascontiguousarray(image[top:top + h, left:left + w]))[None, None]
        expected = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", antialias=True,
                                                   align_corners=False)[0, 0].numpy()
        np.testing.assert_allclose(resized_crop(image, box, size), expected, atol=1e-4)


def test_full_crop_and_flip_geometry_on_asymmetric_phantom():
    image = intensity.normalize_hu(phantom())  # bone spot at column ~0.3·S: left half
    full = dict(n_crops=3, size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    kept = MultiCrop(hflip_prob=0.0, **full)(image, np.random.default_rng(0))
    flipped = MultiCrop(hflip_prob=1.0, **full)(image, np.random.default_rng(0))
    assert kept.shape == (3, 32, 32) and kept.dtype == np.float32
    np.testing.assert_allclose(kept[0], resized_crop(image, (0, 0, S, S), 32), atol=1e-6)
    np.testing.assert_array_equal(flipped, kept[:, :, ::-1])
    bone_col = np.unravel_index(np.argmax(kept[0]), kept[0].shape)[1]
    assert bone_col < 16 <= np.unravel_index(np.argmax(flipped[0]), flipped[0].shape)[1]


def test_crop_position_and_flip_on_a_ramp():
    ramp = np.tile(np.arange(S, dtype=np.float32), (S, 1))  # value = column index
    crops = MultiCrop(n_crops=20, size=16, scale=(0.1, 0.3), ratio=(1.0, 1.0), hflip_prob=0.5)
    out = crops(ramp, np.random.default_rng(0))
    replay = np.random.default_rng(0)
    n_flipped = 0
    for crop in out:
        top, left, h, w = sample_crop_box(replay, S, S, crops.scale, crops.ratio)
        flipped = replay.random() < 0.5
        n_flipped += flipped
        row = crop[8]
        # The crop spans columns [left, left + w): its first/last output pixels sit inside that range, and a
        # flipped crop runs right to left.
        lo, hi = (row[-1], row[0]) if flipped else (row[0], row[-1])
        assert left - 0.5 <= lo < hi <= left + w - 0.5
        assert (np.diff(row) < 0).all() if flipped else (np.diff(row) > 0).all()
    assert 0 < n_flipped < 20


def test_multicrop_rejects_bad_config():
    with pytest.raises(ValueError, match="scale"):
        MultiCrop(n_crops=2, size=32, scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="hflip_prob"):
        MultiCrop(n_crops=2, size=32, scale=(0.2, 0.5), hflip_prob=-0.1)

