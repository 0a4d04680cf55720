"""Key and layout mapping between our parameter pytree and the upstream FlexiCT PyTorch state_dict.

Pure numpy, both directions, no torch import (docs/torch_format.md §1.3–§1.5, §4, §7). Our side is the nested dict
the trainer checkpoints: {"backbone": {...}, "dino_head": {...}, "ibot_head": {...}}. The torch side is a
flat {key: array} dict with upstream names and layouts:

  * conv kernels OIHW / OIDHW (ours HWIO / DHWIO), every Linear weight (out, in) (ours (in, out)); the fused
    qkv rows and the proj input columns are [q|k|v] × head-major in both, so a transpose is the whole story;
  * LayerNorm scale/bias are `weight`/`bias`; tokens keep their odd shapes (`mask_token` is (1, dim));
  * the two RoPE `periods` buffers are bf16 (ml_dtypes) with exactly the values torch computes op by op in
    bf16 (§1.3); our model derives them from `rope_base`. On import they are checked to be plausible periods
    and, where they differ from ours (a file made on another device may round the last bf16 bit
    differently), kept as the architecture's explicit periods, which export writes back bit for bit;
  * DINO/iBOT heads: mlp.{0,2,4} Linear + last_layer (no bias, no weight norm), as upstream's DINOHead.

Every problem with a foreign state_dict is a `FormatError` naming the first offending key.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from flexict_jax.models import qwen3, rope

BACKBONE, DINO_HEAD, IBOT_HEAD = "backbone", "dino_head", "ibot_head"
HEADS = (DINO_HEAD, IBOT_HEAD)
PERIODS_KEYS = {2: "rope_embed_2D.periods", 3: "rope_embed_3D.periods"}
# The released FlexiCT models (docs/torch_format.md §0): the 2D and 3D backbones and the vision-language model.
MODEL_KINDS = ("2d", "3d", "vlm")


class FormatError(ValueError):
    """A state_dict that does not have the expected keys, shapes or dtypes; the message names the key."""


@dataclasses.dataclass(frozen=True)
class Architecture:
    """The backbone hyper-parameters a state_dict implies; field names are our `config.model` keys."""
    dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    num_storage_tokens: int = 4
    in_chans: int = 1
    base_patch_size: int = 8
    rope_base: float = 100.0
    # Explicit RoPE periods (a checkpoint's own buffers); None = computed from rope_base and head_dim.
    rope_periods_2d: tuple[float, ...] | None = None
    rope_periods_3d: tuple[float, ...] | None = None

    def __post_init__(self):
        for name in ("rope_periods_2d", "rope_periods_3d"):  # JSON configs give lists
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.dim * self.mlp_ratio)

    @classmethod
    def from_config(cls, model: Mapping[str, Any]) -> Architecture:
        """From a (resolved) `config.model` dict; training-only keys (drop path, remat, ...) are ignored."""
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in ("dim", "depth", "num_heads") if n not in model]
        if missing:
            raise KeyError(f"model config lacks {missing} (it has {sorted(model)})")
        return cls(**{n: model[n] for n in names if n in model})

    def to_config(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def without_periods(self) -> Architecture:
        """The architecture with computed periods: what the upstream constructors take (the periods buffers are
        loaded with the weights)."""
        return dataclasses.replace(self, rope_periods_2d=None, rope_periods_3d=None)

    def upstream_differences(self) -> list[str]:
        """What the upstream wrappers could not build: they hard-code UPSTREAM (docs/torch_format.md §1.1). Explicit
        periods are no difference: `load_state_dict` loads the file's buffers."""
        arch = self.without_periods()
        return [f"{f.name}={getattr(arch, f.name)} (upstream builds {getattr(UPSTREAM, f.name)})"
                for f in dataclasses.fields(arch) if getattr(arch, f.name) != getattr(UPSTREAM, f.name)]


UPSTREAM = Architecture(dim=864, depth=16, num_heads=12)  # `flexi_ct_backbone_base(**_BACKBONE_KWARGS)`


# --- layouts ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Entry:
    path: tuple[str, ...]   # our nested-dict path
    key: str                # the torch state_dict key
    to_torch: tuple[int, ...] | None  # axis permutation ours -> torch; None = as is

    def export(self, value: np.ndarray) -> np.ndarray:
        value = np.asarray(value, dtype=np.float32)
        return np.ascontiguousarray(value if self.to_torch is None else value.transpose(self.to_torch))

    def load(self, value: np.ndarray) -> np.ndarray:
        return value if self.to_torch is None else np.ascontiguousarray(value.transpose(np.argsort(self.to_torch)))


