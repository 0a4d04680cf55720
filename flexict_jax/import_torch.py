"""Import released FlexiCT PyTorch weights as an Orbax checkpoint to continue pretraining from (or export).

    python -m flexict_jax.import_torch --checkpoint=FILE.pth --kind={2d,3d,vlm} --workdir=DIR

FILE.pth is a released 2D/3D file, `{"teacher": {"backbone.<key>": tensor, ["dino_head.*", "ibot_head.*"]},
...}` (docs/torch_format.md §1.4, §4), a released VLM file, `{"model": {"vision_model.*", "vlm_vision_projection.weight",
"text_model.backbone.*", "logit_scale"}}` (§3.2), or our own `--format=flexict` export. Upstream training
checkpoints are DCP directories: convert them with upstream's `convert_checkpoint.py` first (§7.11).

Writes a new workdir DIR with one checkpoint, `DIR/checkpoints/0/{state, meta}`:
  state = {"step": 0, "params": P, "teacher": P}, P = {"backbone", "dino_head", "ibot_head"} when the file
  has heads, {"backbone"} otherwise, and for a VLM {"backbone", "vision_projection", "logit_scale",
  "text_tower"} (no optimizer state: a run started from it builds a fresh one);
  meta  = {"stage": "imported", "kind", "source", "source_sha256", "config": {"model": {...}[, "heads"]
  [, "text_tower"]}}.
`--config.init.from=DIR` then continues pretraining from its teacher (`--config.init.mode=vlm` for a VLM, stage
3), and `python -m flexict_jax.export --workdir=DIR` exports it again. The model config says `rope_bf16: true`:
the released weights were trained with upstream's bf16 RoPE, and reproducing their features needs it
(docs/torch_format.md §0). Its `rope_periods_2d`/`rope_periods_3d` hold the file's RoPE periods when they differ from
the ones computed here (a file made on a GPU may round the last bf16 bit differently); runs started from DIR
use them, and export writes them back bit for bit.

The file is read with `torch.load(weights_only=True)` (tensors and plain containers only). A file holding
other Python objects needs --allow-pickle, which runs its pickled code: use it only for files you trust.
Checks are strict, like upstream's `load_state_dict(strict=True)` plus dtypes and plausible RoPE periods
(length, positive, increasing, within bf16 rounding of base^(2j/(head_dim/2))); the first offending key is
named. DIR must not exist or be empty; it is written beside it and renamed when complete.
Exit status 0 on success, 1 on any error.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import pickle
import shutil
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

from flexict_jax import torch_format
from flexict_jax.imaging.readers import file_sha256

KINDS = torch_format.MODEL_KINDS


class TorchImportError(ValueError):
    """A checkpoint that cannot be imported; the message names the file and the first offending key."""


def load_payload(path: pathlib.Path, allow_pickle: bool = False) -> dict[str, Any]:
    """The top-level dict of a `.pth` file."""
    import torch

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as e:
        raise TorchImportError(f"{path}: holds objects other than tensors and plain containers; if you trust the "
                           f"file, pass --allow-pickle ({str(e).splitlines()[0]})") from e
    except (RuntimeError, EOFError, ValueError, OSError) as e:  # truncated zip, not a torch file, ...
        raise TorchImportError(f"{path}: cannot read, truncated or not a PyTorch checkpoint "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    if not isinstance(payload, Mapping):
        raise TorchImportError(f"{path}: the file holds a {type(payload).__name__}, not a checkpoint dict")
    return dict(payload)


def numpy_state(state: Any, path: pathlib.Path, what: str) -> dict[str, np.ndarray]:
    """A {key: tensor} dict as {key: numpy}; refuses non-tensor values, naming the key."""
    import torch

    from flexict_jax.torch_reference import to_numpy

    if not isinstance(state, Mapping):
        raise TorchImportError(f"{path}: {what} is a {type(state).__name__}, not a dict of tensors")
    arrays = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TorchImportError(f"{path}: key {key} holds a {type(value).__name__}, not a torch.Tensor")
        arrays[key] = to_numpy(value)
    return arrays


def convert(payload: Mapping[str, Any], path: pathlib.Path, kind: str, rope_base: float = 100.0
            ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(our params, the model config to record) of a released payload of `kind`."""
    entry = "model" if kind == "vlm" else "teacher"
    if entry not in payload:
        layout = ("{'model': {'vision_model.<key>': tensor, ...}}" if kind == "vlm"
                  else "{'teacher': {'backbone.<key>': tensor, ...}}")
        raise TorchImportError(f"{path}: no {entry!r} entry (top-level keys: {sorted(map(str, payload))}); a "
                               f"released {kind} FlexiCT file is {layout}")
    state = numpy_state(payload[entry], path, repr(entry))
    try:
        if kind == "vlm":
            params, arch, text_tower = torch_format.vlm_from_torch(state, rope_base=rope_base)
        else:
            params, arch = torch_format.params_from_torch(state, rope_base=rope_base)
    except torch_format.FormatError as e:
        raise TorchImportError(f"{path}: {e}") from e
    config: dict[str, Any] = {"model": {**arch.to_config(), "rope_bf16": True}}
    if torch_format.DINO_HEAD in params:
        config["heads"] = torch_format.head_config(params[torch_format.DINO_HEAD])
    if kind == "vlm":
        config["text_tower"] = dataclasses.asdict(text_tower)
    return params, config


