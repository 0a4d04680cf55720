"""Voxel grids in LPS world space: exact reorientation to (z, y, x) LPS and field-of-view-preserving resampling.

Conventions (shared with `flexict_jax.data.volume_store`):
- World coordinates are DICOM patient coordinates, LPS, in mm. NIfTI (nibabel) affines are RAS+, so
  `L = -x_ras`, `P = -y_ras`, `S = z_ras` (`RAS_TO_LPS`).
- A source affine maps a voxel index of the array *as stored* to LPS. A `Grid` is a canonical output grid:
  axes (z, y, x) increase toward (S, P, L).
- Voxel-centre convention: an index is the centre of its voxel, so a grid with `n` voxels of spacing `s` covers
  `[origin - s/2, origin + (n - 1/2) s]` along that axis. Resampling to spacing `s'` keeps the centre of that
  field of view and uses `round(n s / s')` voxels, so `shape * spacing` changes by at most `s'/2` per axis.
"""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np
from scipy import ndimage

from flexict_jax.data import volume_store

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse
IMAGE_FILL_HU = -1024  # air, outside the source field of view
LABEL_FILL = 0
# Largest off-axis direction cosine still treated as axis-aligned: 1e-4 moves a voxel by at most 0.05 mm
# across a 500 mm field of view, far below any CT spacing, while float32 header noise (~1e-7) passes.
AXIS_ALIGNED_TOL = 1e-4
# Two grids whose origins differ by less than this (mm) are the same grid (float32 header round-off).
SAME_GRID_ATOL_MM = 1e-3
# Canonical output axis (z=0, y=1, x=2) of each world axis (L=0, P=1, S=2).
_OUTPUT_AXIS_OF_WORLD = (2, 1, 0)
_POSITIVE_LETTER, _NEGATIVE_LETTER = "LPS", "RAI"


@dataclasses.dataclass(frozen=True)
class Grid:
    """A canonical (z, y, x) LPS voxel grid."""
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]      # (sz, sy, sx) mm
    origin_lps: tuple[float, float, float]   # LPS position (mm) of the centre of voxel (0, 0, 0)

    @property
    def affine(self) -> np.ndarray:
        return volume_store.affine_zyx_to_lps(self.spacing, self.origin_lps)

    def same_as(self, other: Grid) -> bool:
        return (self.shape == other.shape
                and np.allclose(self.spacing, other.spacing, rtol=1e-6, atol=0)
                and np.allclose(self.origin_lps, other.origin_lps, rtol=0, atol=SAME_GRID_ATOL_MM))


