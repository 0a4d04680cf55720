"""Deterministic synthetic CT phantoms (NIfTI, int16 HU) with label maps.

`python -m data_prep.synthetic --output DIR --count N` writes `DIR/phantom_000.nii.gz` (int16 HU),
`DIR/phantom_000_label.nii.gz` (uint8, same grid and affine) per volume and `DIR/labels.json`
(label index -> structure name).

The phantoms are for the quickstart and for tests that need many volumes; they look like CT *to the pipeline*
(air, a body outline that changes along z, fat and muscle walls, lungs above a domed diaphragm, heart, aorta,
spine, ribs, liver, spleen, kidneys and optional lesions, with textbook HU values and mild noise), not to a
radiologist. They never replace the real CT in tests.

Geometry. Anatomy is built on a grid whose axes (z, y, x) point to patient Superior, Posterior and Left (LPS),
so the liver is placed at negative x (the patient's right) and the spleen at positive x. Each volume is then
stored in one of several NIfTI voxel orders (LPS, RAS, LAS, LPI) with the matching affine, so that a loader
that trusts the array order instead of the affine puts organs on the wrong side. Every random choice (body
size and position, organ shapes, spacing, lesions) comes from `np.random.default_rng([seed, index])`, and
nibabel writes gzip with mtime 0, so the same seed gives byte-identical files.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from collections.abc import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from data_prep import outputs
from flexict_jax.progress import Progress

LABELS: dict[int, str] = {
    0: "background",
    1: "soft_tissue",
    2: "fat",
    3: "muscle",
    4: "lung_left",
    5: "lung_right",
    6: "liver",
    7: "spleen",
    8: "kidney_left",
    9: "kidney_right",
    10: "aorta",
    11: "vertebrae",
    12: "ribs",
    13: "heart",
    14: "lesion",
}
_ID = {name: index for index, name in LABELS.items()}

# NIfTI voxel orders the phantoms are stored in, cycled by volume index so that any four consecutive volumes
# exercise every one (a random draw could give a small test set a single orientation).
ORIENTATIONS = ("LPS", "RAS", "LAS", "LPI")

DEFAULT_SHAPE = (64, 128, 128)
AIR_HU = -1000.0
HU_MIN, HU_MAX = -1024, 3071  # the range a 12-bit CT scanner stores


@dataclasses.dataclass(frozen=True)
class Phantom:
    """One synthetic volume on an LPS grid: array axes (z, y, x) increase toward Superior, Posterior, Left."""

    hu: np.ndarray  # (z, y, x) int16
    label: np.ndarray  # (z, y, x) uint8, indices of LABELS
    spacing: tuple[float, float, float]  # (sz, sy, sx) mm
    origin_lps: tuple[float, float, float]  # world (L, P, S) mm of voxel [0, 0, 0]
    orientation: str  # NIfTI storage order (nibabel axcodes) used when the volume is written


def _superellipse(x: np.ndarray, y: np.ndarray, a, b, power: float) -> np.ndarray:
    """Inside test of |x/a|^p + |y/b|^p <= 1; a and b may vary along z (broadcast)."""
    return np.abs(x / a) ** power + np.abs(y / b) ** power <= 1.0


def _ellipsoid(x, y, z, centre, radii) -> np.ndarray:
    (cx, cy, cz), (rx, ry, rz) = centre, radii
    return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2 <= 1.0


def _paint(label: np.ndarray, mask: np.ndarray, name: str, where: Sequence[str] = ()) -> None:
    """Sets `mask` voxels to label `name`; with `where`, only voxels currently carrying one of those labels."""
    mask = np.broadcast_to(mask, label.shape)  # in-plane masks are the same on every slice
    if where:
        mask = mask & np.isin(label, [_ID[w] for w in where])
    label[mask] = _ID[name]


def make_phantom(seed: int, index: int, shape: Sequence[int] = DEFAULT_SHAPE,
                 spacing: Sequence[float] | None = None, lesions: bool = True) -> Phantom:
    """Builds phantom `index` of the set generated with `seed`.

    Args:
      seed, index: the generator is `np.random.default_rng([seed, index])`.
      shape: (Z, Y, X) voxels.
      spacing: (sz, sy, sx) mm; None draws one per volume so that the grid covers a 340-380 mm field in-plane
        and 180-240 mm along z whatever the shape (chest to upper abdomen).
      lesions: whether to add 1-3 lesions inside the organs.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be three sizes >= 8 (Z, Y, X), got {shape}")
    rng = np.random.default_rng([seed, index])
    if spacing is None:
        in_plane_fov, z_extent = rng.uniform(340.0, 380.0), rng.uniform(180.0, 240.0)
        spacing = (z_extent / shape[0], in_plane_fov / shape[1], in_plane_fov / shape[2])
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be three positive sizes in mm (sz, sy, sx), got {spacing}")
    sz, sy, sx = spacing
    nz, ny, nx = shape

    # Patient coordinates in mm: x toward Left, y toward Posterior, both 0 on the body axis, which sits off the
    # grid centre; z from 0 at the bottom slice. `t` is the fractional height: anatomy is placed by t so that
    # every shape shows lungs, diaphragm and abdomen.
    shift_x, shift_y = rng.uniform(-15.0, 15.0), rng.uniform(-12.0, 8.0)
    x = (np.arange(nx) - (nx - 1) / 2) * sx - shift_x
    y = (np.arange(ny) - (ny - 1) / 2) * sy - shift_y
    z = np.arange(nz) * sz
    extent = nz * sz
    t = z / extent
    x, y = x[None, None, :], y[None, :, None]
    z, t = z[:, None, None], t[:, None, None]

    # Body outline: a rounded box whose width and depth change smoothly with height (broader chest).
    a0, b0, power = rng.uniform(125.0, 148.0), rng.uniform(90.0, 112.0), rng.uniform(2.2, 2.8)
    wobble = rng.uniform(0.02, 0.05)
    a = a0 * (1.0 + 0.05 * (t - 0.5) + wobble * np.sin(2.0 * np.pi * (t + rng.uniform())))
    b = b0 * (1.0 + 0.10 * (t - 0.5))
    fat, muscle_wall = rng.uniform(10.0, 22.0), rng.uniform(8.0, 13.0)
    ai, bi = a - fat - muscle_wall, b - fat - muscle_wall  # the body cavity

    label = np.zeros(shape, np.uint8)
    _paint(label, _superellipse(x, y, a, b, power), "fat")
    _paint(label, _superellipse(x, y, a - fat, b - fat, power), "muscle")
    _paint(label, _superellipse(x, y, ai, bi, power), "soft_tissue")

    # Spine: vertebral bodies separated by discs, spinal canal and posterior arch, paraspinal muscles.
    b_mean = float(b0) - fat - muscle_wall
    r_vert = rng.uniform(15.0, 19.0)
    y_vert = b_mean - r_vert - rng.uniform(22.0, 30.0)
    vertebra_height, disc = rng.uniform(24.0, 30.0), rng.uniform(5.0, 7.0)
    in_disc = np.mod(z + rng.uniform(0.0, vertebra_height), vertebra_height) < disc
    body_disk = (x ** 2 + (y - y_vert) ** 2) <= r_vert ** 2
    y_canal = y_vert + r_vert + 9.0
    canal_r2 = x ** 2 + (y - y_canal) ** 2
    arch = (canal_r2 <= 15.0 ** 2) | ((np.abs(x) <= 5.0) & (y >= y_canal) & (y <= y_canal + 28.0))
    _paint(label, body_disk | arch, "vertebrae")
    _paint(label, (body_disk | arch) & in_disc, "soft_tissue")
    _paint(label, canal_r2 <= 8.0 ** 2, "soft_tissue")
    for side in (-1.0, 1.0):
        paraspinal = ((x - side * 38.0) / 24.0) ** 2 + ((y - y_canal - 12.0) / 22.0) ** 2 <= 1.0
        _paint(label, paraspinal, "muscle", where=("soft_tissue",))

    contrast = rng.uniform() < 0.5
    r_aorta = rng.uniform(10.0, 13.0)
    aorta_centre = (rng.uniform(12.0, 20.0), y_vert - r_vert - r_aorta - 3.0)
    _paint(label, (x - aorta_centre[0]) ** 2 + (y - aorta_centre[1]) ** 2 <= r_aorta ** 2, "aorta",
           where=("soft_tissue",))

    # Diaphragm: the right dome sits higher than the left (the liver pushes it up); the lungs fill the cavity
    # above it, the liver and spleen lie below it.
    a_mean = float(a0) - fat - muscle_wall
    dome_left = rng.uniform(0.42, 0.50)
    dome_right = dome_left + rng.uniform(0.04, 0.08)
    dome_height = rng.uniform(0.08, 0.14)

    def diaphragm(side: float, base: float) -> np.ndarray:
        r2 = ((x - side * 0.5 * a_mean) / (0.55 * a_mean)) ** 2 + ((y + 0.1 * b_mean) / (0.9 * b_mean)) ** 2
        return base + dome_height * np.clip(1.0 - r2, 0.0, 1.0)

    above_left, above_right = t > diaphragm(1.0, dome_left), t > diaphragm(-1.0, dome_right)

    heart_centre = (rng.uniform(15.0, 35.0), -0.35 * b_mean, (dome_left + 0.1) * extent)
    heart_radii = (rng.uniform(45.0, 58.0), rng.uniform(38.0, 48.0), rng.uniform(0.12, 0.16) * extent)
    _paint(label, _ellipsoid(x, y, z, heart_centre, heart_radii) & (above_left | above_right), "heart",
           where=("soft_tissue",))

    liver_radii = (0.55 * a_mean * rng.uniform(0.9, 1.05), 0.8 * b_mean, rng.uniform(0.22, 0.3) * extent)
    liver_centre = (-0.42 * a_mean, -0.05 * b_mean, (dome_right - 0.05) * extent)
    _paint(label, _ellipsoid(x, y, z, liver_centre, liver_radii) & ~above_right, "liver", where=("soft_tissue",))
    spleen_centre = (0.62 * a_mean, 0.35 * b_mean, (dome_left - 0.06) * extent)
    spleen_radii = (rng.uniform(22.0, 30.0), rng.uniform(40.0, 52.0), rng.uniform(0.08, 0.11) * extent)
    _paint(label, _ellipsoid(x, y, z, spleen_centre, spleen_radii) & ~above_left, "spleen", where=("soft_tissue",))
    # The right kidney sits lower than the left (under the liver).
    kidney_t = rng.uniform(0.22, 0.3)
    for side, name, drop in ((1.0, "kidney_left", 0.0), (-1.0, "kidney_right", rng.uniform(0.02, 0.05))):
        centre = (side * (r_vert + rng.uniform(40.0, 50.0)), y_vert - 2.0, (kidney_t - drop) * extent)
        radii = (rng.uniform(22.0, 28.0), rng.uniform(26.0, 32.0), rng.uniform(48.0, 58.0))
        _paint(label, _ellipsoid(x, y, z, centre, radii), name, where=("soft_tissue",))

    taper = 1.0 - 0.25 * np.clip((t - 0.6) / 0.4, 0.0, 1.0) ** 2  # lungs narrow toward the apex
    for side, name, above in ((1.0, "lung_left", above_left), (-1.0, "lung_right", above_right)):
        lung = (((x - side * 0.48 * a_mean) / (0.46 * a_mean * taper)) ** 2
                + ((y - 0.05 * b_mean) / (0.92 * b_mean * taper)) ** 2 <= 1.0)
        _paint(label, lung & above & (side * x > 8.0), name, where=("soft_tissue",))

    # Ribs: oblique bands (lower in front than at the back) in the outer cavity, from the lower chest up,
    # interrupted at the front where the costal cartilages are.
    rib_period, rib_width, rib_slope = rng.uniform(20.0, 26.0), rng.uniform(7.0, 10.0), rng.uniform(0.25, 0.45)
    rib_band = np.mod(z + rib_slope * y + rng.uniform(0.0, rib_period), rib_period) < rib_width
    rib_shell = ~_superellipse(x, y, ai - 10.0, bi - 10.0, power) & _superellipse(x, y, ai, bi, power)
    ribs = rib_band & rib_shell & (t > dome_left - 0.12) & ~((np.abs(x) < 30.0) & (y < 0.0))
    _paint(label, ribs, "ribs", where=("soft_tissue", "muscle", "lung_left", "lung_right"))

    if lesions:
        _add_lesions(rng, label, x, y, z)

    hu = _hounsfield(rng, label, contrast, x, y, y_vert, r_vert)
    origin_lps = (rng.uniform(-220.0, -150.0), rng.uniform(-220.0, -150.0), rng.uniform(-700.0, -100.0))
    return Phantom(hu=hu, label=label, spacing=spacing, origin_lps=origin_lps,
                   orientation=ORIENTATIONS[index % len(ORIENTATIONS)])