_LINEAR = (1, 0)
_CONV = {2: (3, 2, 0, 1), 3: (4, 3, 0, 1, 2)}  # HWIO -> OIHW, DHWIO -> OIDHW


def _linear(path: tuple[str, ...], key: str, bias: bool = True) -> list[_Entry]:
    entries = [_Entry(path + ("kernel",), f"{key}.weight", _LINEAR)]
    return entries + [_Entry(path + ("bias",), f"{key}.bias", None)] if bias else entries


def _norm(path: tuple[str, ...], key: str) -> list[_Entry]:
    return [_Entry(path + ("scale",), f"{key}.weight", None), _Entry(path + ("bias",), f"{key}.bias", None)]


def backbone_entries(depth: int) -> list[_Entry]:
    """The backbone parameters in upstream state_dict order (docs/torch_format.md §1.3), periods excluded."""
    entries = [_Entry(("cls_token",), "cls_token", None), _Entry(("storage_tokens",), "storage_tokens", None),
               _Entry(("mask_token",), "mask_token", None)]
    for dims in (2, 3):
        ours, theirs = f"patch_embed_{dims}d", f"patch_embed_{dims}D.proj"
        entries += [_Entry((ours, "kernel"), f"{theirs}.weight", _CONV[dims]),
                    _Entry((ours, "bias"), f"{theirs}.bias", None)]
    for i in range(depth):
        block, key = ("blocks", str(i)), f"blocks.{i}"
        entries += _norm(block + ("norm1",), f"{key}.norm1")
        entries += _linear(block + ("attn", "qkv"), f"{key}.attn.qkv", bias=False)
        entries += _linear(block + ("attn", "proj"), f"{key}.attn.proj")
        entries += [_Entry(block + ("ls1", "gamma"), f"{key}.ls1.gamma", None)]
        entries += _norm(block + ("norm2",), f"{key}.norm2")
        entries += _linear(block + ("mlp", "fc1"), f"{key}.mlp.fc1")
        entries += _linear(block + ("mlp", "fc2"), f"{key}.mlp.fc2")
        entries += [_Entry(block + ("ls2", "gamma"), f"{key}.ls2.gamma", None)]
    return entries + _norm(("norm",), "norm")


def head_entries() -> list[_Entry]:
    """One DINO/iBOT head: our mlp.fc{1,2,3} are upstream's Sequential mlp.{0,2,4} (GELU in between)."""
    entries = []
    for ours, theirs in (("fc1", "0"), ("fc2", "2"), ("fc3", "4")):
        entries += _linear(("mlp", ours), f"mlp.{theirs}")
    return entries + _linear(("last_layer",), "last_layer", bias=False)


def _expected_shapes(arch: Architecture) -> dict[str, tuple[int, ...]]:
    d, p, c = arch.dim, arch.base_patch_size, arch.in_chans
    shapes = {"cls_token": (1, 1, d), "storage_tokens": (1, arch.num_storage_tokens, d), "mask_token": (1, d),
              "patch_embed_2D.proj.weight": (d, c, p, p), "patch_embed_2D.proj.bias": (d,),
              "patch_embed_3D.proj.weight": (d, c, p, p, p), "patch_embed_3D.proj.bias": (d,),
              "norm.weight": (d,), "norm.bias": (d,)}
    for i in range(arch.depth):
        for name in ("norm1.weight", "norm1.bias", "attn.proj.bias", "ls1.gamma", "norm2.weight", "norm2.bias",
                     "mlp.fc2.bias", "ls2.gamma"):
            shapes[f"blocks.{i}.{name}"] = (d,)
        shapes[f"blocks.{i}.attn.qkv.weight"] = (3 * d, d)
        shapes[f"blocks.{i}.attn.proj.weight"] = (d, d)
        shapes[f"blocks.{i}.mlp.fc1.weight"] = (arch.mlp_hidden, d)
        shapes[f"blocks.{i}.mlp.fc1.bias"] = (arch.mlp_hidden,)
        shapes[f"blocks.{i}.mlp.fc2.weight"] = (d, arch.mlp_hidden)
    return shapes


