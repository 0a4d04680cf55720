"""DICOM CT series: finding them among files, checking their geometry and stacking them (pydicom).

A series is stacked only when its slices form one regular grid: same orientation and pixel grid on every
slice, positions strictly along the slice normal (no gantry tilt), no duplicate positions and a constant step
(no missing slice). Anything else is refused with the reason: a silently mis-stacked series would put the
anatomy at wrong world positions. A gantry-tilted series (positions drifting linearly off the normal) can
instead be stacked with its true, sheared affine (`gantry_tilt="resample"`); the ingest then resamples it onto
an orthogonal LPS grid in world space.

Compressed transfer syntaxes decode through pydicom's pixel-data plugins: JPEG 2000 (pylibjpeg-openjpeg), JPEG
Lossless (SV1 and other predictors), JPEG-LS and JPEG baseline/extended (pylibjpeg-libjpeg), RLE (pydicom).
Enhanced multi-frame CT (one file, many frames) is refused with the reason; export classic single-frame slices.

The slice step comes from ImagePositionPatient, never from SliceThickness (reconstructions overlap or leave
gaps: in ../shared/data/dicom/ts_torso_20 the tag says 3 mm, the step is 2 mm).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from flexict_jax import parallel
from flexict_jax.imaging.readers import SourceError, SourceVolume, file_sha256
from flexict_jax.progress import Progress

# Two slices closer than this (mm) along the normal are the same position.
DUPLICATE_TOL_MM = 1e-2
# Allowed deviation of one slice step from the mean step: relative part for rounding in the position tags
# (DS values carry at most 16 characters), absolute part for very thin slices.
STEP_REL_TOL, STEP_ABS_TOL_MM = 1e-2, 1e-3
# Largest in-plane drift of slice positions (fraction of the pixel spacing) before the stack counts as tilted.
TILT_TOL_PIXELS = 0.1
# Direction cosines of two slices closer than this are the same orientation.
ORIENTATION_TOL = 1e-4
GANTRY_TILT_MODES = ("refuse", "resample")
# Headers read per worker task: spawned processes make one task per file cost more than the read itself.
HEADERS_PER_TASK = 64


@dataclasses.dataclass(frozen=True)
class DicomSeries:
    uid: str                  # SeriesInstanceUID ("" when the files do not carry one)
    folder: Path              # deepest folder holding every file of the series
    files: tuple[Path, ...]   # sorted by path


def _classify(path: Path) -> tuple[str, str]:
    """("slice", series key) for a DICOM image slice, ("damaged", reason), or ("other", "") for anything else."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        return "other", ""
    except Exception as e:  # a DICOM preamble but an unreadable header
        return "damaged", f"cannot read DICOM header ({type(e).__name__}: {e})"
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1 and str(ds.get("Modality", "")) == "CT":
        # Enhanced CT keeps each frame's position in per-frame functional groups; refused, not ignored
        return "damaged", (f"enhanced multi-frame CT ({frames} frames, SOP class "
                           f"{ds.get('SOPClassUID', '?')}) is not supported; export it as single-frame slices "
                           f"(e.g. dcmtk's dcuncat or the scanner's classic CT export)")
    if "ImagePositionPatient" not in ds or "Rows" not in ds:
        return "other", ""
    uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
    return "slice", uid or f"folder:{Path(path).parent}"


def _classify_batch(paths: list[Path]) -> list[tuple[str, str]]:
    return [_classify(p) for p in paths]  # module level: spawned workers unpickle it


