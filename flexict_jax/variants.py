"""Which static variant (patch size, resolution) each training step uses.

Every distinct input shape needs its own compiled step (docs/recipe.md §14.1), so the variant is drawn per step, on the
host, from an RNG seeded by (seed, step): identical on every host, and the same after a resume (this fixes
upstream's interleaved, identically seeded loaders, docs/recipe.md §13 #6). The data pipeline calls the same function
to build batch t at the shapes of step t.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Variant:
    patch_size: int
    resolution_index: int = 0  # index into config.data.resolutions (stage 1.1); 0 where there is one resolution


def variant_for_step(seed: int, step: int, patch_sizes: Sequence[int], patch_size_probs: Sequence[float],
                     resolution_probs: Sequence[float] = (1.0,)) -> Variant:
    rng = np.random.default_rng([seed, step])
    patch_size = int(patch_sizes[rng.choice(len(patch_sizes), p=patch_size_probs)])
    resolution_index = int(rng.choice(len(resolution_probs), p=resolution_probs)) if len(resolution_probs) > 1 else 0
    return Variant(patch_size, resolution_index)


def all_variants(patch_sizes: Sequence[int], resolution_probs: Sequence[float] = (1.0,)) -> list[Variant]:
    return [Variant(p, r) for r in range(len(resolution_probs)) for p in patch_sizes]
