"""Export a checkpoint's weights for PyTorch: the upstream FlexiCT `.pth` payload or safetensors + config.json.

    python -m flexict_jax.export --workdir=DIR [--step=N] --kind={2d,3d,vlm} --format={flexict,safetensors} \\
        --out=PATH [--params=teacher|student|recipe-vlm]

Reads only the needed subtree of `DIR/checkpoints/<step>/state` (a partial Orbax restore to host numpy; no
trainer, optimizer or data pipeline) and the architecture from the checkpoint's `meta` (config.model).

  * --format=flexict: `--out` is a `.pth` holding `{"teacher": {"backbone.<key>": tensor, "dino_head.*",
    "ibot_head.*"}, "iteration": step}` (docs/torch_format.md §1.4): the 219 backbone keys with upstream names,
    shapes and layouts, fp32, and the two RoPE `periods` buffers in bf16 with exactly upstream's values (or,
    when the checkpoint's config.model has explicit `rope_periods_2d/3d`, e.g. an imported file's, those).
    `Flexi_CT_2D(path)` / `Flexi_CT_3D(path)` load it; they ignore the heads, which upstream's
    `resume_from_teacher_chkpt` needs. The upstream wrappers build only the 864/16/12 backbone with 4
    storage tokens, patch 8 and one input channel; other sizes are refused unless
    --allow-custom-architecture (then only `flexict_jax.torch_reference` or custom code can load the file).
  * --format=safetensors: `--out` is a directory with model.safetensors (the backbone state_dict, upstream
    names), config.json (`model_type`, architecture, base/runtime patch sizes, RoPE settings, preprocessing,
    source) and README.md. Any size; `flexict_jax.torch_reference.FlexiCTModel.from_pretrained(out)` loads
    it. The periods are stored in the precision the model was trained with (config.json "rope").
  * --kind=vlm (a stage-3 checkpoint): the upstream `{"model": {...}}` payload of docs/torch_format.md §3.2 —
    `logit_scale` (1,), `vision_model.<backbone>`, `vlm_vision_projection.weight`, `text_model.backbone.<Qwen3
    key>`: 531 keys at the released size, loadable with `Flexi_CT_VLM_Module.load_state_dict(strict=True)`.
    The safetensors variant holds the same keys, and config.json the text tower's Qwen3 config.
    --params=recipe-vlm pairs the EMA-teacher backbone with the student's projection, text tower and logit
    scale, as upstream's release does (docs/recipe.md §8, §13 #16).

The two patch embeddings are always both exported (every FlexiCT checkpoint carries both, docs/torch_format.md §7.5);
--kind picks the preprocessing recorded and which upstream wrapper the file is meant for. Every export writes a
model card (README.md in the directory; `NAME.README.md` beside a .pth): architecture, stage and step, the
training data's volume count, sources and licences (ingest `--licence`, carried through the slices / reports
index into the checkpoint metadata), preprocessing with a torch/MONAI snippet, intended use and limits. Files
(mode 0644) are written to a temporary name and renamed into place; an existing --out is replaced only with
--overwrite.
Exit status 0 on success, 1 on any error.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shutil
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from flexict_jax import checkpointing, torch_format
from flexict_jax.embed import Preprocessing

KINDS = torch_format.MODEL_KINDS
FORMATS = ("flexict", "safetensors")
PARAMS = {"teacher": "teacher", "student": "params"}  # --params -> top-level entry of the saved state
SAFETENSORS_FORMAT = "flexict_jax.safetensors/1"


class ExportError(ValueError):
    pass


def read_params(workdir: str | os.PathLike, step: int | None, which: str) -> tuple[dict, int, dict]:
    """(params, step, meta) of a checkpoint, read without the trainer: the EMA teacher, the student, or for
    "recipe-vlm" the teacher's backbone with the rest (text tower, projection, logit scale) from the student."""
    if which != "recipe-vlm":
        return checkpointing.read_subtree(workdir, PARAMS[which], step)
    teacher, step, meta = checkpointing.read_subtree(workdir, PARAMS["teacher"], step)
    student, _, _ = checkpointing.read_subtree(workdir, PARAMS["student"], step)
    return {**student, torch_format.BACKBONE: teacher[torch_format.BACKBONE]}, step, meta


