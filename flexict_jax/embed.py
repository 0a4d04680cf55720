"""Embeddings CLI: the CLS and patch tokens of a CT under a FlexiCT backbone, written to an .npz file.

    python -m flexict_jax.embed --checkpoint=DIR --kind={2d,3d} --input=PATH --out=FILE.npz [--patch-size=8|16]

--checkpoint is a training or imported workdir (its latest Orbax checkpoint, the EMA teacher) or a
`--format=safetensors` export directory (model.safetensors + config.json, whose preprocessing is applied).
--input is a NIfTI file, a DICOM series folder, or an .npy array that is already the model input.

Preprocessing of NIfTI/DICOM (docs/recipe.md §9), with ingest's own readers and resampling: reorient to LPS and
resample (linear, in float) to the preset spacing; clamp HU to [-1000, 1000] and z-score with the unbiased
std.
  * 2d: every axial slice (or --slices) at 1.5 mm in-plane, z native; each slice is padded with air to a
    multiple of the patch size (centred) and z-scored on its own.
  * 3d: the volume at 2 mm, z-scored as a whole, padded with its minimum to at least 160³ and centre-cropped
    to 160³ (the Hugging Face "default" preset).
An .npy input is taken as is: [H, W] or [N, H, W] slices for 2d, [D, H, W] for 3d. It is how results are
compared across frameworks bit for bit: --save-inputs stores the model inputs of a NIfTI/DICOM run.

Output arrays: cls [N, dim], patch [N, P, dim] (after the final norm, patches row-major over (D,) H, W),
grid, patch_size, kind, slice_index (2d: the z index of each slice), preprocessing (JSON) and, with
--save-inputs, inputs; for NIfTI/DICOM also input_affine_zyx_to_lps (voxel index of the model input -> LPS
mm), resampled_shape and spacing_mm (the LPS grid before padding/cropping).
Exit status 0 on success, 1 on any error (the message names the file and the reason).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flexict_jax import checkpointing, torch_format
from flexict_jax.data.intensity import normalize_hu
from flexict_jax.imaging import dicom, geometry, readers
from flexict_jax.models.vit import VisionTransformer
from flexict_jax.progress import Progress

KINDS = torch_format.MODEL_KINDS[:2]  # --kind: the 2D and 3D backbones
AIR_HU = -1000.0  # 2-D padding: air, as the slice builder pads (docs/recipe.md §5)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """What turns a CT in HU into model input (docs/recipe.md §9). Stored in safetensors exports' config.json."""
    kind: str
    spacing_mm: tuple[float | None, float, float]  # (z, y, x); None keeps the native z spacing (2-D slices)
    crop: int | None = None  # 3-D: pad with the minimum to at least crop³, then centre-crop to crop³
    orientation: str = "LPS"
    hu_window: tuple[float, float] = (-1000.0, 1000.0)
    normalization: str = "zscore"  # (x - mean) / std (unbiased), per slice (2-D) or per volume (3-D)

    @classmethod
    def preset(cls, kind: str) -> Preprocessing:
        if kind == "2d":
            return cls("2d", (None, 1.5, 1.5))  # docs/recipe.md §9: 2D training slices, LPS, 1.5 mm
        if kind in ("3d", "vlm"):
            # docs/recipe.md §9: the HF "default" inference preset; §8: stage 3's one view is the same centre crop
            return cls(kind, (2.0, 2.0, 2.0), crop=160)
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS} or 'vlm'")

    @property
    def spatial_dims(self) -> int:
        return 2 if self.kind == "2d" else 3

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Preprocessing:
        return cls(kind=data["kind"], spacing_mm=tuple(data["spacing_mm"]), crop=data.get("crop"),
                   orientation=data["orientation"], hu_window=tuple(data["hu_window"]),
                   normalization=data["normalization"])

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- the backbone ------------------------------------------------------------------------------------------

