"""Export a checkpoint's weights for PyTorch: the upstream FlexiCT `.pth` payload or safetensors + config.json.

    python -m flexict_jax.export --workdir=DIR [--step=N] --kind={2d,3d,vlm} --format={flexict,safetensors} \\
        --out=PATH [--params=teacher|student|recipe-vlm]

Reads only the needed subtree of `DIR/checkpoints/<step>/state` (a partial Orbax restore to host numpy; no
trainer, optimizer or data pipeline) and the architecture from the checkpoint's `meta` (config.model).

  * --format=flexict: `--out` is a `.pth` holding `{"teacher": {"backbone.<key>": tensor, "dino_head.*",
    "ibot_head.*"}, "iteration": step}` (torch-format §1.4): the 219 backbone keys with upstream names,
    shapes and layouts, fp32, and the two RoPE `periods` buffers in bf16 with exactly upstream's values (or,
    when the checkpoint's config.model has explicit `rope_periods_2d/3d`, e.g. an imported file's, those).
    `Flexi_CT_2D(path)` / `Flexi_CT_3D(path)` load it; they ignore the heads, which upstream's
    `resume_from_teacher_chkpt` needs. The upstream wrappers build only the 864/16/12 backbone with 4
    storage tokens, patch 8 and one input channel; other sizes are refused unless
    --allow-custom-architecture (then only `flexict_jax.torch_reference` or custom code can load the file).
  * --format=safetensors: `--out` is a directory with model.safetensors (the backbone state_dict, upstream
    names) and config.json (architecture, base/runtime patch sizes, RoPE settings, preprocessing, source).
    Any size. The periods are stored in the precision the model was trained with (config.json "rope").
  * --kind=vlm (a stage-3 checkpoint): the upstream `{"model": {...}}` payload of torch-format §3.2 —
    `logit_scale` (1,), `vision_model.<backbone>`, `vlm_vision_projection.weight`, `text_model.backbone.<Qwen3
    key>`: 531 keys at the released size, loadable with `Flexi_CT_VLM_Module.load_state_dict(strict=True)`.
    The safetensors variant holds the same keys, and config.json the text tower's Qwen3 config.
    --params=recipe-vlm pairs the EMA-teacher backbone with the student's projection, text tower and logit
    scale, as upstream's release does (recipe §8, §13 #16).

The two patch embeddings are always both exported (every FlexiCT checkpoint carries both, torch-format §7.5);
--kind picks the preprocessing recorded and which upstream wrapper the file is meant for. Files are written to
a temporary name and renamed into place; an existing --out is replaced only with --overwrite.
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


def _replace(tmp: pathlib.Path, out: pathlib.Path) -> None:
    """Renames a finished `tmp` into `out`; an existing directory `out` is removed only after the rename."""
    if out.is_dir():
        old = out.with_name(f".old-{os.getpid()}-{out.name}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


def write_pth(payload: Mapping[str, Any], out: pathlib.Path) -> None:
    """torch.save of `payload` (numpy leaves become tensors, bf16 kept) through a temporary file."""
    try:
        import torch

        from flexict_jax.torch_reference import to_torch
    except ImportError as e:
        raise ExportError(f"--format=flexict needs PyTorch: pip install 'flexict_jax[export]' ({e})") from e
    tensors = {name: ({k: to_torch(v) for k, v in value.items()} if isinstance(value, Mapping) else value)
               for name, value in payload.items()}
    tmp = out.with_name(f".tmp-{os.getpid()}-{out.name}")
    try:
        torch.save(tensors, tmp)
        _replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def write_safetensors(state: Mapping[str, np.ndarray], config: Mapping[str, Any], out: pathlib.Path) -> None:
    """model.safetensors + config.json in a temporary directory renamed to `out`."""
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
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export(workdir: str | os.PathLike, *, kind: str, fmt: str, out: str | os.PathLike, step: int | None = None,
           params: str | None = None, allow_custom_architecture: bool = False, overwrite: bool = False
           ) -> pathlib.Path:
    """Exports one checkpoint; returns the written path. Raises ExportError / FileNotFoundError / KeyError.

    params: None = "recipe-vlm" for kind "vlm" (stage 3's EMA teacher tracks the image side only, recipe §8),
    else "teacher".
    """
    out = pathlib.Path(out)
    params = params or ("recipe-vlm" if kind == "vlm" else "teacher")
    if params == "recipe-vlm" and kind != "vlm":
        raise ExportError("--params=recipe-vlm applies to --kind=vlm only")
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists; pass --overwrite to replace it")
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
    if fmt == "flexict":
        differences = arch.upstream_differences()
        if text_tower is not None and text_tower != torch_format.UPSTREAM_TEXT_TOWER:
            differences.append(f"text tower {text_tower} (upstream: Qwen3-Embedding-0.6B)")
        if differences and not allow_custom_architecture:
            raise ExportError(f"{where}: the upstream FlexiCT wrappers cannot build this model "
                              f"({'; '.join(differences)}); use --format=safetensors, or "
                              f"--allow-custom-architecture for a .pth only flexict_jax.torch_reference can load")
        write_pth({"model" if kind == "vlm" else "teacher": state, "iteration": step}, out)
    else:
        write_safetensors(state, safetensors_config(
            arch, kind=kind, rope_bf16=rope_bf16, meta=meta, text_tower=text_tower,
            source={"workdir": str(workdir), "step": step, "params": params, "stage": meta.get("stage")}), out)
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
                             "(recipe §8)")
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