def periods(arch: Architecture, num_axes: int, bf16: bool = True) -> np.ndarray:
    """The `rope_embed_{2,3}D.periods` buffer: bf16, computed op by op as torch does (docs/torch_format.md §1.3), or
    with `bf16=False` the float32 periods of a model that runs RoPE in float32 (safetensors exports only).
    The architecture's explicit periods, when it has them, are written instead (exactly, if they are bf16)."""
    explicit = arch.rope_periods_2d if num_axes == 2 else arch.rope_periods_3d
    values = np.asarray(rope.model_periods(arch.head_dim, num_axes, arch.rope_base, bf16=bf16, explicit=explicit),
                        np.float32)
    return values.astype(ml_dtypes.bfloat16) if bf16 else values


# --- ours -> torch --------------------------------------------------------------------------------------------

def _get(tree: Mapping[str, Any], path: tuple[str, ...], where: str) -> np.ndarray:
    node = tree
    for i, name in enumerate(path):
        # Freshly built NNX state keys blocks by int, a restored checkpoint by str.
        if isinstance(node, Mapping) and name not in node and name.isdigit() and int(name) in node:
            name = int(name)
        if not isinstance(node, Mapping) or name not in node:
            raise KeyError(f"{where}: no parameter {'/'.join(path[:i + 1])}")
        node = node[name]
    value = np.asarray(node)
    if not np.all(np.isfinite(value)):
        raise FormatError(f"{where}: parameter {'/'.join(path)} has "
                          f"{value.size - np.count_nonzero(np.isfinite(value))} NaN/inf values")
    return value


def backbone_to_torch(backbone: Mapping[str, Any], arch: Architecture, *, rope_bf16: bool = True
                      ) -> dict[str, np.ndarray]:
    """Our backbone params -> the upstream backbone state_dict (219 keys at the default size): fp32 params and
    the periods buffers (bf16 as upstream unless `rope_bf16=False`)."""
    state = {}
    for entry in backbone_entries(arch.depth):
        state[entry.key] = entry.export(_get(backbone, entry.path, "backbone"))
        if entry.key == "patch_embed_3D.proj.bias":  # upstream order: both periods follow the patch embeddings
            state.update({PERIODS_KEYS[n]: periods(arch, n, rope_bf16) for n in (2, 3)})
    _check_shapes(state, _expected_shapes(arch), "")
    return state


def head_to_torch(head: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {e.key: e.export(_get(head, e.path, "head")) for e in head_entries()}


def params_to_torch(params: Mapping[str, Any], arch: Architecture) -> dict[str, np.ndarray]:
    """The upstream teacher payload: `backbone.<key>`, plus `dino_head.*`/`ibot_head.*` when `params` has heads
    (upstream's inference loaders ignore the heads; `resume_from_teacher_chkpt` needs them, docs/torch_format.md §4)."""
    state = {f"{BACKBONE}.{k}": v for k, v in backbone_to_torch(params[BACKBONE], arch).items()}
    for name in HEADS:
        if name in params:
            state.update({f"{name}.{k}": v for k, v in head_to_torch(params[name]).items()})
    return state


# --- torch -> ours --------------------------------------------------------------------------------------------

def _set(tree: dict, path: tuple[str, ...], value: np.ndarray) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _shape_of(state: Mapping[str, Any], key: str, prefix: str) -> tuple[int, ...]:
    if key not in state:
        raise FormatError(f"missing key {prefix}{key}")
    return tuple(np.shape(state[key]))


def infer_architecture(state: Mapping[str, Any], *, rope_base: float = 100.0, prefix: str = "") -> Architecture:
    """The architecture a backbone state_dict (keys without prefix) implies, from its shapes alone.

    head_dim is 4 × len(2-D periods) (head_dim/2 frequencies shared by two axes), which fixes num_heads.
    `prefix` only decorates error messages (e.g. "backbone.").
    """
    cls_shape = _shape_of(state, "cls_token", prefix)
    storage_shape = _shape_of(state, "storage_tokens", prefix)
    kernel_shape = _shape_of(state, "patch_embed_2D.proj.weight", prefix)
    periods_shape = _shape_of(state, PERIODS_KEYS[2], prefix)
    fc1_shape = _shape_of(state, "blocks.0.mlp.fc1.weight", prefix)
    if len(cls_shape) != 3 or len(storage_shape) != 3 or len(kernel_shape) != 4 or len(periods_shape) != 1:
        raise FormatError(f"{prefix}cls_token {cls_shape}, {prefix}storage_tokens {storage_shape}, "
                          f"{prefix}patch_embed_2D.proj.weight {kernel_shape} or {prefix}{PERIODS_KEYS[2]} "
                          f"{periods_shape} do not have the upstream ranks 3, 3, 4 and 1")
    dim, head_dim = cls_shape[-1], 4 * periods_shape[0]
    if not head_dim or dim % head_dim:
        raise FormatError(f"{prefix}{PERIODS_KEYS[2]} has {periods_shape[0]} entries, i.e. head_dim {head_dim}, "
                          f"which does not divide the width {dim} of {prefix}cls_token")
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    return Architecture(dim=dim, depth=max(blocks) + 1, num_heads=dim // head_dim,
                        mlp_ratio=fc1_shape[0] / dim, num_storage_tokens=storage_shape[1],
                        in_chans=kernel_shape[1], base_patch_size=kernel_shape[-1], rope_base=rope_base)


def _check_keys(state: Mapping[str, Any], expected: Iterable[str], prefix: str) -> None:
    expected = list(expected)
    missing = [k for k in expected if k not in state]
    if missing:
        raise FormatError(f"missing key {prefix}{missing[0]}" + (f" (and {len(missing) - 1} more)" if missing[1:]
                                                                  else ""))
    wanted = set(expected)
    unexpected = [k for k in state if k not in wanted]
    if unexpected:
        hint = " (the backbone has no qkv bias, docs/torch_format.md §7.7)" if "qkv.bias" in unexpected[0] or \
            "bias_mask" in unexpected[0] else ""
        raise FormatError(f"unexpected key {prefix}{unexpected[0]}{hint}"
                          + (f" (and {len(unexpected) - 1} more)" if unexpected[1:] else ""))


def _check_shapes(state: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], prefix: str) -> None:
    for key, shape in shapes.items():
        if tuple(np.shape(state[key])) != shape:
            raise FormatError(f"key {prefix}{key} has shape {tuple(np.shape(state[key]))}, expected {shape}")


