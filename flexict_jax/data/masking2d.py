"""iBOT block masks on the patch grid of the global crops (docs/recipe.md §5, DINOv2 `MaskingGenerator` semantics).

Pure numpy; every draw comes from the `np.random.Generator` passed in, so a mask depends only on the example's
RNG and never on the batch it lands in.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from flexict_jax.errors import ConfigError

# DINOv2 gives up placing rectangles after this many consecutive misses and fills the rest at random.
_BLOCK_ATTEMPTS = 10


def block_mask(rng: np.random.Generator, grid: int, num_masked: int, *, min_block_patches: float = 4,
               block_aspect: tuple[float, float] = (0.3, 1 / 0.3), max_block_patches: float | None = None
               ) -> np.ndarray:
    """bool [grid, grid] with exactly `num_masked` True patches, laid down as rectangles.

    Rectangles have area U(min_block_patches, still-missing patches) (capped at `max_block_patches`) and a
    log-uniform aspect ratio in `block_aspect`; a rectangle is kept only if it adds between 1 and the still-missing
    number of patches. After ten misses in a row (or once the target is reached) the remainder is filled with
    uniformly random patches, so the count is exact (docs/recipe.md §5).
    """
    total = grid * grid
    if not 0 <= num_masked <= total:
        raise ValueError(f"num_masked={num_masked} is outside [0, {total}] for a {grid}x{grid} patch grid")
    cap = total if max_block_patches is None else max_block_patches
    log_aspect = (math.log(block_aspect[0]), math.log(block_aspect[1]))
    mask = np.zeros((grid, grid), dtype=bool)
    count = 0
    while count < num_masked:
        budget = min(num_masked - count, cap)
        added = _add_block(rng, mask, budget, min_block_patches, log_aspect)
        if added == 0:
            break
        count += added
    flat = mask.reshape(-1)
    if count < num_masked:
        flat[rng.choice(np.flatnonzero(~flat), size=num_masked - count, replace=False)] = True
    return mask


def _add_block(rng: np.random.Generator, mask: np.ndarray, budget: float, min_block_patches: float,
               log_aspect: tuple[float, float]) -> int:
    height, width = mask.shape
    for _ in range(_BLOCK_ATTEMPTS):
        # Python's random.uniform(a, b) (used upstream) accepts b < a; numpy's does not promise to.
        area = rng.uniform(min(min_block_patches, budget), max(min_block_patches, budget))
        aspect = math.exp(rng.uniform(*log_aspect))
        h = int(round(math.sqrt(area * aspect)))
        w = int(round(math.sqrt(area / aspect)))
        if h < height and w < width:  # strict, as upstream: a block never spans the whole grid
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            block = mask[top:top + h, left:left + w]
            added = h * w - int(block.sum())
            if 0 < added <= budget:
                block[...] = True
                return added
    return 0


def masked_crops(rng: np.random.Generator, n_crops: int, probability: float) -> np.ndarray:
    """Which of an example's `n_crops` global crops get an iBOT mask (shared by the 2-D and 3-D pipelines).

    n_crops·probability of them, chosen at random. When that is not a whole number, its floor or its ceiling
    (the latter with probability equal to the fractional part), so the expected count is n_crops·probability:
    stage 3 masks its single global crop in half of the examples (docs/recipe.md §8).
    """
    expected = round(n_crops * probability, 9)  # 3 x 0.1 is 0.30000000000000004
    count = math.floor(expected)
    if expected > count and rng.random() < expected - count:
        count += 1
    return rng.choice(n_crops, size=count, replace=False)


def max_masked_crops(n_crops: int, probability: float) -> int:
    """The most crops `masked_crops` can pick: the size of a static masked-token buffer."""
    return math.ceil(round(n_crops * probability, 9))


@dataclasses.dataclass(frozen=True)
class IbotMasking:
    """Per-example iBOT masks for the global crops (config `data.mask`).

    Deviation from upstream (docs/recipe.md §5): the upstream collate masks int(n_images·probability) of the 2B global
    crops of the local batch, gives the i-th masked image a ratio drawn from the i-th bin of
    linspace(ratio_min, ratio_max, n+1), and shuffles the masks across the batch, so a crop's mask depends on the
    per-device batch size and its position in it. Here each example masks n_crops·probability of its own
    global crops, chosen at random (`masked_crops`), each with ratio ~ U(ratio) and int(ratio·N) patches, so the
    masks -- and with them the global batch -- do not depend on the batch or host split. The expected ratio is
    the same.
    """

    probability: float = 0.5
    ratio: tuple[float, float] = (0.1, 0.5)
    min_block_patches: float = 4
    block_aspect: tuple[float, float] = (0.3, 1 / 0.3)
    max_block_fraction: float = 0.5

    def __post_init__(self):
        if not 0.0 <= self.probability <= 1.0:
            raise ConfigError(f"data.mask.probability must be in [0, 1], got {self.probability}")
        if not 0.0 <= self.ratio[0] <= self.ratio[1] <= 1.0:
            raise ConfigError(f"data.mask.ratio must satisfy 0 <= min <= max <= 1, got {self.ratio}")
        if self.min_block_patches < 1:
            raise ConfigError(f"data.mask.min_block_patches must be >= 1, got {self.min_block_patches}")
        if not 0.0 < self.block_aspect[0] <= self.block_aspect[1]:
            raise ConfigError(f"data.mask.block_aspect must satisfy 0 < min <= max, got {self.block_aspect}")
        if not 0.0 < self.max_block_fraction <= 1.0:
            raise ConfigError(f"data.mask.max_block_fraction must be in (0, 1], got {self.max_block_fraction}")

    def __call__(self, rng: np.random.Generator, n_crops: int, grid: int) -> np.ndarray:
        """bool [n_crops, grid*grid]: the `masked_crops` get a block mask, the others are all False."""
        total = grid * grid
        masks = np.zeros((n_crops, total), dtype=bool)
        for crop in masked_crops(rng, n_crops, self.probability):
            num_masked = int(rng.uniform(*self.ratio) * total)
            masks[crop] = block_mask(rng, grid, num_masked, min_block_patches=self.min_block_patches,
                                     block_aspect=self.block_aspect,
                                     max_block_patches=self.max_block_fraction * total).reshape(-1)
        return masks

