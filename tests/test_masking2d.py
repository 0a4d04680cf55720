"""iBOT block masks: exact counts, blocky shapes, per-example crop choice (docs/recipe.md §5)."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage

from flexict_jax.data.masking2d import IbotMasking, block_mask


@pytest.mark.parametrize("grid", [2, 4, 16])
def test_block_mask_has_exact_count(grid):
    rng = np.random.default_rng(0)
    total = grid * grid
    for num_masked in range(0, total + 1, max(1, total // 16)):
        mask = block_mask(rng, grid, num_masked, max_block_patches=0.5 * total)
        assert mask.shape == (grid, grid) and mask.dtype == bool
        assert mask.sum() == num_masked


def test_block_mask_is_blocks_not_salt_and_pepper():
    grid, num_masked = 16, 80
    rng = np.random.default_rng(1)
    block_components, random_components = [], []
    for _ in range(50):
        mask = block_mask(rng, grid, num_masked, max_block_patches=0.5 * grid * grid)
        block_components.append(scipy.ndimage.label(mask)[1])
        scattered = np.zeros(grid * grid, dtype=bool)
        scattered[rng.choice(grid * grid, num_masked, replace=False)] = True
        random_components.append(scipy.ndimage.label(scattered.reshape(grid, grid))[1])
    # Rectangles of >= 4 patches: a handful of blobs (plus the odd fill patch), not ~40 scattered specks.
    assert np.mean(block_components) < 8
    assert np.mean(random_components) > 3 * np.mean(block_components)


def test_block_mask_rejects_impossible_count():
    with pytest.raises(ValueError, match="outside"):
        block_mask(np.random.default_rng(0), 4, 17)


def test_ibot_masking_one_masked_crop_with_exact_count():
    masking = IbotMasking()  # recipe defaults: probability 0.5, ratio U(0.1, 0.5)
    grid, total = 4, 16
    ratios_seen = set()
    for seed in range(200):
        masks = masking(np.random.default_rng(seed), 2, grid)
        assert masks.shape == (2, total) and masks.dtype == bool
        counts = masks.sum(axis=1)
        assert np.count_nonzero(counts) == 1  # int(0.1*16) >= 1, so the masked crop is never empty
        assert int(0.1 * total) <= counts.max() <= int(0.5 * total)
        ratios_seen.add(int(counts.max()))
    # ratio ~ U[0.1, 0.5): every count from int(0.1*N) to int(0.5*N) - 1 occurs.
    assert ratios_seen == set(range(int(0.1 * total), int(0.5 * total)))


def test_ibot_masking_count_follows_ratio_draw():
    # Exact count int(ratio*N): reproduce the ratio draw from a generator in the same state.
    masking = IbotMasking(probability=1.0, ratio=(0.1, 0.5))
    grid, total = 16, 256
    masks = masking(np.random.default_rng(7), 3, grid)
    replay = np.random.default_rng(7)
    order = replay.choice(3, size=3, replace=False)
    ratio = replay.uniform(0.1, 0.5)
    assert masks[order[0]].sum() == int(ratio * total)
    assert (masks.sum(axis=1) > 0).all()


def test_ibot_masking_probability_extremes_and_determinism():
    assert not IbotMasking(probability=0.0)(np.random.default_rng(0), 2, 4).any()
    assert (IbotMasking(probability=1.0)(np.random.default_rng(0), 2, 4).sum(axis=1) > 0).all()
    a = IbotMasking()(np.random.default_rng(5), 2, 8)
    b = IbotMasking()(np.random.default_rng(5), 2, 8)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kwargs, key", [
    (dict(probability=1.5), "probability"),
    (dict(ratio=(0.6, 0.2)), "ratio"),
    (dict(block_aspect=(0.0, 3.0)), "block_aspect"),
    (dict(max_block_fraction=0.0), "max_block_fraction"),
])
def test_ibot_masking_rejects_bad_config(kwargs, key):
    with pytest.raises(ValueError, match=f"data.mask.{key}"):
        IbotMasking(**kwargs)