def architecture(meta: Mapping[str, Any], where: str) -> torch_format.Architecture:
    model = meta.get("config", {}).get("model")
    if model is None:
        raise ExportError(f"{where}: the checkpoint meta has no config.model, so the architecture is unknown")
    return torch_format.Architecture.from_config(model)


def safetensors_config(arch: torch_format.Architecture, *, kind: str, rope_bf16: bool, meta: Mapping[str, Any],
                       source: Mapping[str, Any], text_tower: Any = None) -> dict[str, Any]:
    """config.json of a safetensors export: everything needed to rebuild and feed the model."""
    config = meta.get("config", {})
    runtime = sorted(set(config.get("patch_sizes", [arch.base_patch_size])))
    out = {
        "format": SAFETENSORS_FORMAT,
        # Hugging Face tooling keys a config.json by model_type (flexict_jax.torch_reference.FlexiCTModel
        # loads both kinds; a VLM export's text tower is a transformers Qwen3Model)
        "model_type": "flexict_vlm" if kind == "vlm" else "flexict",
        "architectures": ["FlexiCTModel"],
        "kind": kind,
        "architecture": arch.to_config(),
        "patch_size": {"base": arch.base_patch_size, "runtime": runtime,
                       "resize": "FlexiViT PI-resize: pinv of the bicubic-antialias (2D) / trilinear (3D) "
                                 "resize of one-hot basis kernels"},
        "rope": {"base": arch.rope_base, "coordinates": "separate", "dtype": "bfloat16" if rope_bf16 else "float32",
                 "periods_2d": torch_format.periods(arch, 2, rope_bf16).astype(np.float32).tolist(),
                 "periods_3d": torch_format.periods(arch, 3, rope_bf16).astype(np.float32).tolist()},
        "tokens": {"order": ["cls", "storage", "patch"], "num_storage_tokens": arch.num_storage_tokens,
                   "patch_order": "row-major over (D,) H, W"},
        "layer_norm_eps": 1e-6, "mlp_activation": "gelu (exact erf)", "qkv_bias": False,
        "input_layout": "torch [B, in_chans, H, W] (2d) or [B, in_chans, D, H, W] (3d), axes z, y, x in LPS",
        "preprocessing": Preprocessing.preset(kind).to_json(),
        "source": dict(source),
    }
    if text_tower is not None:
        out["vision_language"] = {
            "key_prefixes": {"vision": torch_format.VLM_VISION, "text": torch_format.VLM_TEXT},
            "image_embedding": "normalize(vlm_vision_projection([cls, mean(patch)]))",
            "text_tower": {"type": "Qwen3Model", **dataclasses.asdict(text_tower)},
            "text_pooling": "last token (left padding)", "similarity": "exp(logit_scale) * image @ text.T"}
    return out


STAGE_NAMES = {"stage1": "stage 1 (2D axial SSL: DINO + iBOT + KoLeo)",
               "stage1_hires": "stage 1.1 (high-resolution 2D SSL with Gram anchoring)",
               "stage2": "stage 2 (3D SSL on volumes)", "stage3": "stage 3 (report-guided vision-language alignment)"}


def _data_lines(data: Mapping[str, Any] | None) -> list[str]:
    if not data:
        return ["- not recorded (the checkpoint predates data provenance in its metadata)"]
    lines = [f"- {data['volumes']} CT volumes"]
    lines += [f"- licence {licence}: {n} volume(s)" for licence, n in data["licences"].items()]
    lines += [f"- source {source}: {n} volume(s)" for source, n in data["sources"].items()]
    return lines


