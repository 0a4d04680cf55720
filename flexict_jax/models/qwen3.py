"""Qwen3 text tower (docs/recipe.md §2.5, §14.1; docs/torch_format.md §3): architecture config and Hugging Face weight I/O.

The network itself is `TextEncoder` configured as Qwen3: causal grouped-query attention with per-head q/k
RMSNorm before RoPE (θ = 1e6 in Qwen3-Embedding-0.6B), SwiGLU, RMSNorm eps 1e-6, no biases, last-token pooling
under left padding. It is the bare `Qwen3Model` that FlexiCT fine-tunes, with no LM head: Qwen3-Embedding
ties its LM head to the token embedding, so a causal-LM checkpoint's `lm_head.weight` adds nothing (it is
dropped on import, and `tie_word_embeddings` in config.json does not matter here).

Weights come only from a LOCAL Hugging Face folder (config.json + model.safetensors, or shards listed in
model.safetensors.index.json). Nothing here downloads. Parameters are a nested dict shaped like
`nnx.to_pure_dict(nnx.state(encoder, nnx.Param))`; the Hugging Face names are the `Qwen3Model` state_dict
keys ("layers.0.self_attn.q_proj.weight", ...), which the VLM export prefixes with "text_model.backbone."
(docs/torch_format.md §3.2).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from flexict_jax.models.text_encoder import TextEncoder

CONFIG_FILE = "config.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
# Keys a Qwen3ForCausalLM checkpoint adds around the bare model: a "model." prefix and an LM head.
CAUSAL_LM_PREFIX = "model."
LM_HEAD_KEY = "lm_head.weight"


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    """The architecture fields of a Hugging Face Qwen3 config.json. Defaults: Qwen3-Embedding-0.6B."""
    vocab_size: int = 151_669
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0

    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any], source: str = CONFIG_FILE) -> Qwen3Config:
        """Reads a config.json dict; fields it omits take transformers' `Qwen3Config` defaults.

        Options this port does not implement (sliding-window layers, RoPE scaling, attention biases, another
        activation) raise ValueError naming `source` and the key, rather than silently computing something else.
        """
        model_type = hf.get("model_type", "qwen3")
        if model_type != "qwen3":
            raise ValueError(f"{source}: model_type is {model_type!r}, expected 'qwen3'")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in hf]
        if missing:
            raise ValueError(f"{source}: missing required keys {missing}")
        if hf.get("use_sliding_window", False) or "sliding_attention" in (hf.get("layer_types") or ()):
            raise ValueError(f"{source}: sliding-window attention (use_sliding_window / layer_types) is not "
                             f"supported; FlexiCT's Qwen3-Embedding uses full attention")
        if hf.get("attention_bias", False):
            raise ValueError(f"{source}: attention_bias=true is not supported (Qwen3 has bias-free projections)")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported, only 'silu'")
        # transformers 5 moves RoPE settings into `rope_parameters`; 4.x keeps `rope_theta` / `rope_scaling`.
        rope_parameters = hf.get("rope_parameters") or {}
        rope_type = rope_parameters.get("rope_type", "default")
        if hf.get("rope_scaling") or rope_type != "default":
            raise ValueError(f"{source}: RoPE scaling ({hf.get('rope_scaling') or rope_type}) is not supported")
        heads = int(hf["num_attention_heads"])
        return cls(
            vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]), num_hidden_layers=int(hf["num_hidden_layers"]),
            num_attention_heads=heads, num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(hf.get("rope_theta", rope_parameters.get("rope_theta", 10_000.0))))


def qwen3_encoder(config: Qwen3Config, *, remat: bool = False, attention_impl: str = "auto",
                  rngs: nnx.Rngs) -> TextEncoder:
    """A randomly initialised Qwen3 tower; load weights into it with `nnx.update` (see `load_into`)."""
    return TextEncoder(
        vocab_size=config.vocab_size, width=config.hidden_size, depth=config.num_hidden_layers,
        num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads, head_dim=config.head_dim,
        mlp_dim=config.intermediate_size, causal=True, pooling="last", rope_theta=config.rope_theta,
        norm_eps=config.rms_norm_eps, remat=remat, attention_impl=attention_impl, rngs=rngs)


def load_into(encoder: TextEncoder, params: Mapping[str, Any]) -> None:
    """Replaces the encoder's parameters by `params` (from `load_hf_folder` or `hf_state_dict_to_params`)."""
    state = nnx.state(encoder, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(encoder, state)


def _hf_name(path: tuple) -> str:
    """("layers", 0, "self_attn", "q_proj", "kernel") -> "layers.0.self_attn.q_proj.weight"."""
    *module, leaf = path
    if leaf not in ("kernel", "scale", "embedding"):
        raise ValueError(f"no Hugging Face name for parameter {'.'.join(map(str, path))}")
    return ".".join(map(str, module)) + ".weight"


def _layout(config: Qwen3Config) -> dict[str, tuple[tuple, tuple[int, ...]]]:
    """HF key -> (our parameter path, HF tensor shape), derived from the (abstract) model itself."""
    abstract = nnx.eval_shape(lambda: qwen3_encoder(config, rngs=nnx.Rngs(0)))
    layout = {}
    for path, variable in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        shape = tuple(variable.shape)
        layout[_hf_name(path)] = (path, shape[::-1] if path[-1] == "kernel" else shape)
    return layout


def params_to_hf_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Our nested params -> `Qwen3Model` state_dict names and layouts (Linear kernels transposed to (out, in)).

    `params` is a pure nested dict; layer keys may be ints (a live model) or strings (some checkpoint
    round trips). Values keep their dtype; only transposes are involved, so `hf_state_dict_to_params`
    inverts it bit for bit for float32 params.
    """
    flat = {}
    for path, value in jax.tree_util.tree_flatten_with_path(dict(params))[0]:
        keys = tuple(getattr(p, "key", getattr(p, "idx", p)) for p in path)
        array = np.asarray(value)
        flat[_hf_name(keys)] = np.ascontiguousarray(array.T if keys[-1] == "kernel" else array)
    return flat


def hf_state_dict_to_params(state_dict: Mapping[str, Any], config: Qwen3Config, *,
                            source: str = "state_dict") -> dict[str, Any]:
    """`Qwen3Model` (or Qwen3ForCausalLM) state_dict -> our nested params, as float32 numpy arrays.

    Accepts the "model." prefix of a causal-LM checkpoint and drops its `lm_head.weight` (FlexiCT uses the
    bare model). Every other key must match the config exactly: missing or unexpected keys and wrong shapes
    raise ValueError naming `source` and the key.
    """
    tensors = {}
    for key, value in state_dict.items():
        name = key[len(CAUSAL_LM_PREFIX):] if key.startswith(CAUSAL_LM_PREFIX) else key
        if name != LM_HEAD_KEY:
            tensors[name] = value
    layout = _layout(config)
    missing = sorted(set(layout) - set(tensors))
    unexpected = sorted(set(tensors) - set(layout))
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not match the Qwen3 config; missing {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    params: dict[str, Any] = {}
    for name, (path, shape) in layout.items():
        array = np.asarray(tensors[name])
        if array.shape != shape:
            raise ValueError(f"{source}: {name} has shape {array.shape}, the config implies {shape}")
        array = np.asarray(array, np.float32)
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = np.ascontiguousarray(array.T if path[-1] == "kernel" else array)
    return params


def _weight_files(folder: pathlib.Path) -> list[pathlib.Path]:
    index_path = folder / WEIGHTS_INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{index_path}: not a safetensors index with a 'weight_map' ({error})") from error
        files = [folder / name for name in sorted(set(weight_map.values()))]
    elif (folder / SINGLE_WEIGHTS_FILE).is_file():
        files = [folder / SINGLE_WEIGHTS_FILE]
    else:
        raise FileNotFoundError(f"{folder}: neither {SINGLE_WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE} found "
                                f"(only safetensors weights are read)")
    absent = [str(f) for f in files if not f.is_file()]
    if absent:
        raise FileNotFoundError(f"{folder}: shards listed in {WEIGHTS_INDEX_FILE} are missing: {absent}")
    return files


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        from safetensors import safe_open
    except ImportError as error:  # an optional dependency: only Hugging Face imports need it
        raise ImportError(f"reading {path} needs the safetensors package (pip install safetensors)") from error
    # The flax backend reads bfloat16 (numpy's does not); the CPU device keeps a 1.2 GB checkpoint off the
    # accelerator, and float32 conversion happens later in numpy.
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        try:
            with safe_open(str(path), framework="flax") as reader:
                return {key: np.asarray(reader.get_tensor(key)) for key in reader.keys()}
        except Exception as error:  # safetensors raises its own SafetensorError for corrupt files
            raise ValueError(f"{path}: cannot read safetensors weights ({error})") from error


def load_hf_folder(path: str | pathlib.Path) -> tuple[Qwen3Config, dict[str, Any]]:
    """Reads a local Hugging Face Qwen3 / Qwen3-Embedding folder: (config, float32 params).

    Never downloads: `path` must be an existing directory with config.json and safetensors weights
    (a single model.safetensors or the shards of model.safetensors.index.json). bfloat16 checkpoints (the
    released Qwen3-Embedding) are widened to float32 exactly.
    """
    folder = pathlib.Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a local directory (Hugging Face weights are never downloaded; "
                                f"pass a folder holding config.json and *.safetensors)")
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: missing")
    try:
        hf_config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path}: invalid JSON ({error})") from error
    config = Qwen3Config.from_hf_dict(hf_config, source=str(config_path))
    tensors: dict[str, np.ndarray] = {}
    for file in _weight_files(folder):
        shard = _read_safetensors(file)
        duplicated = sorted(set(shard) & set(tensors))
        if duplicated:
            raise ValueError(f"{file}: tensors {duplicated[:8]} also appear in another shard")
        tensors.update(shard)
    return config, hf_state_dict_to_params(tensors, config, source=str(folder))