def backbone_module(arch: torch_format.Architecture, backbone: Mapping[str, Any], *,
                    rope_bf16: bool) -> VisionTransformer:
    """An eval-ready VisionTransformer holding `backbone` params (checkpoint or freshly built key types)."""
    abstract = nnx.eval_shape(lambda: VisionTransformer(**arch.to_config(), rope_bf16=rope_bf16, rope_rescale=None,
                                                        rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, checkpointing.conform(backbone, nnx.to_pure_dict(state), what="backbone"))
    return nnx.merge(graphdef, state)


@dataclasses.dataclass(frozen=True)
class LoadedBackbone:
    model: VisionTransformer
    arch: torch_format.Architecture
    rope_bf16: bool
    preprocessing: Preprocessing | None  # what the export recorded; None = the preset of the kind
    source: str
    # The kind the weights were trained or exported as ("2d", "3d", "vlm"), None when the file does not say
    # (a .pth carries both patch embeddings, docs/torch_format.md §7.5); step: the checkpoint step when known.
    kind: str | None = None
    step: int | None = None


# Stages whose EMA teacher was trained on 2-D slices: their 3-D patch embedding never received an update.
STAGE_KIND = {"stage1": "2d", "stage1_hires": "2d", "stage2": "3d", "stage3": "vlm"}


def _load_pth(path: pathlib.Path) -> LoadedBackbone:
    """The backbone of a FlexiCT `.pth` (released, or `export --format=flexict`), through import_torch's reader."""
    from flexict_jax import import_torch

    payload = import_torch.load_payload(path)
    kind = "vlm" if "model" in payload and "teacher" not in payload else "3d"  # 2d/3d files share one layout
    params, config = import_torch.convert(payload, path, kind)
    arch = torch_format.Architecture.from_config(config["model"])
    step = payload.get("iteration") if isinstance(payload.get("iteration"), int) else None
    return LoadedBackbone(backbone_module(arch, params["backbone"], rope_bf16=True), arch, True, None, str(path),
                          "vlm" if kind == "vlm" else None, step)


def load_backbone(checkpoint: str | os.PathLike, step: int | None = None) -> LoadedBackbone:
    """The backbone of a safetensors export directory, a FlexiCT `.pth` file, or the EMA teacher of a workdir's
    (training or imported) checkpoint."""
    directory = pathlib.Path(checkpoint)
    if directory.suffix == ".pth":
        return _load_pth(directory)
    if (directory / "config.json").is_file() and (directory / "model.safetensors").is_file():
        from safetensors.numpy import load_file

        config = json.loads((directory / "config.json").read_text())
        try:
            arch = torch_format.Architecture(**config["architecture"])
            rope_bf16 = config["rope"]["dtype"] == "bfloat16"
            preprocessing = Preprocessing.from_json(config["preprocessing"])
        except (KeyError, TypeError) as e:
            raise ValueError(f"{directory / 'config.json'}: not a flexict_jax safetensors config ({e!r})") from e
        state = load_file(directory / "model.safetensors")
        if config.get("kind") == "vlm":  # the vision tower's keys carry the VLM prefix
            prefix = torch_format.VLM_VISION
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        try:
            backbone, found = torch_format.backbone_from_torch(state, rope_base=arch.rope_base, rope_bf16=rope_bf16)
        except torch_format.FormatError as e:
            raise ValueError(f"{directory / 'model.safetensors'}: {e}") from e
        if found.without_periods() != arch.without_periods():
            raise ValueError(f"{directory / 'model.safetensors'}: weights imply {found}, config.json says {arch}")
        # The periods are the weights' own buffers, as torch_reference.load_safetensors loads them.
        return LoadedBackbone(backbone_module(found, backbone, rope_bf16=rope_bf16), found, rope_bf16, preprocessing,
                              str(directory), config.get("kind"), config.get("source", {}).get("step"))
    if not (directory / "checkpoints").is_dir():
        raise FileNotFoundError(f"{directory}: neither a safetensors export (config.json + model.safetensors) "
                                f"nor a workdir with checkpoints/")
    teacher, step, meta = checkpointing.read_subtree(directory, "teacher", step)
    model_config = meta.get("config", {}).get("model")
    if model_config is None:
        raise ValueError(f"{directory}/checkpoints/{step}/meta has no config.model: cannot build the backbone")
    arch = torch_format.Architecture.from_config(model_config)
    rope_bf16 = bool(model_config.get("rope_bf16", False))
    kind = meta.get("kind") if meta.get("stage") == "imported" else STAGE_KIND.get(meta.get("stage"))
    return LoadedBackbone(backbone_module(arch, teacher["backbone"], rope_bf16=rope_bf16), arch, rope_bf16, None,
                          f"{directory} step {step}", kind, step)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _encode(graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array, patch_size: int):
    out = nnx.merge(graphdef, state)(x[..., None], patch_size=patch_size)
    return out["cls"], out["patch"]


def encode(model: VisionTransformer, inputs: np.ndarray, patch_size: int, batch_size: int,
           progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cls [N, dim] and patch [N, P, dim] of model inputs [N, (D,) H, W], in fixed-size batches (one compile)."""
    graphdef, state = nnx.split(model)
    batch_size = min(batch_size, len(inputs))
    cls, patch = [], []
    with jax.default_matmul_precision("highest"):
        for start in range(0, len(inputs), batch_size):
            batch = inputs[start:start + batch_size]
            padded = np.concatenate([batch, np.zeros((batch_size - len(batch),) + batch.shape[1:], batch.dtype)])
            c, p = jax.device_get(_encode(graphdef, state, jnp.asarray(padded), patch_size))
            cls.append(c[:len(batch)])
            patch.append(p[:len(batch)])
            if progress:
                progress.advance(len(batch))
    return np.concatenate(cls), np.concatenate(patch)


# --- inputs -------------------------------------------------------------------------------------------------

def read_source(path: pathlib.Path) -> readers.SourceVolume:
    """A NIfTI file or the one DICOM series in a folder, in HU, with its LPS affine."""
    if readers.is_nifti(path):
        return readers.read_nifti(path)
    if not path.is_dir():
        raise readers.SourceError(f"{path}: expected a NIfTI file (.nii, .nii.gz), a DICOM series folder or .npy")
    files = sorted(p for p in path.rglob("*") if p.is_file())
    series, damaged, _ = dicom.find_series(files)
    if len(series) != 1:
        found = f"{len(series)} DICOM series" + (f" ({', '.join(s.uid or str(s.folder) for s in series)})"
                                                 if series else "")
        problems = f"; unreadable: {damaged[0][0]}: {damaged[0][1]}" if damaged else ""
        raise readers.SourceError(f"{path}: found {found}, expected exactly one{problems}")
    return dicom.read_series(series[0])


def centred_pad(array: np.ndarray, shape: Sequence[int], value: float) -> tuple[np.ndarray, list[int]]:
    """`array` padded symmetrically (extra voxel after) to at least `shape`; returns the padding before."""
    before = [max(0, (s - n) // 2) for n, s in zip(array.shape, shape)]
    widths = [(b, max(0, s - n) - b) for b, n, s in zip(before, array.shape, shape)]
    return np.pad(array, widths, constant_values=value), before


def _shifted(affine: np.ndarray, voxels: Sequence[float]) -> np.ndarray:
    """The affine of the grid whose voxel 0 is voxel `voxels` of `affine`'s grid."""
    shift = np.eye(4)
    shift[:3, 3] = voxels
    return affine @ shift


def slices_2d(hu: np.ndarray, grid_affine: np.ndarray, preprocessing: Preprocessing, patch_size: int,
              z_indices: Sequence[int], shape: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Model inputs [N, H, W] of the axial slices `z_indices`, and the zyx->LPS affine of their grid; `shape`
    (a multiple of the patch size, at least the slice's) pads every slice to one common size."""
    padded_shape = list(shape) if shape is not None else [-(-n // patch_size) * patch_size for n in hu.shape[1:]]
    inputs, before = [], [0, 0]
    for z in z_indices:
        padded, before = centred_pad(hu[z], padded_shape, AIR_HU)
        inputs.append(normalize_hu(padded, preprocessing.hu_window))
    return np.stack(inputs), _shifted(grid_affine, [0, -before[0], -before[1]])


def volume_3d(hu: np.ndarray, grid_affine: np.ndarray, preprocessing: Preprocessing, patch_size: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """The model input [1, D, H, W] of a volume: z-score, min-pad and centre-crop (docs/recipe.md §9), and its affine."""
    volume = normalize_hu(hu, preprocessing.hu_window)
    target = ([preprocessing.crop] * 3 if preprocessing.crop
              else [-(-n // patch_size) * patch_size for n in volume.shape])
    padded, before = centred_pad(volume, target, float(volume.min()))
    start = [(n - t) // 2 for n, t in zip(padded.shape, target)]
    cropped = padded[tuple(slice(s, s + t) for s, t in zip(start, target))]
    return cropped[None], _shifted(grid_affine, [s - b for s, b in zip(start, before)])


def parse_slices(text: str | None, count: int) -> list[int]:
    """'all' / None, 'a:b[:step]' and comma lists of those or of single indices (negative from the end)."""
    if text is None or text == "all":
        return list(range(count))
    indices: list[int] = []
    for part in text.split(","):
        try:
            if ":" in part:
                indices += list(range(count))[slice(*[int(v) if v else None for v in part.split(":")])]
                continue
            index = int(part)
        except ValueError as e:
            raise ValueError(f"--slices {text!r}: cannot parse {part!r} ({e})") from e
        if not -count <= index < count:
            raise ValueError(f"--slices {text!r}: slice {index} is out of range for {count} axial slices")
        indices.append(index % count)
    if not indices:
        raise ValueError(f"--slices {text!r} selects no slice of the {count} axial slices")
    return indices


def _check_patch_multiple(inputs: np.ndarray, patch_size: int, where: str) -> None:
    spatial = inputs.shape[1:]
    if any(n % patch_size for n in spatial):
        raise ValueError(f"{where}: input shape {spatial} is not a multiple of the patch size {patch_size} "
                         f"(the patch embedding would silently drop the remainder)")


def load_npy(path: pathlib.Path, kind: str, patch_size: int) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read .npy ({e})") from e
    allowed = (2, 3) if kind == "2d" else (3,)
    if array.ndim not in allowed or not np.issubdtype(array.dtype, np.floating):
        wanted = "[H, W] or [N, H, W]" if kind == "2d" else "[D, H, W]"
        raise ValueError(f"{path}: expected a float {wanted} array for --kind={kind}, got {array.dtype} "
                         f"{array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{path}: has {int(np.size(array) - np.count_nonzero(np.isfinite(array)))} NaN/inf values")
    inputs = array.astype(np.float32)[None] if array.ndim == (2 if kind == "2d" else 3) else array.astype(np.float32)
    _check_patch_multiple(inputs, patch_size, str(path))
    return inputs


def prepare(path: pathlib.Path, kind: str, preprocessing: Preprocessing, patch_size: int,
            slices: str | None) -> tuple[np.ndarray, dict[str, Any]]:
    """Model inputs [N, (D,) H, W] and the output metadata for one input path."""
    if path.suffix == ".npy":
        if slices is not None:
            raise ValueError("--slices applies to NIfTI/DICOM inputs; cut the .npy array instead")
        inputs = load_npy(path, kind, patch_size)
        return inputs, {"slice_index": np.arange(len(inputs)) if kind == "2d" else np.zeros(1, np.int64)}
    source = read_source(path)
    readers.check_ct_intensity(source.array, path)
    spacing = preprocessing.spacing_mm
    if spacing[0] is None:
        spacing = (geometry.native_spacing(source.affine)[0],) + tuple(spacing[1:])
    grid = geometry.canonical_grid(source.array.shape, source.affine, spacing)
    hu = geometry.to_grid(source.array, source.affine, grid, 1, geometry.IMAGE_FILL_HU).astype(np.float32)
    if kind == "2d":
        z_indices = parse_slices(slices, hu.shape[0])
        inputs, affine = slices_2d(hu, grid.affine, preprocessing, patch_size, z_indices)
        slice_index = np.asarray(z_indices)
    else:
        if slices is not None:
            raise ValueError("--slices applies to --kind=2d only")
        inputs, affine = volume_3d(hu, grid.affine, preprocessing, patch_size)
        slice_index = np.zeros(1, np.int64)
    _check_patch_multiple(inputs, patch_size, str(path))
    return inputs, {"slice_index": slice_index, "input_affine_zyx_to_lps": affine,
                    "resampled_shape": np.asarray(grid.shape), "spacing_mm": np.asarray(grid.spacing)}


def write_npz(path: pathlib.Path, arrays: Mapping[str, Any], overwrite: bool) -> None:
    """Writes `arrays` to `path` through a temporary file renamed into place (never a partial file)."""
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def run(args: argparse.Namespace) -> None:
    loaded = load_backbone(args.checkpoint, args.step)
    preprocessing = loaded.preprocessing
    wanted = Preprocessing.preset(args.kind)
    if preprocessing is None or preprocessing.spatial_dims != wanted.spatial_dims:
        if preprocessing is not None:
            print(f"embed: warning: {args.checkpoint} was exported as --kind={preprocessing.kind}; using the "
                  f"{args.kind} preset", file=sys.stderr)
        preprocessing = wanted
    patch_size = args.patch_size or loaded.arch.base_patch_size
    inputs, extra = prepare(args.input, args.kind, preprocessing, patch_size, args.slices)
    progress = Progress(len(inputs), "embed")
    cls, patch = encode(loaded.model, inputs, patch_size, args.batch_size, progress)
    progress.close()
    arrays = {"cls": cls, "patch": patch, "grid": np.asarray([n // patch_size for n in inputs.shape[1:]]),
              "patch_size": np.asarray(patch_size), "kind": np.asarray(args.kind),
              "preprocessing": np.asarray(json.dumps(
                  {**preprocessing.to_json(), "applied": args.input.suffix != ".npy", "checkpoint": loaded.source,
                   "rope_bf16": loaded.rope_bf16})),
              **extra}
    if args.save_inputs:
        arrays["inputs"] = inputs
    write_npz(args.out, arrays, args.overwrite)
    print(f"embed: {len(cls)} {'slice' if args.kind == '2d' else 'volume'}(s), {patch.shape[1]} patch tokens "
          f"each ({'x'.join(map(str, arrays['grid']))} grid, patch {patch_size}) -> {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flexict_jax.embed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=pathlib.Path,
                        help="workdir (latest checkpoint's EMA teacher) or safetensors export directory")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step of a workdir (default: latest)")
    parser.add_argument("--kind", required=True, choices=KINDS, help="2d: axial slices; 3d: the volume")
    parser.add_argument("--input", required=True, type=pathlib.Path,
                        help="NIfTI file, DICOM series folder, or .npy model input")
    parser.add_argument("--out", required=True, type=pathlib.Path, help="output .npz file")
    parser.add_argument("--patch-size", type=int, default=None,
                        help="runtime patch size, e.g. 8 or 16 (default: the model's base patch size)")
    parser.add_argument("--slices", default=None,
                        help="2d: axial slices to embed, e.g. '10:20', '0,5,9' or 'all' (default: all)")
    parser.add_argument("--batch-size", type=int, default=8, help="slices per forward pass (default %(default)s)")
    parser.add_argument("--save-inputs", action="store_true", help="also store the model inputs as `inputs`")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if (args.patch_size is not None and args.patch_size < 1) or args.batch_size < 1:
        print("embed: error: --patch-size and --batch-size must be positive", file=sys.stderr)
        return 1
    try:
        run(args)
    except (ValueError, KeyError, OSError, readers.SourceError) as e:
        print(f"embed: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