def find_series(files: Iterable[Path], workers: int = 1, progress: bool = False
                ) -> tuple[list[DicomSeries], list[tuple[Path, str]], list[Path]]:
    """Groups the DICOM image slices among `files` by series, reading the headers in `workers` processes.

    Returns (series, [(damaged DICOM file or refused enhanced CT, reason)], files that are not DICOM image
    slices: other formats, DICOMDIR, structured reports...). Files without a SeriesInstanceUID (anonymised
    exports such as the shared test series) are grouped by the folder they sit in.
    """
    paths = [Path(p) for p in files]
    batches = [paths[i:i + HEADERS_PER_TASK] for i in range(0, len(paths), HEADERS_PER_TASK)]
    bar = Progress(len(paths), "reading DICOM headers") if progress and paths else None
    groups: dict[str, list[Path]] = {}
    damaged, others = [], []
    for batch, kinds in zip(batches, parallel.ordered_map(_classify_batch, batches, workers if len(batches) > 1 else 1)):
        for path, (kind, detail) in zip(batch, kinds):
            if kind == "slice":
                groups.setdefault(detail, []).append(path)
            elif kind == "damaged":
                damaged.append((path, detail))
            else:
                others.append(path)
        if bar:
            bar.advance(len(batch))
    if bar:
        bar.close()
    series = []
    for key, members in sorted(groups.items()):
        members = sorted(members)
        folder = Path(os.path.commonpath([p.parent for p in members]))
        uid = "" if key.startswith("folder:") else key
        series.append(DicomSeries(uid=uid, folder=folder, files=tuple(members)))
    return series, damaged, others


def series_sha256(series: DicomSeries) -> str:
    """sha256 of the series' `sha256sum` listing (one `<hex>  <path relative to the folder>` line per file,
    sorted by path), i.e. `cd folder && sha256sum * | sha256sum` for a flat folder (shared/data README)."""
    listing = "".join(f"{file_sha256(p)}  {p.relative_to(series.folder)}\n"
                      for p in sorted(series.files, key=lambda p: str(p.relative_to(series.folder))))
    return hashlib.sha256(listing.encode()).hexdigest()


def _floats(ds: pydicom.Dataset, keyword: str, count: int, path: Path) -> np.ndarray:
    value = ds.get(keyword)
    try:
        values = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        values = np.array([])
    if values.shape != (count,) or not np.all(np.isfinite(values)):
        raise SourceError(f"{path}: missing or malformed {keyword} ({value!r})")
    return values


def _check_slice_type(ds: pydicom.Dataset, path: Path) -> None:
    modality = str(ds.get("Modality", "CT"))
    if modality != "CT":
        raise SourceError(f"{path}: Modality is {modality!r}, not CT")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise SourceError(f"{path}: multi-frame (enhanced) DICOM is not supported; export single-frame slices")
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if int(ds.get("SamplesPerPixel", 1)) != 1 or photometric != "MONOCHROME2":
        raise SourceError(f"{path}: PhotometricInterpretation {photometric!r} with "
                          f"{ds.get('SamplesPerPixel')} samples per pixel; CT slices are MONOCHROME2")


