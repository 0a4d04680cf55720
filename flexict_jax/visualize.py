"""Pictures of a checkpoint's features and of a run's curves (matplotlib, PNG).

    python -m flexict_jax.visualize features --checkpoint=CKPT --kind={2d,3d} --input=CT --out=DIR \\
        [--query=z,y,x ...] [--step=N] [--patch-size=P]
    python -m flexict_jax.visualize curves --workdir=RUN --out=DIR

features: the CT (NIfTI file or DICOM folder) is prepared as `embed` prepares it (2d: every axial slice at
1.5 mm in-plane; 3d: the 160³ crop at 2 mm); the patch tokens of the body (tokens whose voxels are mostly above
air) are centred and reduced by PCA (fitted on the body's interior, without the outline tokens) to 3
components, each coloured by its rank, shown as RGB beside the CT on the axial, coronal and sagittal planes
through the volume's centre (pca_axial.png, pca_coronal.png, pca_sagittal.png), and for each query point the
cosine similarity of its centred token to every token of its axial and coronal planes (similarity_<i>.png).
A smaller --patch-size gives a finer token grid (a model trained with patch sizes 16 and 8 takes both). A query is
z,y,x in voxels of the model input grid (LPS, as `embed` writes it), or z,y,x mm in LPS millimetres (suffix
"mm"); default: three points on the body of the central axial slice. Anatomy-aligned features show organs as
regions of one colour and light up the query's organ.

curves: loss terms, learning-rate / temperature / momentum schedules and eval/* metrics of WORKDIR/metrics.jsonl
over steps (curves.png); after a resume the file repeats steps, and the last record of a step wins. The DINO and
iBOT terms are drawn against their uniform-target values ln K and ½·ln K (K = heads.num_prototypes of
config.json), the values they sit at while nothing is learned.
Exit 0 on success, 1 on any error.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DPI = 100
PLANE_FIGSIZE = (8.0, 4.0)  # inches: 800 x 400 px per plane picture
SIMILARITY_FIGSIZE = (12.0, 4.0)
CURVES_FIGSIZE = (15.0, 4.5)
RETRIEVAL_FIGSIZE = (14.0, 4.5)
LOSS_TERMS = ("loss", "dino_local", "dino_global", "ibot", "koleo", "gram", "clip", "siglip", "osl")
SCHEDULES = ("lr", "teacher_temperature", "momentum", "weight_decay")
PLANES = ("axial", "coronal", "sagittal")


# --- features ---------------------------------------------------------------------------------------------

def body_tokens(inputs: np.ndarray, patch_size: int) -> np.ndarray:
    """[N, P] True for tokens whose voxels are mostly body: above the sample's air level (its minimum, as the HU
    window clamps air and the padding is air or the minimum) by a quarter standard deviation."""
    from flexict_jax.evals.features import patch_majority

    floor = inputs.reshape(len(inputs), -1).min(axis=1).reshape((-1,) + (1,) * (inputs.ndim - 1))
    majority, _ = patch_majority((inputs > floor + 0.25).astype(np.int64), patch_size)
    return majority == 1


def interior_tokens(mask: np.ndarray, axes: Sequence[int]) -> np.ndarray:
    """Body tokens whose neighbours along `axes` are body too. Tokens on the body outline mix air and skin; their
    features differ from everything else by far more than organs differ from each other, so a PCA fitted with
    them spends its first components on the outline."""
    inner = mask.copy()
    for axis in axes:
        ahead, behind = [slice(None)] * mask.ndim, [slice(None)] * mask.ndim
        ahead[axis], behind[axis] = slice(1, None), slice(None, -1)
        inner[tuple(ahead)] &= mask[tuple(behind)]
        inner[tuple(behind)] &= mask[tuple(ahead)]
        edge = [slice(None)] * mask.ndim
        for end in (0, -1):  # a token on the grid's border has a neighbour outside the picture: not interior
            edge[axis] = end
            inner[tuple(edge)] = False
    return inner


def centred(features: np.ndarray, fit: np.ndarray) -> np.ndarray:
    """Features minus their mean over the `fit` tokens: every token shares a large common component (raw body
    tokens are 0.9-cosine-similar to each other), which would hide the differences between organs."""
    return features.astype(np.float64) - features[fit].astype(np.float64).mean(0)


def pca_rgb(features: np.ndarray, mask: np.ndarray, fit: np.ndarray | None = None) -> np.ndarray:
    """[..., 3] colours in [0, 1]: the first 3 principal components of the centred features, fitted on the
    `fit` tokens (default: all masked ones; the pictures pass the interior of the body) and applied to every
    masked token. Each component is coloured by its rank among the `fit` tokens (histogram equalisation), so
    every picture uses the full colour range: features that separate organs paint them as regions, features
    that do not paint noise. Unmasked tokens are black."""
    fit = mask if fit is None or fit.sum() < 4 else fit & mask
    x = centred(features, fit)
    _, _, vt = np.linalg.svd(x[fit], full_matrices=False)
    projected = x @ vt[:3].T
    rgb = np.zeros(projected.shape)
    for c in range(projected.shape[-1]):
        reference = np.sort(projected[fit][:, c])  # outline tokens beyond the interior's range saturate
        rgb[..., c] = np.searchsorted(reference, projected[..., c]) / len(reference)
    rgb = np.clip(rgb, 0, 1)
    rgb[~mask] = 0
    return rgb


def _plane(volume: np.ndarray, plane: str, index: int) -> np.ndarray:
    """A plane of a (z, y, x, ...) array shown with superior up (coronal, sagittal) / anterior up (axial)."""
    if plane == "axial":
        return volume[index]
    if plane == "coronal":
        return volume[:, index][::-1]
    return volume[:, :, index][::-1]


def _extent(shape_zyx: Sequence[int], spacing: Sequence[float], plane: str) -> list[float]:
    z, y, x = (n * s for n, s in zip(shape_zyx, spacing))
    return {"axial": [0, x, y, 0], "coronal": [0, x, 0, z], "sagittal": [0, y, 0, z]}[plane]


def feature_volume(loaded, inputs: np.ndarray, kind: str, patch_size: int, batch_size: int = 8
                   ) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(features [Z, Gy, Gx, dim], body mask [Z, Gy, Gx], token size (z, y, x) in input voxels) of prepared
    inputs: 2d slices stack along z (one token per slice), a 3d input is one token grid."""
    from flexict_jax import embed
    from flexict_jax.progress import Progress

    progress = Progress(len(inputs), "visualize: features")
    _, patch = embed.encode(loaded.model, inputs, patch_size, batch_size, progress)
    progress.close()
    mask = body_tokens(inputs, patch_size)
    grid = [n // patch_size for n in inputs.shape[1:]]
    if kind == "2d":
        return patch.reshape([len(inputs)] + grid + [-1]), mask.reshape([len(inputs)] + grid), [1, patch_size,
                                                                                                 patch_size]
    return patch.reshape(grid + [-1]), mask.reshape(grid), [patch_size] * 3


def default_queries(mask: np.ndarray) -> list[tuple[int, int, int]]:
    """Three body tokens of the central axial slice: its centre of mass and halfway to its left/right edge."""
    z = mask.shape[0] // 2
    zs = np.flatnonzero(mask.reshape(len(mask), -1).any(1))
    if len(zs):
        z = int(zs[np.argmin(abs(zs - z))])
    ys, xs = np.nonzero(mask[z])
    if not len(ys):
        raise ValueError("no body token found: is the input a CT in HU?")
    cy, cx = int(round(ys.mean())), int(round(xs.mean()))
    points = [(z, cy, cx), (z, cy, (cx + int(xs.min())) // 2), (z, cy, (cx + int(xs.max())) // 2)]
    return [(z, int(ys[np.argmin((ys - y) ** 2 + (xs - x) ** 2)]), int(xs[np.argmin((ys - y) ** 2 + (xs - x) ** 2)]))
            for z, y, x in points]


def parse_query(text: str, affine: np.ndarray | None) -> np.ndarray:
    """Voxel indices (z, y, x) of the model input from 'z,y,x' (voxels) or 'z,y,x mm': millimetres in the same
    axis order, i.e. S, P, L of the LPS frame, mapped through the input's affine."""
    body = text.strip()
    in_mm = body.endswith("mm")
    try:
        values = [float(v) for v in body.removesuffix("mm").split(",")]
    except ValueError:
        values = []
    if len(values) != 3:
        raise ValueError(f"--query {text!r}: expected z,y,x (voxels) or z,y,x mm")
    if not in_mm:
        return np.asarray(values)
    if affine is None:
        raise ValueError(f"--query {text!r}: mm queries need a NIfTI/DICOM input (its affine)")
    s, p, l = values
    return (np.linalg.inv(affine) @ np.asarray([l, p, s, 1.0]))[:3]


def write_feature_pictures(loaded, path: pathlib.Path, kind: str, out: pathlib.Path, *,
                           patch_size: int | None = None, queries: Sequence[str] = ()) -> list[pathlib.Path]:
    """pca_<plane>.png and similarity_<i>.png for one CT (module docstring); returns the files written."""
    from flexict_jax import embed

    patch_size = patch_size or loaded.arch.base_patch_size
    inputs, extra = embed.prepare(path, kind, embed.Preprocessing.preset(kind), patch_size, None)
    features, mask, token = feature_volume(loaded, inputs, kind, patch_size)
    image = inputs if kind == "2d" else inputs[0]  # (z, y, x) model input
    spacing = [float(s) for s in extra["spacing_mm"]] if "spacing_mm" in extra else [1.0, 1.0, 1.0]
    if not mask.any():
        raise ValueError(f"{path}: no body token found (is it a CT in HU?)")
    inplane = (1, 2)  # 2d: tokens of one slice neighbour each other in y and x only
    rgb = pca_rgb(features, mask, interior_tokens(mask, inplane if kind == "2d" else (0, 1, 2)))
    out.mkdir(parents=True, exist_ok=True)
    written = []
    centre = [int(round(v)) for v in np.argwhere(mask).mean(0)]
    for plane, axis in zip(PLANES, range(3)):
        fig, (ax_ct, ax_pca) = plt.subplots(1, 2, figsize=PLANE_FIGSIZE, dpi=DPI)
        extent = _extent(image.shape, spacing, plane)
        ax_ct.imshow(_plane(image, plane, centre[axis] * token[axis] + token[axis] // 2), cmap="gray",
                     extent=extent, interpolation="nearest")
        ax_pca.imshow(_plane(rgb, plane, centre[axis]), extent=extent, interpolation="nearest")
        ax_ct.set_title(f"CT, {plane}")
        ax_pca.set_title(f"patch features: PCA → RGB (patch {patch_size})")
        for ax in (ax_ct, ax_pca):
            ax.set_xlabel("mm")
        fig.suptitle(f"{loaded.source}", fontsize=8)
        fig.tight_layout()
        written.append(out / f"pca_{plane}.png")
        fig.savefig(written[-1], dpi=DPI)
        plt.close(fig)
    affine = extra.get("input_affine_zyx_to_lps")
    points = ([tuple(int(v) for v in np.asarray(parse_query(q, affine)) // np.asarray(token)) for q in queries]
              if queries else default_queries(mask))
    relative = centred(features, mask)
    unit = relative / np.maximum(np.linalg.norm(relative, axis=-1, keepdims=True), 1e-12)
    for i, (qz, qy, qx) in enumerate(points):
        if not all(0 <= v < n for v, n in zip((qz, qy, qx), mask.shape)):
            raise ValueError(f"query {i} at token {(qz, qy, qx)} lies outside the token grid {mask.shape}")
        similarity = unit @ unit[qz, qy, qx]
        fig, axes = plt.subplots(1, 3, figsize=SIMILARITY_FIGSIZE, dpi=DPI)
        z_voxel, y_voxel, x_voxel = (v * t + t // 2 for v, t in zip((qz, qy, qx), token))
        extent = _extent(image.shape, spacing, "axial")
        axes[0].imshow(image[z_voxel], cmap="gray", extent=extent)
        axes[1].imshow(similarity[qz], cmap="magma", vmin=-1, vmax=1, extent=extent, interpolation="nearest")
        coronal = _extent(image.shape, spacing, "coronal")
        im = axes[2].imshow(_plane(similarity, "coronal", qy), cmap="magma", vmin=-1, vmax=1, extent=coronal,
                            interpolation="nearest")
        point_axial = ((x_voxel + 0.5) * spacing[2], (y_voxel + 0.5) * spacing[1])
        for ax in axes[:2]:
            ax.plot(*point_axial, marker="+", color="cyan", markersize=14, markeredgewidth=2)
        # The coronal plane is drawn superior up over an extent whose height is z (mm) from the first slice.
        axes[2].plot(point_axial[0], (z_voxel + 0.5) * spacing[0], marker="+",
                     color="cyan", markersize=14, markeredgewidth=2)
        axes[0].set_title(f"query (z, y, x) = {(z_voxel, y_voxel, x_voxel)} voxels")
        axes[1].set_title("cosine similarity, axial")
        axes[2].set_title("cosine similarity, coronal")
        fig.colorbar(im, ax=axes[2], fraction=0.046)
        fig.tight_layout()
        written.append(out / f"similarity_{i}.png")
        fig.savefig(written[-1], dpi=DPI)
        plt.close(fig)
    return written


# --- curves -----------------------------------------------------------------------------------------------

def read_metrics(workdir: str | pathlib.Path) -> list[dict[str, Any]]:
    """metrics.jsonl merged per step (a resumed run logs some steps again: for each key, the last value logged
    at a step wins; training and eval records of one step are joined), in step order."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics (not a training workdir?)")
    by_step: dict[int, dict[str, Any]] = {}
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}:{line_no}: not a metrics record ({e})") from e
        by_step.setdefault(step, {}).update(record)
    return [by_step[s] for s in sorted(by_step)]


def _series(records: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pairs = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))
             and not isinstance(r.get(key), bool) and math.isfinite(r[key])]
    return np.asarray([p[0] for p in pairs]), np.asarray([p[1] for p in pairs], np.float64)


def write_curves(workdir: str | pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """curves.png of a run (module docstring)."""
    workdir = pathlib.Path(workdir)
    records = read_metrics(workdir)
    config_path = workdir / "config.json"
    prototypes = None
    if config_path.is_file():
        prototypes = json.loads(config_path.read_text()).get("heads", {}).get("num_prototypes")
    eval_keys = sorted({k for r in records for k in r if k.startswith("eval/") and "/" not in k[5:]
                        and k not in ("eval/seconds", "eval/examples")})
    fig, axes = plt.subplots(1, 3, figsize=CURVES_FIGSIZE, dpi=DPI)
    for key in LOSS_TERMS:
        steps, values = _series(records, key)
        if len(steps):
            axes[0].plot(steps, values, label=key)
    if prototypes:
        axes[0].axhline(math.log(prototypes), color="gray", linestyle="--", label=f"ln K (K={prototypes})")
        axes[0].axhline(0.5 * math.log(prototypes), color="gray", linestyle=":", label="½·ln K")
    axes[0].set_title("loss terms")
    for key in SCHEDULES:
        steps, values = _series(records, key)
        if len(steps):
            axes[1].plot(steps, values / max(abs(values).max(), 1e-12), label=f"{key} (max {abs(values).max():.3g})")
    axes[1].set_title("schedules (each divided by its max)")
    for key in eval_keys:
        steps, values = _series(records, key)
        axes[2].plot(steps, values, marker="o", label=key.removeprefix("eval/"))
    axes[2].set_title("evaluation" if eval_keys else "evaluation (none logged)")
    for ax in axes:
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(str(workdir), fontsize=8)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "curves.png", dpi=DPI)
    plt.close(fig)
    return out / "curves.png"


# --- retrieval examples -------------------------------------------------------------------------------------

def retrieval_examples(evaluator, images: np.ndarray, reports: np.ndarray, out: pathlib.Path, *,
                       count: int = 4) -> list[pathlib.Path]:
    """retrieval_<i>.png for the first `count` examples of a `Stage3Evaluator`: mid-slices of the image's
    evaluation crop and its 3 most similar reports, the true one marked (and added below when it ranks lower)."""
    from flexict_jax.data.pipeline_align import report_text

    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # noqa: E731
    scores = unit(images) @ unit(reports).T
    crops = []
    for local in evaluator.dataset:  # this process's rows, in record order on one process
        crops += list(local["global_crops"][:, 0, ..., 0])
        if len(crops) >= count:
            break
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(min(count, len(crops), evaluator.n_examples)):
        crop = crops[i]
        ranking = np.argsort(-scores[i], kind="stable")
        fig = plt.figure(figsize=RETRIEVAL_FIGSIZE, dpi=DPI)
        for j, plane in enumerate(PLANES):
            ax = fig.add_subplot(1, 5, j + 1)
            ax.imshow(_plane(crop, plane, crop.shape[j] // 2), cmap="gray")
            ax.set_title(plane)
            ax.axis("off")
        ax = fig.add_subplot(1, 5, (4, 5))
        ax.axis("off")
        rank = int(np.flatnonzero(ranking == i)[0]) + 1
        lines = [f"example {i}: true report ranked {rank} of {len(ranking)}", ""]
        shown = list(ranking[:3]) + ([i] if rank > 3 else [])  # the true report, wherever it ranks
        for j in shown:
            r = int(np.flatnonzero(ranking == j)[0]) + 1
            mark = ">> TRUE REPORT" if j == i else "wrong"
            text = textwrap.shorten(report_text(evaluator.records[j]), 300)
            lines += [f"{r}. [{mark}] cos {scores[i, j]:.3f}", *textwrap.wrap(text, 70), ""]
        ax.text(0, 1, "\n".join(lines), va="top", ha="left", fontsize=8, family="monospace", transform=ax.transAxes)
        fig.tight_layout()
        written.append(out / f"retrieval_{i}.png")
        fig.savefig(written[-1], dpi=DPI)
        plt.close(fig)
    return written


# --- CLI --------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flexict_jax.visualize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    features = commands.add_parser("features", help="PCA and similarity maps of a checkpoint's patch features")
    features.add_argument("--checkpoint", required=True, type=pathlib.Path,
                          help="training/imported workdir, .pth file or safetensors export folder")
    features.add_argument("--step", type=int, default=None)
    features.add_argument("--kind", required=True, choices=("2d", "3d"))
    features.add_argument("--input", required=True, type=pathlib.Path, help="NIfTI file or DICOM series folder")
    features.add_argument("--out", required=True, type=pathlib.Path)
    features.add_argument("--patch-size", type=int, default=None)
    features.add_argument("--query", action="append", default=[],
                          help="z,y,x voxels of the model input, or 'z,y,x mm' (S,P,L mm); repeatable")
    curves = commands.add_parser("curves", help="loss, schedules and eval metrics of a run")
    curves.add_argument("--workdir", required=True, type=pathlib.Path)
    curves.add_argument("--out", required=True, type=pathlib.Path)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from flexict_jax.imaging.readers import SourceError
    try:
        if args.command == "curves":
            written = [write_curves(args.workdir, args.out)]
        else:
            from flexict_jax.evals.features import load_encoder
            loaded = load_encoder(args.checkpoint, args.step, args.kind)
            written = write_feature_pictures(loaded, args.input, args.kind, args.out, patch_size=args.patch_size,
                                             queries=args.query)
    except (ValueError, KeyError, OSError, SourceError) as e:
        print(f"visualize: error: {e}", file=sys.stderr)
        return 1
    print(f"visualize: wrote {', '.join(str(p) for p in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
