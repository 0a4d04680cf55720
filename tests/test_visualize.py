"""The feature pictures' colouring (flexict_jax.visualize): organs show as regions, the body outline does not take
the colours, and features without structure give no regions."""
from __future__ import annotations

import numpy as np

from flexict_jax import visualize


def _body(n: int = 24) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mask [1, n, n] of a disk, organ [1, n, n] True in its left half, outline [1, n, n] body tokens next to air)."""
    yy, xx = np.mgrid[0:n, 0:n]
    mask = ((yy - n / 2 + 0.5) ** 2 + (xx - n / 2 + 0.5) ** 2 < (n / 2 - 1) ** 2)[None]
    outline = mask & ~visualize.interior_tokens(mask, (1, 2))
    return mask, mask & (xx < n // 2)[None], outline


def test_interior_excludes_the_outline_and_the_grid_border():
    mask = np.ones((2, 5, 6), bool)
    inner = visualize.interior_tokens(mask, (1, 2))
    assert inner[:, 1:-1, 1:-1].all() and not inner[:, 0].any() and not inner[:, :, -1].any()
    assert inner[0].sum() == 3 * 4  # slices are separate pictures: axis 0 is not a neighbour axis in 2d
    mask[0, 2, 3] = False
    inner = visualize.interior_tokens(mask, (1, 2))
    assert not inner[0, 2, 2:5].any() and not inner[0, 1:4, 3].any() and inner[1, 2, 3]


def test_an_organ_shows_as_a_region_although_the_outline_varies_more():
    rng = np.random.default_rng(0)
    mask, organ, outline = _body()
    features = rng.normal(0, 0.05, mask.shape + (16,))
    features[..., 0] += np.where(organ, 0.5, -0.5)  # the organ: a small, consistent offset in one dimension
    features[outline] += rng.normal(0, 10.0, (outline.sum(), 16))  # air/skin tokens: large, unrelated
    inner = visualize.interior_tokens(mask, (1, 2))

    rgb = visualize.pca_rgb(features, mask, inner)
    # The first component (red) is the organ, not the outline. Rank colours: a region of half the interior gets
    # ranks 0-0.5 against 0.5-1, a contrast of 0.5 at most.
    assert abs(rgb[organ & inner, 0].mean() - rgb[~organ & inner, 0].mean()) > 0.4
    fitted_with_outline = visualize.pca_rgb(features, mask, mask)
    assert abs(fitted_with_outline[organ & inner, 0].mean() - fitted_with_outline[~organ & inner, 0].mean()) < 0.2
    assert (rgb[~mask] == 0).all() and rgb.min() >= 0 and rgb.max() <= 1
    # every channel spans its range over the interior (rank colouring)
    assert (rgb[inner].min(0) == 0).all() and (rgb[inner].max(0) > 0.99).all()


def test_features_without_structure_paint_no_region():
    mask, organ, _ = _body()
    features = np.random.default_rng(1).normal(0, 1, mask.shape + (16,))
    inner = visualize.interior_tokens(mask, (1, 2))
    rgb = visualize.pca_rgb(features, mask, inner)
    assert np.abs(rgb[organ & inner].mean(0) - rgb[~organ & inner].mean(0)).max() < 0.15