def stack_geometry(headers: Sequence[pydicom.Dataset], paths: Sequence[Path], where: Path,
                   gantry_tilt: str = "refuse") -> tuple[np.ndarray, np.ndarray]:
    """(slice order, 4x4 LPS affine of the stacked (slice, row, column) array) for a series' headers.

    Refuses mixed orientations or pixel grids, duplicate positions and non-uniform steps, and gantry tilt
    unless `gantry_tilt="resample"`: then the slice axis of the affine is the true slice-to-slice displacement
    (a sheared grid) when the positions lie on one straight line.
    """
    if gantry_tilt not in GANTRY_TILT_MODES:
        raise ValueError(f"gantry_tilt={gantry_tilt!r}; expected one of {GANTRY_TILT_MODES}")
    if len(headers) < 2:
        raise SourceError(f"{where}: a DICOM series of {len(headers)} slice is not a 3D volume")
    for ds, path in zip(headers, paths):
        _check_slice_type(ds, path)
    orientations = np.array([_floats(ds, "ImageOrientationPatient", 6, p) for ds, p in zip(headers, paths)])
    spacings = np.array([_floats(ds, "PixelSpacing", 2, p) for ds, p in zip(headers, paths)])
    positions = np.array([_floats(ds, "ImagePositionPatient", 3, p) for ds, p in zip(headers, paths)])
    sizes = {(int(ds.Rows), int(ds.Columns)) for ds in headers}

    odd = np.abs(orientations - orientations[0]).max(axis=1) > ORIENTATION_TOL
    if odd.any():
        i = int(np.argmax(odd))
        raise SourceError(f"{where}: mixed orientations: ImageOrientationPatient {orientations[0].tolist()} in "
                          f"{paths[0].name} but {orientations[i].tolist()} in {paths[i].name}")
    if len(sizes) > 1 or np.ptp(spacings, axis=0).max() > 1e-6:
        raise SourceError(f"{where}: slices differ in size {sorted(sizes)} or PixelSpacing")
    row_dir, col_dir = orientations[0][:3], orientations[0][3:]  # along a row (columns increase), down a column
    if (abs(np.linalg.norm(row_dir) - 1) > 1e-3 or abs(np.linalg.norm(col_dir) - 1) > 1e-3
            or abs(row_dir @ col_dir) > 1e-3):
        raise SourceError(f"{where}: ImageOrientationPatient {orientations[0].tolist()} is not two orthonormal "
                          f"direction cosines")
    normal = np.cross(row_dir, col_dir)

    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along, positions = along[order], positions[order]
    names = [paths[i].name for i in order]
    steps = np.diff(along)
    if (steps < DUPLICATE_TOL_MM).any():
        i = int(np.argmax(steps < DUPLICATE_TOL_MM))
        raise SourceError(f"{where}: duplicate slice position {along[i]:.3f} mm along the slice normal in "
                          f"{names[i]} and {names[i + 1]}")
    step = (along[-1] - along[0]) / (len(along) - 1)
    deviation = np.abs(steps - step)
    if deviation.max() > STEP_REL_TOL * step + STEP_ABS_TOL_MM:
        i = int(np.argmax(deviation))
        raise SourceError(f"{where}: non-uniform slice positions (missing slice?): step {steps[i]:.3f} mm "
                          f"between {names[i]} and {names[i + 1]}, mean step {step:.3f} mm; steps range "
                          f"{steps.min():.3f}..{steps.max():.3f} mm")
    drift = positions - positions[0] - np.outer(along - along[0], normal)
    drift_mm = float(np.linalg.norm(drift, axis=1).max())
    slice_axis = normal * step
    tolerance = TILT_TOL_PIXELS * spacings[0].min()
    if drift_mm > tolerance:
        tilt = headers[0].get("GantryDetectorTilt")
        if gantry_tilt == "refuse":
            raise SourceError(f"{where}: gantry tilt or sheared stack: slice positions drift {drift_mm:.2f} mm off "
                              f"the slice normal (GantryDetectorTilt {tilt}); refusing to stack it as a regular "
                              f"grid (--gantry-tilt=resample resamples it onto an orthogonal grid)")
        slice_axis = (positions[-1] - positions[0]) / (len(positions) - 1)
        off_line = positions - positions[0] - np.outer(np.arange(len(positions)), slice_axis)
        if np.linalg.norm(off_line, axis=1).max() > tolerance:
            raise SourceError(f"{where}: slice positions drift off the slice normal by varying amounts (not one "
                              f"gantry tilt, GantryDetectorTilt {tilt}); refusing to stack them")

    row_spacing, column_spacing = spacings[0]  # PixelSpacing = (between rows, between columns)
    affine = np.eye(4)
    affine[:3, 0] = slice_axis
    affine[:3, 1] = col_dir * row_spacing
    affine[:3, 2] = row_dir * column_spacing
    affine[:3, 3] = positions[0]
    return order, affine


def read_series(series: DicomSeries, gantry_tilt: str = "refuse") -> SourceVolume:
    """Stacks a series into HU (RescaleSlope/Intercept applied per slice) with its LPS affine (sheared for a
    gantry-tilted series read with gantry_tilt="resample")."""
    datasets = []
    for path in series.files:
        try:
            datasets.append(pydicom.dcmread(path))
        except Exception as e:  # pydicom raises many types for damaged files
            raise SourceError(f"{path}: cannot read DICOM ({type(e).__name__}: {e})") from e
    order, affine = stack_geometry(datasets, series.files, series.folder, gantry_tilt)
    slices = []
    for i in order:
        ds, path = datasets[i], series.files[i]
        try:
            pixels = ds.pixel_array
        except Exception as e:  # missing decoder, truncated pixel data, ...
            raise SourceError(f"{path}: cannot decode pixel data ({type(e).__name__}: {e})") from e
        slope = float(ds.RescaleSlope) if "RescaleSlope" in ds else 1.0
        intercept = float(ds.RescaleIntercept) if "RescaleIntercept" in ds else 0.0
        slices.append(pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept))
    return SourceVolume(array=np.stack(slices), affine=affine)