def _float32(value: Any, key: str) -> np.ndarray:
    array = np.asarray(value)
    if not (np.issubdtype(array.dtype, np.floating) or array.dtype == ml_dtypes.bfloat16):
        raise FormatError(f"key {key} has dtype {array.dtype}, expected a floating-point tensor")
    array = array.astype(np.float32)
    if not np.all(np.isfinite(array)):
        raise FormatError(f"key {key} has {array.size - np.count_nonzero(np.isfinite(array))} NaN/inf values")
    return array


def backbone_from_torch(state: Mapping[str, Any], *, rope_base: float = 100.0, rope_bf16: bool = True,
                        prefix: str = "") -> tuple[dict[str, Any], Architecture]:
    """An upstream backbone state_dict (no prefix; floating arrays) -> (our backbone params, architecture).

    Strict like `load_state_dict(strict=True)`, and also checks the periods: they must be plausible RoPE
    periods of `rope_base` and the head_dim (length, positive, increasing, within bf16 rounding of
    base^(2j/(head_dim/2))). Periods that differ from the ones our model computes (in bf16 as upstream, or
    float32 with `rope_bf16=False`), e.g. rounded differently on the GPU that made the file, become the
    architecture's explicit periods, so the model runs with the file's values.
    """
    arch = infer_architecture(state, rope_base=rope_base, prefix=prefix)
    entries = backbone_entries(arch.depth)
    _check_keys(state, [e.key for e in entries] + list(PERIODS_KEYS.values()), prefix)
    _check_shapes(state, _expected_shapes(arch), prefix)
    explicit = {}
    for num_axes, key in PERIODS_KEYS.items():
        found = _float32(state[key], prefix + key)
        try:
            rope.check_periods(found, arch.head_dim, num_axes, arch.rope_base, what=f"key {prefix}{key}")
        except ValueError as e:
            raise FormatError(str(e)) from e
        computed = periods(arch, num_axes, rope_bf16).astype(np.float32)
        explicit[f"rope_periods_{num_axes}d"] = None if np.array_equal(found, computed) else tuple(found.tolist())
    arch = dataclasses.replace(arch, **explicit)
    backbone: dict[str, Any] = {}
    for entry in entries:
        _set(backbone, entry.path, entry.load(_float32(state[entry.key], prefix + entry.key)))
    return backbone, arch