def model_card(*, arch: torch_format.Architecture, kind: str, fmt: str, step: int, params: str,
               meta: Mapping[str, Any], workdir: str) -> str:
    """README.md of an export: what the weights are, what they were trained on and under which licences (from
    the ingest manifest via the slices / reports index and the checkpoint metadata), how to feed them."""
    prep = Preprocessing.preset(kind)
    stage = meta.get("stage") or "unknown"
    init = meta.get("init") or {}
    low, high = prep.hu_window
    sz, sy, sx = prep.spacing_mm
    spacing = f"{sx} × {sy} mm in plane (native z)" if sz is None else f"{sx} × {sy} × {sz} mm (x, y, z)"
    if fmt == "safetensors":
        loading = ["from flexict_jax.torch_reference import FlexiCTModel   # a torch-only file",
                   "model = FlexiCTModel.from_pretrained(\"this_folder\")    # strict load, eval mode"]
    else:
        loading = ["from flexict_jax.torch_reference import load_pth       # or upstream's Flexi_CT_2D / Flexi_CT_3D",
                   "model = load_pth(\"this_file.pth\")                     # strict load, eval mode"]
    licences = sorted({*(meta.get("provenance") or {}).get("licences", {}),
                       *(init.get("from_provenance") or {}).get("licences", {})})
    lines = [
        "---",
        "library_name: flexict_jax",
        f"license: other  # training data licences: {', '.join(licences) or 'not recorded'}",
        "tags: [computed-tomography, medical-imaging, self-supervised, vision-transformer, flexict]",
        "---",
        "",
        f"# FlexiCT {kind.upper()} encoder ({stage}, step {step})",
        "",
        f"Exported by `python -m flexict_jax.export --format={fmt} --kind={kind}` from `{workdir}`, checkpoint step "
        f"{step}, {'EMA teacher' if params == 'teacher' else params} weights.",
        "",
        "## Architecture",
        "",
        f"ViT (FlexiCT backbone, upstream `Flexi_CT_Backbone` names): width {arch.dim}, depth {arch.depth}, "
        f"{arch.num_heads} heads, MLP ratio {arch.mlp_ratio}, {arch.num_storage_tokens} storage tokens, "
        f"{arch.in_chans} input channel, base patch {arch.base_patch_size} (FlexiViT PI-resize to any runtime "
        f"patch size), axial RoPE (base {arch.rope_base}); 2D and 3D patch embeddings. Outputs the CLS token and "
        f"the patch tokens.",
        "",
        "## Training",
        "",
        f"- {STAGE_NAMES.get(stage, stage)}, {step} steps",
    ]
    if init:
        lines.append(f"- started from `{init.get('from')}` step {init.get('step')} ({init.get('from_stage')}, "
                     f"mode {init.get('mode')})")
    lines += ["", "### Training data", ""] + _data_lines(meta.get("provenance"))
    if init:
        lines += ["", f"### Data of the run it started from ({init.get('from_stage')})", ""]
        lines += _data_lines(init.get("from_provenance"))
    lines += [
        "",
        "The weights inherit the terms of these licences; check them before use or redistribution.",
        "",
        "## Preprocessing",
        "",
        f"- orientation {prep.orientation}: array axes (z, y, x), x → patient Left, y → Posterior, z → Superior",
        f"- spacing {spacing}" + (f"; centre crop {prep.crop}³ voxels" if prep.crop else ""),
        f"- HU clamped to [{low:g}, {high:g}], then z-scored ((x − mean) / std, per "
        f"{'slice' if kind == '2d' else 'volume'})",
        "",
        "A volume in RAS order (x, y, z), as nibabel's `get_fdata()` of a RAS+ NIfTI gives, to the model's "
        "(z, y, x) LPS input:",
        "",
        "```python",
        "import torch",
        "ras = torch.as_tensor(volume_xyz_ras, dtype=torch.float32)     # [X, Y, Z]: x → Right, y → Anterior",
        "lps_zyx = ras.permute(2, 1, 0).flip(1, 2)                       # [Z, Y, X]: x → Left, y → Posterior",
        f"x = lps_zyx.clamp({low:g}, {high:g})",
        "x = ((x - x.mean()) / x.std())[None, None]                      # [1, 1, Z, Y, X]",
        "```",
        "",
        "With MONAI (any orientation on disk, resampled to the spacing above):",
        "",
        "```python",
        "from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Orientation, Spacing",
        "load = Compose([LoadImage(image_only=True), EnsureChannelFirst(), Orientation(axcodes=\"LPS\"),",
        f"                Spacing(pixdim=({sx}, {sy}, {sz if sz is not None else -1}), mode=\"bilinear\")])"
        + ("  # -1 keeps the native z spacing" if sz is None else ""),
        "x = load(\"ct.nii.gz\").permute(0, 3, 2, 1)                   # [1, X, Y, Z] LPS → [1, Z, Y, X]",
        "```",
        "",
        "## Loading",
        "",
        "```python", *loading,
        "out = model(x)                                              # cls_token [B, dim], patch_tokens [B, N, dim]",
        "```",
        "",
        "## Intended use and limits",
        "",
        "- A research encoder for CT representations (feature extraction, linear probes, fine-tuning, "
        "retrieval); **not a medical device**, not validated for diagnosis or any clinical decision.",
        "- Trained only on the data listed above: expect degraded features on other scanners, protocols, body "
        "regions, contrast phases, paediatric CT and other modalities (MR, PET, CBCT).",
        "- Inputs must follow the preprocessing above (orientation, spacing, HU window); other conventions give "
        "valid-looking but wrong features.",
        "- Self-supervised features can encode biases of the training population; evaluate on your own data.",
        "",
    ]
    return "\n".join(lines)