def _add_lesions(rng: np.random.Generator, label: np.ndarray, x, y, z) -> None:
    """1-3 ellipsoidal lesions centred in a random organ and clipped to it (they never leave their host)."""
    hosts = [name for name in ("liver", "spleen", "kidney_left", "kidney_right", "lung_left", "lung_right")
             if np.any(label == _ID[name])]
    for _ in range(int(rng.integers(1, 4))):
        host = str(rng.choice(hosts))
        voxels = np.argwhere(label == _ID[host])
        if len(voxels) == 0:  # an earlier lesion filled a small host
            continue
        kz, ky, kx = voxels[rng.integers(len(voxels))]
        radius = rng.uniform(4.0, 15.0)
        radii = (radius * rng.uniform(0.8, 1.2), radius * rng.uniform(0.8, 1.2), radius * rng.uniform(0.8, 1.2))
        centre = (x[0, 0, kx], y[0, ky, 0], z[kz, 0, 0])
        _paint(label, _ellipsoid(x, y, z, centre, radii), "lesion", where=(host,))


def _hounsfield(rng: np.random.Generator, label: np.ndarray, contrast: bool, x, y, y_vert: float, r_vert: float
                ) -> np.ndarray:
    """Per-label HU (textbook values, jittered per volume), partial-volume blur and scanner noise."""
    blood = rng.uniform(150.0, 250.0) if contrast else rng.uniform(35.0, 50.0)
    mean_hu = {
        "background": AIR_HU,
        "soft_tissue": rng.uniform(5.0, 25.0),  # bowel and mesentery, a fat/water mix
        "fat": rng.uniform(-110.0, -90.0),
        "muscle": rng.uniform(35.0, 50.0),
        "lung_left": rng.uniform(-870.0, -830.0),
        "liver": rng.uniform(55.0, 65.0),
        "spleen": rng.uniform(45.0, 55.0),
        "kidney_left": rng.uniform(30.0, 40.0) + (120.0 if contrast else 0.0),
        "aorta": blood,
        "heart": blood,
        "vertebrae": rng.uniform(900.0, 1100.0),  # cortical shell; the cancellous core is set below
        "ribs": rng.uniform(700.0, 900.0),
        "lesion": 0.0,  # set per lesion below
    }
    mean_hu["lung_right"] = mean_hu["lung_left"]
    mean_hu["kidney_right"] = mean_hu["kidney_left"]
    lut = np.array([mean_hu[LABELS[i]] for i in range(len(LABELS))], np.float32)
    hu = lut[label]

    cancellous = (label == _ID["vertebrae"]) & ((x ** 2 + (y - y_vert) ** 2) <= (r_vert - 3.0) ** 2)
    hu[cancellous] = rng.uniform(250.0, 350.0)
    lesion = label == _ID["lesion"]
    if lesion.any():
        # Each connected lesion is hypo- or hyperdense relative to soft tissue (nodules in lung are solid).
        components, count = ndimage.label(lesion)
        for k in range(1, count + 1):
            hu[components == k] = rng.choice([rng.uniform(0.0, 30.0), rng.uniform(100.0, 160.0)])

    hu = ndimage.gaussian_filter(hu, sigma=0.6)
    lung = np.isin(label, [_ID["lung_left"], _ID["lung_right"]])
    noise = rng.normal(0.0, rng.uniform(8.0, 18.0), label.shape).astype(np.float32)
    noise[lung] *= 3.0  # parenchyma is grainier than solid tissue
    return np.clip(np.rint(hu + noise), HU_MIN, HU_MAX).astype(np.int16)