def check_affine(affine: np.ndarray) -> str | None:
    """Why an index-to-world affine is unusable, or None when it is fine."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        return f"voxel-to-world affine is not a finite 4x4 matrix: {affine.tolist()}"
    if not np.allclose(affine[3], [0, 0, 0, 1]):
        return f"voxel-to-world affine has a projective last row {affine[3].tolist()}"
    norms = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(norms < 1e-6):
        return f"voxel spacing is zero along an axis (column norms {norms.tolist()})"
    if abs(np.linalg.det(affine[:3, :3] / norms)) < 1e-3:
        return "voxel axes are (nearly) parallel: the affine is singular"
    return None


def _direction_cosines(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    norms = np.linalg.norm(linear, axis=0)
    return linear / norms, norms


def is_axis_aligned(affine: np.ndarray) -> bool:
    """True when every voxel axis runs along one world axis (up to `AXIS_ALIGNED_TOL`)."""
    cosines, _ = _direction_cosines(affine)
    dominant = np.abs(cosines).argmax(axis=0)
    off_axis = np.abs(cosines).copy()
    off_axis[dominant, range(3)] = 0
    return len(set(dominant.tolist())) == 3 and off_axis.max() <= AXIS_ALIGNED_TOL


def _world_axis_assignment(affine: np.ndarray) -> tuple[int, int, int]:
    """World axis (L=0, P=1, S=2) closest to each voxel axis, as a permutation (also for oblique axes)."""
    cosines, _ = _direction_cosines(affine)
    return max(itertools.permutations(range(3)),
               key=lambda world: sum(abs(cosines[w, a]) for a, w in enumerate(world)))


def orientation_code(affine: np.ndarray) -> str:
    """Patient direction each stored voxel axis increases toward, e.g. 'LAS' (nibabel's aff2axcodes)."""
    cosines, _ = _direction_cosines(affine)
    world = _world_axis_assignment(affine)
    return "".join((_POSITIVE_LETTER if cosines[w, a] > 0 else _NEGATIVE_LETTER)[w] for a, w in enumerate(world))


def _reorientation(shape: tuple[int, ...], affine: np.ndarray) -> tuple[list[int], list[int], Grid]:
    """(source axis of each output axis, output axes to flip, resulting grid) for an axis-aligned affine."""
    if not is_axis_aligned(affine):
        raise ValueError("exact reorientation needs axis-aligned voxel axes; oblique volumes are resampled")
    cosines, norms = _direction_cosines(affine)
    world = _world_axis_assignment(affine)
    source_axis = [0, 0, 0]
    for a, w in enumerate(world):
        source_axis[_OUTPUT_AXIS_OF_WORLD[w]] = a
    flipped = [cosines[world[a], a] < 0 for a in range(3)]
    first_voxel = [shape[a] - 1 if flipped[a] else 0 for a in range(3)]
    origin = (np.asarray(affine, dtype=np.float64) @ [*first_voxel, 1.0])[:3]
    grid = Grid(shape=tuple(int(shape[a]) for a in source_axis),
                spacing=tuple(float(norms[a]) for a in source_axis),
                origin_lps=tuple(float(v) for v in origin))
    return source_axis, [o for o in range(3) if flipped[source_axis[o]]], grid


def reorient(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, Grid]:
    """Exact permutation/flip of an axis-aligned volume to canonical (z, y, x) LPS; no interpolation."""
    source_axis, flip_axes, grid = _reorientation(array.shape, affine)
    return np.ascontiguousarray(np.flip(np.transpose(array, source_axis), axis=flip_axes)), grid


def _fov_preserving_count(extent_mm: float, spacing: float) -> int:
    return max(1, int(np.floor(extent_mm / spacing + 0.5 + 1e-9)))


def resampled_grid(grid: Grid, spacing: tuple[float, float, float]) -> Grid:
    """`grid`'s field of view at a new (sz, sy, sx) spacing, centred on the same point."""
    shape, origin = [], list(grid.origin_lps)
    for o, (n, s, new_s) in enumerate(zip(grid.shape, grid.spacing, spacing)):
        new_n = _fov_preserving_count(n * s, new_s)
        w = _OUTPUT_AXIS_OF_WORLD.index(o)
        centre = grid.origin_lps[w] + (n - 1) * s / 2
        origin[w] = centre - (new_n - 1) * new_s / 2
        shape.append(new_n)
    return Grid(tuple(shape), tuple(float(s) for s in spacing), tuple(float(v) for v in origin))


def native_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Source voxel spacing as (sz, sy, sx), each taken from the voxel axis closest to that world axis."""
    _, norms = _direction_cosines(affine)
    spacing = [0.0, 0.0, 0.0]
    for a, w in enumerate(_world_axis_assignment(affine)):
        spacing[_OUTPUT_AXIS_OF_WORLD[w]] = float(norms[a])
    return tuple(spacing)


def canonical_grid(shape: tuple[int, ...], affine: np.ndarray,
                   spacing: tuple[float, float, float] | None = None) -> Grid:
    """The LPS grid a source volume is stored on: its field of view at `spacing` (None keeps the native one).

    Axis-aligned sources keep their exact field of view; an oblique source gets the axis-aligned bounding box
    of its voxels (the corners outside the source are filled when resampling).
    """
    if is_axis_aligned(affine):
        native = _reorientation(shape, affine)[2]
        return native if spacing is None else resampled_grid(native, spacing)
    spacing = native_spacing(affine) if spacing is None else spacing
    corners = np.array(list(itertools.product(*[(-0.5, n - 0.5) for n in shape[:3]])))
    world = corners @ np.asarray(affine, dtype=np.float64)[:3, :3].T + np.asarray(affine)[:3, 3]
    lo, hi = world.min(axis=0), world.max(axis=0)
    shape_zyx, origin = [0, 0, 0], [0.0, 0.0, 0.0]
    for w in range(3):
        o = _OUTPUT_AXIS_OF_WORLD[w]
        n = _fov_preserving_count(hi[w] - lo[w], spacing[o])
        shape_zyx[o] = n
        origin[w] = (lo[w] + hi[w]) / 2 - (n - 1) * spacing[o] / 2
    return Grid(tuple(shape_zyx), tuple(float(s) for s in spacing), tuple(origin))


def _inside_source(matrix: np.ndarray, offset: np.ndarray, source_shape: tuple[int, ...],
                   out_shape: tuple[int, ...]) -> np.ndarray:
    """Mask of output voxels whose centre lies inside the source field of view (voxel cells included)."""
    lo, hi = -0.5 - 1e-6, np.asarray(source_shape, dtype=np.float64) - 0.5 + 1e-6
    y = np.arange(out_shape[1], dtype=np.float64)[:, None]
    x = np.arange(out_shape[2], dtype=np.float64)[None, :]
    mask = np.empty(out_shape, dtype=bool)
    for z in range(out_shape[0]):  # one slice at a time keeps the coordinate arrays small
        inside = np.ones(out_shape[1:], dtype=bool)
        for a in range(3):
            coord = matrix[a, 0] * z + matrix[a, 1] * y + matrix[a, 2] * x + offset[a]
            inside &= (coord >= lo) & (coord <= hi[a])
        mask[z] = inside
    return mask


def resample(array: np.ndarray, affine: np.ndarray, grid: Grid, order: int, fill: float) -> np.ndarray:
    """Samples `array` (voxel-to-LPS `affine`) at the voxel centres of `grid`.

    order 1 = trilinear in float32 (images), order 0 = nearest neighbour in the input dtype (label maps).
    Output voxels within the source's voxel cells but beyond its outermost centres take the edge value
    (they are inside the field of view); voxels outside the source field of view get `fill`.
    """
    to_source = np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ grid.affine
    # Drop float noise so that an output voxel landing on a source voxel samples it exactly.
    near_integer = np.abs(to_source - np.round(to_source)) < 1e-9
    to_source[near_integer] = np.round(to_source[near_integer])
    matrix, offset = to_source[:3, :3], to_source[:3, 3]
    diagonal = not np.any(matrix - np.diag(np.diag(matrix)))
    out = ndimage.affine_transform(
        array, np.diag(matrix) if diagonal else matrix, offset=offset, output_shape=grid.shape,
        output=np.float32 if order else array.dtype, order=order, mode="nearest", prefilter=False)
    out[~_inside_source(matrix, offset, array.shape, grid.shape)] = fill
    return out


def needs_resampling(shape: tuple[int, ...], affine: np.ndarray, grid: Grid) -> bool:
    """False when an exact reorientation of the source already gives `grid`."""
    return not (is_axis_aligned(affine) and _reorientation(shape, affine)[2].same_as(grid))


def to_grid(array: np.ndarray, affine: np.ndarray, grid: Grid, order: int, fill: float) -> np.ndarray:
    """`array` on `grid`: exact reorientation when that already gives `grid`, else world-space resampling."""
    if is_axis_aligned(affine):
        array, native = reorient(array, affine)
        if not needs_resampling(array.shape, native.affine, grid):
            return array
        affine = native.affine
    return resample(array, affine, grid, order, fill)
