"""RCC-3D iBOT masks on the token grid of the 3-D global crops (docs/recipe.md §7, upstream `RCCMaskingGenerator3D`).

Boxes are laid out in the unit cube and then rasterised onto the t×t×t token grid (axes z, y, x):
  * the cube is split into `grid`³ cells and each cell gets one box: volume fraction v ~ U(box_fraction),
    in-plane aspect a log-uniform in `box_aspect`, footprint A = v^(2/3) with sides √(A·a) along y and √(A/a)
    along x, depth v/A along z, centre uniform in the cell shrunk by a quarter of its width on each side;
  * boxes are visited largest first: a box whose masked fraction already exceeds the target ratio r is reset to
    unmasked; otherwise a sub-cuboid of about round(r·|box|) − (already masked) tokens, shaped like the box, is
    masked at a random place inside it.
Upstream stops there, so the realised ratio scatters around r (docs/recipe.md §13 #9). With `exact_count` (the default
here) the mask is then grown or shrunk at its boundary, one random layer of tokens at a time, to exactly
int(r·N) tokens like the 2-D masks; blocks stay blocks. `exact_count=False` gives upstream's distribution.

Pure numpy; every draw comes from the `np.random.Generator` passed in.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import scipy.ndimage

from flexict_jax.data.masking2d import masked_crops
from flexict_jax.errors import ConfigError

# The box centre is drawn from the cell shrunk by this fraction of its width on each side (docs/recipe.md §7).
_CELL_MARGIN = 0.25


def _rcc_boxes(rng: np.random.Generator, tokens: int, cells: int, box_fraction: tuple[float, float],
               box_aspect: tuple[float, float]) -> list[tuple[tuple[int, int, int], tuple[int, int, int]]]:
    """One (start, size) token box per cell, in cell order (z, y, x)."""
    log_aspect = (math.log(box_aspect[0]), math.log(box_aspect[1]))
    boxes = []
    for cell in np.ndindex(cells, cells, cells):
        volume = rng.uniform(*box_fraction)
        aspect = math.exp(rng.uniform(*log_aspect))
        footprint = volume ** (2.0 / 3.0)
        sides = (volume / footprint, math.sqrt(footprint * aspect), math.sqrt(footprint / aspect))
        centre = [(c + rng.uniform(_CELL_MARGIN, 1.0 - _CELL_MARGIN)) / cells for c in cell]
        size = tuple(min(max(round(s * tokens), 1), tokens) for s in sides)
        start = tuple(min(max(round(c * tokens - n / 2), 0), tokens - n) for c, n in zip(centre, size))
        boxes.append((start, size))
    return boxes


def _match_count(rng: np.random.Generator, mask: np.ndarray, target: int) -> None:
    """Grows (or shrinks) `mask` in place by random tokens of its outer (inner) boundary to `target` tokens."""
    flat = mask.reshape(-1)
    while (count := int(flat.sum())) != target:
        if count < target:
            frontier = scipy.ndimage.binary_dilation(mask) & ~mask if count else ~mask
        else:
            frontier = mask & ~scipy.ndimage.binary_erosion(mask)
        candidates = np.flatnonzero(frontier)
        pick = rng.choice(candidates, size=min(abs(target - count), candidates.size), replace=False)
        flat[pick] = count < target


def rcc_mask(rng: np.random.Generator, tokens: int, ratio: float, *, cells: int = 4,
             box_fraction: tuple[float, float] = (0.02, 0.05), box_aspect: tuple[float, float] = (0.5, 2.0),
             exact_count: bool = True) -> np.ndarray:
    """bool [tokens, tokens, tokens] (z, y, x): the RCC-3D mask of the module docstring for target `ratio`."""
    mask = np.zeros((tokens,) * 3, dtype=bool)
    boxes = _rcc_boxes(rng, tokens, cells, box_fraction, box_aspect)
    for start, size in sorted(boxes, key=lambda box: -math.prod(box[1])):  # stable: ties keep cell order
        region = mask[tuple(slice(s, s + n) for s, n in zip(start, size))]
        box_tokens = region.size
        already = int(region.sum())
        if already > ratio * box_tokens:
            region[...] = False
            continue
        missing = round(ratio * box_tokens) - already
        if missing <= 0:
            continue
        scale = (missing / box_tokens) ** (1.0 / 3.0)
        cut = [min(max(round(n * scale), 1), n) for n in size]
        offset = [int(rng.integers(0, n - c + 1)) for n, c in zip(size, cut)]
        region[tuple(slice(o, o + c) for o, c in zip(offset, cut))] = True
    if exact_count:
        _match_count(rng, mask, int(ratio * mask.size))
    return mask


@dataclasses.dataclass(frozen=True)
class RccMasking:
    """Per-example RCC-3D iBOT masks for the global crops (config `data.mask` of the 3-D stages).

    The same per-example rule as the 2-D `IbotMasking`: n_crops·probability of an example's global crops are
    masked (`masking2d.masked_crops`), each with its own ratio r ~ U(ratio).
    """

    probability: float = 0.5
    ratio: tuple[float, float] = (0.1, 0.5)
    kind: str = "rcc"
    grid: int = 4  # cells per axis
    box_fraction: tuple[float, float] = (0.02, 0.05)
    box_aspect: tuple[float, float] = (0.5, 2.0)
    exact_count: bool = True

    def __post_init__(self):
        if self.kind != "rcc":
            raise ConfigError(f"data.mask.kind must be 'rcc' for 3-D crops, got {self.kind!r}")
        if not 0.0 <= self.probability <= 1.0:
            raise ConfigError(f"data.mask.probability must be in [0, 1], got {self.probability}")
        if not 0.0 <= self.ratio[0] <= self.ratio[1] <= 1.0:
            raise ConfigError(f"data.mask.ratio must satisfy 0 <= min <= max <= 1, got {self.ratio}")
        if self.grid < 1:
            raise ConfigError(f"data.mask.grid must be >= 1, got {self.grid}")
        if not 0.0 < self.box_fraction[0] <= self.box_fraction[1] <= 1.0:
            raise ConfigError(f"data.mask.box_fraction must satisfy 0 < min <= max <= 1, got {self.box_fraction}")
        if not 0.0 < self.box_aspect[0] <= self.box_aspect[1]:
            raise ConfigError(f"data.mask.box_aspect must satisfy 0 < min <= max, got {self.box_aspect}")

    def __call__(self, rng: np.random.Generator, n_crops: int, tokens: int) -> np.ndarray:
        """bool [n_crops, tokens**3] for crops of tokens³ patches; crops left unmasked are all False."""
        masks = np.zeros((n_crops, tokens ** 3), dtype=bool)
        for crop in masked_crops(rng, n_crops, self.probability):
            ratio = rng.uniform(*self.ratio)
            masks[crop] = rcc_mask(rng, tokens, ratio, cells=self.grid, box_fraction=self.box_fraction,
                                   box_aspect=self.box_aspect, exact_count=self.exact_count).reshape(-1)
        return masks