def _replace(tmp: pathlib.Path, out: pathlib.Path) -> None:
    """Renames a finished `tmp` into `out`; an existing directory `out` is removed only after the rename."""
    if out.is_dir():
        old = out.with_name(f".old-{os.getpid()}-{out.name}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


def _readable(path: pathlib.Path) -> None:
    """The mode open() gives a new file (0644 under the usual umask 022): safetensors writes 0600."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def card_path(out: pathlib.Path) -> pathlib.Path:
    """Where the model card of a `.pth` export goes: beside it (FlexiCT_2D.pth -> FlexiCT_2D.README.md)."""
    return out.with_suffix(".README.md")


def write_pth(payload: Mapping[str, Any], out: pathlib.Path, card: str | None = None) -> None:
    """torch.save of `payload` (numpy leaves become tensors, bf16 kept) through a temporary file, and the model
    card beside it."""
    try:
        import torch

        from flexict_jax.torch_reference import to_torch
    except ImportError as e:
        raise ExportError(f"--format=flexict needs PyTorch: pip install 'flexict_jax[export]' ({e})") from e
    tensors = {name: ({k: to_torch(v) for k, v in value.items()} if isinstance(value, Mapping) else value)
               for name, value in payload.items()}
    tmp = out.with_name(f".tmp-{os.getpid()}-{out.name}")
    tmp_card = card_path(tmp)
    try:
        torch.save(tensors, tmp)
        _readable(tmp)
        if card is not None:
            tmp_card.write_text(card)
            _readable(tmp_card)
            _replace(tmp_card, card_path(out))
        _replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_card.unlink(missing_ok=True)


def write_safetensors(state: Mapping[str, np.ndarray], config: Mapping[str, Any], out: pathlib.Path,
                      card: str | None = None) -> None:
    """model.safetensors + config.json + README.md (the model card) in a temporary directory renamed to `out`."""
    try:
        from safetensors.numpy import save_file
    except ImportError as e:
        raise ExportError(f"--format=safetensors needs safetensors: pip install 'flexict_jax[export]' ({e})") from e
    tmp = out.with_name(f".tmp-{os.getpid()}-{out.name}")
    tmp.mkdir()
    try:
        # safetensors.numpy writes the raw buffer of a non-contiguous array (a transposed view) as if it
        # were C-ordered, so every array goes through ascontiguousarray.
        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=1) + "\n")
        if card is not None:
            (tmp / "README.md").write_text(card)
        for path in tmp.iterdir():
            _readable(path)
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export(workdir: str | os.PathLike, *, kind: str, fmt: str, out: str | os.PathLike, step: int | None = None,
           params: str | None = None, allow_custom_architecture: bool = False, overwrite: bool = False
           ) -> pathlib.Path:
    """Exports one checkpoint; returns the written path. Raises ExportError / FileNotFoundError / KeyError.

    params: None = "recipe-vlm" for kind "vlm" (stage 3's EMA teacher tracks the image side only, docs/recipe.md §8),
    else "teacher".
    """
    out = pathlib.Path(out)
    params = params or ("recipe-vlm" if kind == "vlm" else "teacher")
    if params == "recipe-vlm" and kind != "vlm":
        raise ExportError("--params=recipe-vlm applies to --kind=vlm only")
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists; pass --overwrite to replace it")
    if fmt == "flexict" and card_path(out).exists() and not overwrite:
        raise ExportError(f"{card_path(out)} (the model card) exists; pass --overwrite to replace it")
    if out.exists() and out.is_dir() != (fmt == "safetensors"):
        raise ExportError(f"{out} is a {'directory' if out.is_dir() else 'file'}; --format={fmt} writes a "
                          f"{'directory' if fmt == 'safetensors' else 'file'} there")
    if not out.parent.is_dir():
        raise ExportError(f"{out.parent} is not a directory")
    tree, step, meta = read_params(workdir, step, params)
    where = f"{workdir} step {step}"
    arch = architecture(meta, where)
    # The upstream .pth always carries upstream's bf16 periods; safetensors keeps the run's RoPE precision.
    rope_bf16 = fmt == "flexict" or bool(meta["config"]["model"].get("rope_bf16", False))
    try:
        if kind == "vlm":
            state = torch_format.vlm_to_torch(tree, arch, rope_bf16=rope_bf16)
            text_tower = torch_format.text_tower_config(state)
        else:
            state = (torch_format.params_to_torch(tree, arch) if fmt == "flexict"
                     else torch_format.backbone_to_torch(tree[torch_format.BACKBONE], arch, rope_bf16=rope_bf16))
            text_tower = None
    except torch_format.FormatError as e:
        hint = ("; stage 3's EMA teacher holds the image side only: use --params=recipe-vlm or student"
                if kind == "vlm" and params == "teacher" else "")
        raise ExportError(f"{where} ({params}): {e}{hint}") from e
    card = model_card(arch=arch, kind=kind, fmt=fmt, step=step, params=params, meta=meta, workdir=str(workdir))
    if fmt == "flexict":
        differences = arch.upstream_differences()
        if text_tower is not None and text_tower != torch_format.UPSTREAM_TEXT_TOWER:
            differences.append(f"text tower {text_tower} (upstream: Qwen3-Embedding-0.6B)")
        if differences and not allow_custom_architecture:
            raise ExportError(f"{where}: the upstream FlexiCT wrappers cannot build this model "
                              f"({'; '.join(differences)}); use --format=safetensors, or "
                              f"--allow-custom-architecture for a .pth only flexict_jax.torch_reference can load")
        write_pth({"model" if kind == "vlm" else "teacher": state, "iteration": step}, out, card)
    else:
        write_safetensors(state, safetensors_config(
            arch, kind=kind, rope_bf16=rope_bf16, meta=meta, text_tower=text_tower,
            source={"workdir": str(workdir), "step": step, "params": params, "stage": meta.get("stage")}), out, card)
    if kind != "2d" and meta.get("config", {}).get("data", {}).get("kind") == "slices2d":
        print(f"export: warning: {workdir} was trained on 2D slices; its 3D patch embedding was never trained",
              file=sys.stderr)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flexict_jax.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="training or imported run directory")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--kind", required=True, choices=KINDS, help="which FlexiCT model the file is for")
    parser.add_argument("--format", required=True, choices=FORMATS, dest="fmt",
                        help="flexict: upstream .pth payload; safetensors: directory with weights + config.json")
    parser.add_argument("--out", required=True, help="output .pth file (flexict) or directory (safetensors)")
    parser.add_argument("--params", default=None, choices=sorted(PARAMS) + ["recipe-vlm"],
                        help="teacher: the EMA teacher (the default for 2d/3d, what every stage hands on); "
                             "student: the online weights; recipe-vlm (the default for vlm): the EMA backbone with "
                             "the student's projection, text tower and logit scale, as upstream's release "
                             "(docs/recipe.md §8)")
    parser.add_argument("--allow-custom-architecture", action="store_true",
                        help="--format=flexict for sizes the upstream wrappers cannot build")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = export(args.workdir, kind=args.kind, fmt=args.fmt, out=args.out, step=args.step, params=args.params,
                     allow_custom_architecture=args.allow_custom_architecture, overwrite=args.overwrite)
    except (ExportError, KeyError, ValueError, OSError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 1
    print(f"export: {args.workdir} -> {out} ({args.fmt}, {args.kind})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