def _lps_affine(spacing: Sequence[float], origin_lps: Sequence[float]) -> np.ndarray:
    """NIfTI affine (voxel (i, j, k) = (x, y, z) of the LPS grid -> RAS world mm)."""
    sz, sy, sx = spacing
    affine = np.diag([-sx, -sy, sz, 1.0])
    affine[:3, 3] = (-origin_lps[0], -origin_lps[1], origin_lps[2])
    return affine


def nifti_pair(phantom: Phantom) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """(image, label) NIfTI images in the phantom's storage orientation, with identical affines."""
    start = nib.orientations.axcodes2ornt(("L", "P", "S"))
    transform = nib.orientations.ornt_transform(start, nib.orientations.axcodes2ornt(tuple(phantom.orientation)))
    hu_ijk = phantom.hu.transpose(2, 1, 0)  # (z, y, x) -> NIfTI (i, j, k) = (x, y, z)
    affine = _lps_affine(phantom.spacing, phantom.origin_lps) @ nib.orientations.inv_ornt_aff(
        transform, hu_ijk.shape)
    images = []
    for array, dtype in ((hu_ijk, np.int16), (phantom.label.transpose(2, 1, 0), np.uint8)):
        data = np.ascontiguousarray(nib.orientations.apply_orientation(array, transform)).astype(dtype)
        image = nib.Nifti1Image(data, affine)
        image.set_data_dtype(dtype)
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
        image.header.set_xyzt_units("mm")
        images.append(image)
    return images[0], images[1]