def _check_new_workdir(workdir: pathlib.Path) -> None:
    if workdir.exists() and (not workdir.is_dir() or any(workdir.iterdir())):
        raise TorchImportError(f"{workdir} exists and is not an empty directory; import into a new --workdir")


def write_workdir(workdir: pathlib.Path, state: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
    """DIR/checkpoints/0/{state, meta}, written in a temporary directory beside DIR and renamed into place."""
    _check_new_workdir(workdir)
    workdir.parent.mkdir(parents=True, exist_ok=True)
    tmp = workdir.with_name(f".tmp-{os.getpid()}-{workdir.name}")
    tmp.mkdir()
    try:
        manager = ocp.CheckpointManager(
            tmp / "checkpoints", options=ocp.CheckpointManagerOptions(create=True),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
        manager.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(dict(state)),
                                                meta=ocp.args.JsonSave(dict(meta))), force=True)
        manager.wait_until_finished()
        manager.close()
        if workdir.exists():
            workdir.rmdir()  # checked empty above
        os.replace(tmp, workdir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def import_checkpoint(checkpoint: str | os.PathLike, *, kind: str, workdir: str | os.PathLike,
                      rope_base: float = 100.0, allow_pickle: bool = False) -> dict[str, Any]:
    """Converts FILE.pth into a new workdir; returns the meta written."""
    path, workdir = pathlib.Path(checkpoint), pathlib.Path(workdir)
    if kind not in KINDS:
        raise TorchImportError(f"unknown --kind {kind!r}; expected one of {KINDS}")
    _check_new_workdir(workdir)  # before reading a large file
    payload = load_payload(path, allow_pickle)
    params, config = convert(payload, path, kind, rope_base)
    meta = {"stage": "imported", "kind": kind, "source": str(path.resolve()), "source_sha256": file_sha256(path),
            "config": config}
    if isinstance(payload.get("iteration"), int):
        meta["source_iteration"] = payload["iteration"]
    write_workdir(workdir, {"step": np.zeros((), np.int32), "params": params, "teacher": params}, meta)
    return meta


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flexict_jax.import_torch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="FlexiCT .pth file (released or exported)")
    parser.add_argument("--kind", required=True, choices=KINDS, help="which FlexiCT model the file holds")
    parser.add_argument("--workdir", required=True, help="new run directory to create")
    parser.add_argument("--rope-base", type=float, default=100.0,
                        help="RoPE base the file's periods buffers were computed with (default %(default)s)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="load files holding arbitrary Python objects (runs their code; trusted files only)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        meta = import_checkpoint(args.checkpoint, kind=args.kind, workdir=args.workdir, rope_base=args.rope_base,
                                 allow_pickle=args.allow_pickle)
    except (TorchImportError, KeyError, ValueError, OSError) as e:
        print(f"import_torch: error: {e}", file=sys.stderr)
        return 1
    model = meta["config"]["model"]
    heads = "with DINO/iBOT heads" if "heads" in meta["config"] else "backbone only"
    print(f"import_torch: {args.checkpoint} ({model['dim']}x{model['depth']}, {heads}) -> "
          f"{pathlib.Path(args.workdir) / 'checkpoints' / '0'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
