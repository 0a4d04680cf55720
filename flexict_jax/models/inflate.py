"""One-time 2D → 3D conversion of a stage-1 backbone for stage 2 (docs/recipe.md §7, `inflate_patch_embed3d_from_2d`).

W3[t] = W2 / k for every depth index t (mode "avg"), bias copied: a volume constant along depth reproduces the
2D patch embedding of one slice. Every other backbone weight is reused unchanged; RoPE switches to 3D simply
because the input is 5-D. Runs once, at the hand-off, never on resume (upstream re-inflates every run, §13 #4).
"""
from __future__ import annotations

from typing import Any

import numpy as np


def inflate_patch_embed(backbone: dict[str, Any]) -> dict[str, Any]:
    """A copy of `backbone` params whose `patch_embed_3d` is inflated from `patch_embed_2d` (HWIO → DHWIO)."""
    kernel_2d = np.asarray(backbone["patch_embed_2d"]["kernel"])  # (k, k, in, D)
    depth = kernel_2d.shape[0]
    kernel_3d = np.broadcast_to(kernel_2d[None] / depth, (depth,) + kernel_2d.shape).copy()
    out = dict(backbone)
    out["patch_embed_3d"] = {"kernel": kernel_3d.astype(kernel_2d.dtype),
                             "bias": np.array(backbone["patch_embed_2d"]["bias"], copy=True)}
    return out