def head_from_torch(state: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """One head's state_dict (keys without the head prefix) -> our head params; shapes must chain."""
    entries = head_entries()
    _check_keys(state, [e.key for e in entries], prefix)
    hidden, dim = _shape_of(state, "mlp.0.weight", prefix)
    bottleneck = _shape_of(state, "mlp.4.weight", prefix)[0]
    prototypes = _shape_of(state, "last_layer.weight", prefix)[0]
    _check_shapes(state, {"mlp.0.weight": (hidden, dim), "mlp.0.bias": (hidden,),
                          "mlp.2.weight": (hidden, hidden), "mlp.2.bias": (hidden,),
                          "mlp.4.weight": (bottleneck, hidden), "mlp.4.bias": (bottleneck,),
                          "last_layer.weight": (prototypes, bottleneck)}, prefix)
    head: dict[str, Any] = {}
    for entry in entries:
        _set(head, entry.path, entry.load(_float32(state[entry.key], prefix + entry.key)))
    return head


def head_config(head: Mapping[str, Any]) -> dict[str, int]:
    """`config.heads` of our head params: hidden, bottleneck and prototype counts."""
    hidden = np.shape(head["mlp"]["fc1"]["kernel"])[1]
    bottleneck, prototypes = np.shape(head["last_layer"]["kernel"])
    return {"hidden_dim": hidden, "bottleneck_dim": bottleneck, "num_prototypes": prototypes}


def params_from_torch(state: Mapping[str, Any], *, rope_base: float = 100.0
                      ) -> tuple[dict[str, Any], Architecture]:
    """An upstream teacher payload (`backbone.*` [+ `dino_head.*` and `ibot_head.*`]) -> (params, arch).

    Heads come both or neither; any other key is refused (upstream's loader would silently drop it).
    """
    groups: dict[str, dict[str, Any]] = {name: {} for name in (BACKBONE,) + HEADS}
    for key, value in state.items():
        name, _, rest = key.partition(".")
        if name not in groups or not rest:
            raise FormatError(f"unexpected key {key}: expected backbone.*, dino_head.* or ibot_head.* keys")
        groups[name][rest] = value
    if not groups[BACKBONE]:
        raise FormatError("missing key backbone.cls_token: the payload has no backbone.* keys")
    backbone, arch = backbone_from_torch(groups[BACKBONE], rope_base=rope_base, prefix=f"{BACKBONE}.")
    params = {BACKBONE: backbone}
    present = [name for name in HEADS if groups[name]]
    if present and len(present) != len(HEADS):
        absent = next(name for name in HEADS if not groups[name])
        raise FormatError(f"missing key {absent}.mlp.0.weight: the payload has {present[0]}.* but no {absent}.*")
    for name in present:
        params[name] = head_from_torch(groups[name], prefix=f"{name}.")
        if np.shape(params[name]["mlp"]["fc1"]["kernel"])[0] != arch.dim:
            raise FormatError(f"key {name}.mlp.0.weight has input width "
                              f"{np.shape(params[name]['mlp']['fc1']['kernel'])[0]}, the backbone's is {arch.dim}")
    return params, arch


# --- the vision-language model (stage 3) ------------------------------------------------------------------------
# Upstream `Flexi_CT_VLM_Module` state_dict (docs/torch_format.md §3.2): logit_scale (1,), vision_model.<backbone>,
# vlm_vision_projection.weight (E, 2·dim), text_model.backbone.<Qwen3Model key>; 531 keys at the released size.
# Ours: {"backbone", "vision_projection": {"kernel" (2·dim, E)}, "logit_scale" (), "text_tower": {...}}.

VLM_LOGIT_SCALE, VLM_PROJECTION = "logit_scale", "vlm_vision_projection.weight"
VLM_VISION, VLM_TEXT = "vision_model.", "text_model.backbone."
VLM_PARTS = ("vision_projection", "logit_scale", "text_tower")
UPSTREAM_TEXT_TOWER = qwen3.Qwen3Config()  # Qwen3-Embedding-0.6B
UPSTREAM_EMBED_DIM = 1024


def vlm_to_torch(params: Mapping[str, Any], arch: Architecture, *, rope_bf16: bool = True) -> dict[str, np.ndarray]:
    """Our stage-3 params -> the upstream VLM state_dict (`{"model": ...}` payload), in upstream key order.

    Upstream's VLM has no text projection (text width = embedding width) and no logit bias (CLIP), so params
    with either are refused rather than silently dropped.
    """
    missing = [part for part in (BACKBONE,) + VLM_PARTS if part not in params]
    if missing:
        raise FormatError(f"no {missing[0]!r} in the parameters (they have {sorted(params)}): not a stage-3 "
                          f"vision-language checkpoint")
    for part, reason in (("text_projection", "text projection (its text width is the embedding width)"),
                         ("logit_bias", "logit bias (it is CLIP, not SigLIP)")):
        if params.get(part) is not None:
            raise FormatError(f"the parameters have {part!r}: upstream's VLM has no {reason}")
    scale = _get(params, ("logit_scale",), "vlm")
    state = {VLM_LOGIT_SCALE: np.asarray(scale, np.float32).reshape(1)}  # a (1,) Parameter upstream (§7.9)
    state.update({VLM_VISION + k: v for k, v in backbone_to_torch(params[BACKBONE], arch, rope_bf16=rope_bf16).items()})
    state[VLM_PROJECTION] = _Entry((), VLM_PROJECTION, _LINEAR).export(
        _get(params, ("vision_projection", "kernel"), "vlm"))
    for key, value in qwen3.params_to_hf_state_dict(params["text_tower"]).items():
        if not np.all(np.isfinite(value)):
            raise FormatError(f"text_tower: parameter {key} has NaN/inf values")
        state[VLM_TEXT + key] = np.ascontiguousarray(value, dtype=np.float32)
    return state


def text_tower_config(state: Mapping[str, Any], prefix: str = VLM_TEXT) -> qwen3.Qwen3Config:
    """The Qwen3 architecture implied by the `prefix`+`Qwen3Model` keys of `state`. RMSNorm eps and RoPE θ
    are not in the weights: they keep Qwen3-Embedding-0.6B's values (1e-6, 1e6)."""
    vocab, hidden = _shape_of(state, prefix + "embed_tokens.weight", "")
    head_dim = _shape_of(state, prefix + "layers.0.self_attn.q_norm.weight", "")[0]
    layers = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"layers\.(\d+)\.", k))}
    return dataclasses.replace(
        UPSTREAM_TEXT_TOWER, vocab_size=vocab, hidden_size=hidden,
        intermediate_size=_shape_of(state, prefix + "layers.0.mlp.gate_proj.weight", "")[0],
        num_hidden_layers=max(layers) + 1, head_dim=head_dim,
        num_attention_heads=_shape_of(state, prefix + "layers.0.self_attn.q_proj.weight", "")[0] // head_dim,
        num_key_value_heads=_shape_of(state, prefix + "layers.0.self_attn.k_proj.weight", "")[0] // head_dim)


def vlm_from_torch(state: Mapping[str, Any], *, rope_base: float = 100.0
                   ) -> tuple[dict[str, Any], Architecture, qwen3.Qwen3Config]:
    """An upstream VLM state_dict -> (our stage-3 params, backbone architecture, text tower config)."""
    vision, text = {}, {}
    for key, value in state.items():
        if key.startswith(VLM_VISION):
            vision[key[len(VLM_VISION):]] = value
        elif key.startswith(VLM_TEXT):
            text[key[len(VLM_TEXT):]] = value
        elif key not in (VLM_LOGIT_SCALE, VLM_PROJECTION):
            raise FormatError(f"unexpected key {key}: expected logit_scale, {VLM_PROJECTION}, {VLM_VISION}* and "
                              f"{VLM_TEXT}* keys")
    if not vision:
        raise FormatError(f"missing key {VLM_VISION}cls_token: the payload has no {VLM_VISION}* keys")
    backbone, arch = backbone_from_torch(vision, rope_base=rope_base, prefix=VLM_VISION)
    config = text_tower_config(state)
    for key in (VLM_LOGIT_SCALE, VLM_PROJECTION):
        _shape_of(state, key, "")
    _check_shapes(state, {VLM_LOGIT_SCALE: (1,), VLM_PROJECTION: (config.hidden_size, 2 * arch.dim)}, "")
    try:
        tower = qwen3.hf_state_dict_to_params({k: _float32(v, VLM_TEXT + k) for k, v in text.items()}, config,
                                              source=f"{VLM_TEXT}*")
    except ValueError as e:
        raise FormatError(str(e)) from e
    params = {BACKBONE: backbone,
              "vision_projection": {"kernel": _Entry((), VLM_PROJECTION, _LINEAR).load(
                  _float32(state[VLM_PROJECTION], VLM_PROJECTION))},
              "logit_scale": _float32(state[VLM_LOGIT_SCALE], VLM_LOGIT_SCALE).reshape(()),
              "text_tower": tower}
    return params, arch, config
