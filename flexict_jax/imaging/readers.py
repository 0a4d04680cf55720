"""Reading source CT: NIfTI files (nibabel) and the sanity checks every source volume passes before ingest.

DICOM series reading lives in `flexict_jax.imaging.dicom`; both produce a `SourceVolume`.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np

from flexict_jax.imaging import geometry

NIFTI_SUFFIXES = (".nii.gz", ".nii")
LABEL_SUFFIXES = ("_label", "_seg")  # `<name>_label.nii.gz` beside `<name>.nii.gz` is that image's label map

# A real CT contains air or lung (about -1000 HU) and tissue, and its bulk lies in the 12-bit CT range
# [-2048, 4095] HU after rescale. Percentiles (not min/max) so that scanner padding outside the
# reconstruction circle (-2048 or -3024 on some vendors) and metal do not decide the check.
AIR_HU = -500.0
CT_RANGE_HU = (-2048.0, 4095.0)
# Percentiles are estimated from at most this many evenly strided voxels (exact enough, much faster).
_MAX_INTENSITY_SAMPLES = 2_000_000


class SourceError(ValueError):
    """A source file that cannot be ingested; the message names the file and the reason."""


@dataclasses.dataclass(frozen=True)
class SourceVolume:
    array: np.ndarray    # voxels in stored order (any real dtype), HU for images after rescale
    affine: np.ndarray   # 4x4 map from a voxel index of `array` to LPS mm


def file_sha256(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_nifti(path: Path | str) -> bool:
    return Path(path).name.endswith(NIFTI_SUFFIXES)


def nifti_stem(path: Path | str) -> str:
    """`foo.nii.gz` -> `foo`."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[:-len(suffix)]
    raise ValueError(f"{path}: not a NIfTI file name ({' or '.join(NIFTI_SUFFIXES)})")


def is_label_name(path: Path | str) -> bool:
    return is_nifti(path) and nifti_stem(path).endswith(LABEL_SUFFIXES)


def volume_shape(shape: tuple[int, ...], path: Path | str, what: str = "image") -> tuple[int, int, int]:
    """`shape` as 3D: drops trailing singleton axes (x, y, z, 1); refuses 2D, single slices and true 4D."""
    squeezed = tuple(shape)
    while len(squeezed) > 3 and squeezed[-1] == 1:
        squeezed = squeezed[:-1]
    if len(squeezed) > 3:
        raise SourceError(f"{path}: {what} is {len(shape)}D with shape {tuple(shape)}; "
                          f"one 3D volume per file expected")
    if len(squeezed) < 3 or min(squeezed) < 2:
        raise SourceError(f"{path}: {what} has shape {tuple(shape)}, not a 3D volume "
                          f"(at least 2 voxels along each of 3 axes)")
    return squeezed


def read_nifti(path: Path | str, what: str = "image") -> SourceVolume:
    """Voxels (scaled by scl_slope/scl_inter) and the LPS affine of a NIfTI file."""
    try:
        img = nib.load(path)
    except Exception as e:  # nibabel raises many types for unreadable headers
        raise SourceError(f"{path}: cannot read NIfTI header ({type(e).__name__}: {e})") from e
    header = img.header
    if int(header.get("sform_code", 0)) == 0 and int(header.get("qform_code", 0)) == 0:
        raise SourceError(f"{path}: no sform or qform in the header, so the patient orientation is unknown")
    shape = volume_shape(img.shape, path, what)  # before decompressing, e.g., a long 4D series
    try:
        array = np.asanyarray(img.dataobj)
    except Exception as e:  # EOFError / zlib.error (truncated gzip), ValueError / OSError (short file)
        raise SourceError(f"{path}: cannot read voxel data, truncated or corrupt file "
                          f"({type(e).__name__}: {e})") from e
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise SourceError(f"{path}: voxel type {array.dtype} is not a real scalar")
    array = array.reshape(shape)  # drops trailing singleton axes; a view for nibabel's F-ordered arrays
    affine = geometry.RAS_TO_LPS @ img.affine
    if (reason := geometry.check_affine(affine)) is not None:
        raise SourceError(f"{path}: {reason}")
    return SourceVolume(array=array, affine=affine)


def _check_finite(array: np.ndarray, path: Path | str, what: str) -> None:
    if np.issubdtype(array.dtype, np.floating):
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise SourceError(f"{path}: {what} has {bad} NaN/inf voxels")


def check_ct_intensity(array: np.ndarray, path: Path | str) -> None:
    """Refuses an image whose intensities are not CT Hounsfield units (e.g. 0..255, 0..1, HU+1024)."""
    _check_finite(array, path, "image")
    flat = array.ravel(order="K")
    sample = flat[::max(1, flat.size // _MAX_INTENSITY_SAMPLES)]
    p1, p50, p99 = np.percentile(sample, [1, 50, 99])
    observed = f"1st/50th/99th percentiles {p1:.0f}/{p50:.0f}/{p99:.0f}"
    if p1 > AIR_HU:
        raise SourceError(f"{path}: intensity range is not CT HU: no air (1st percentile {p1:.4g} > {AIR_HU:.0f} "
                          f"HU; {observed}); 0..255, 0..1 and HU+1024 images are refused")
    if p99 <= AIR_HU:
        raise SourceError(f"{path}: intensity range is not CT HU: no tissue ({observed})")
    if not (CT_RANGE_HU[0] <= p50 and p99 <= CT_RANGE_HU[1]):
        raise SourceError(f"{path}: intensity range is not CT HU: bulk outside [{CT_RANGE_HU[0]:.0f}, "
                          f"{CT_RANGE_HU[1]:.0f}] HU ({observed})")


def as_label_map(array: np.ndarray, path: Path | str) -> np.ndarray:
    """A label map as uint8; refuses non-integer or out-of-range class values."""
    _check_finite(array, path, "label map")
    lo, hi = array.min(), array.max()
    if lo < 0 or hi > 255:
        raise SourceError(f"{path}: label values must lie in 0..255, found {lo}..{hi}")
    if np.issubdtype(array.dtype, np.floating) and not np.array_equal(array, np.round(array)):
        raise SourceError(f"{path}: label map has non-integer values")
    return array.astype(np.uint8)