def _output_paths(output: pathlib.Path, count: int) -> list[pathlib.Path]:
    names = [f"phantom_{i:03d}{suffix}.nii.gz" for i in range(count) for suffix in ("", "_label")]
    return [output / name for name in names] + [output / "labels.json"]


def write_phantoms(output: pathlib.Path, count: int, seed: int = 0, shape: Sequence[int] = DEFAULT_SHAPE,
                   spacing: Sequence[float] | None = None, lesions: bool = True, overwrite: bool = False,
                   progress: bool = True) -> list[pathlib.Path]:
    """Writes `count` phantoms and labels.json into `output`; returns the image paths.

    Raises FileExistsError, before writing anything, when a file it would write exists and not `overwrite`.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    output = pathlib.Path(output)
    if output.exists() and not output.is_dir():
        raise NotADirectoryError(f"{output} exists and is not a directory")
    existing = [p for p in _output_paths(output, count) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{len(existing)} output file(s) already exist in {output}, e.g. {existing[0].name}; "
                              "pass --overwrite to replace them")
    output.mkdir(parents=True, exist_ok=True)
    bar = Progress(count, "synthetic") if progress else None
    images = []
    for index in range(count):
        phantom = make_phantom(seed, index, shape, spacing, lesions)
        image, label = nifti_pair(phantom)
        path = output / f"phantom_{index:03d}.nii.gz"
        outputs.write_atomically(path, lambda tmp: nib.save(image, tmp))
        outputs.write_atomically(output / f"phantom_{index:03d}_label.nii.gz", lambda tmp: nib.save(label, tmp))
        images.append(path)
        if bar:
            bar.advance(1, f"{path.name} {phantom.orientation}")
    if bar:
        bar.close()
    # labels.json goes last: its presence marks a complete set (launch/quickstart.sh relies on it).
    labels_text = json.dumps({str(k): v for k, v in LABELS.items()}, indent=1) + "\n"
    outputs.write_atomically(output / "labels.json", lambda tmp: tmp.write_text(labels_text))
    return images


def _triple(kind: type, text: str) -> tuple:
    parts = text.split(",")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated values Z,Y,X, got {text!r}")
    try:
        return tuple(kind(p) for p in parts)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"bad value in {text!r}: {e}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.synthetic", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, type=pathlib.Path, help="directory for the NIfTI files")
    parser.add_argument("--count", required=True, type=int, help="number of volumes")
    parser.add_argument("--seed", type=int, default=0, help="same seed -> identical files (default 0)")
    parser.add_argument("--shape", type=lambda s: _triple(int, s), default=DEFAULT_SHAPE,
                        help="Z,Y,X voxels (default %(default)s)")
    parser.add_argument("--spacing", type=lambda s: _triple(float, s), default=None,
                        help="Z,Y,X mm (default: drawn per volume to cover ~360 mm in-plane, ~210 mm in z)")
    parser.add_argument("--no-lesions", action="store_true", help="do not add lesions")
    parser.add_argument("--overwrite", action="store_true", help="replace existing phantom files in --output")
    args = parser.parse_args(argv)
    try:
        images = write_phantoms(args.output, args.count, args.seed, args.shape, args.spacing,
                                lesions=not args.no_lesions, overwrite=args.overwrite)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {len(images)} phantom(s) with label maps to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
