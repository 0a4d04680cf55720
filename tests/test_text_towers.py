"""Text towers (docs/recipe.md §2.5, §14.1): the from-scratch encoder and the Qwen3 port against transformers.

The Qwen3 checks build a tiny random `transformers.Qwen3Model`, save it to a local folder with
`save_pretrained` and read it back through `load_hf_folder`; nothing is downloaded.
"""
from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flexict_jax import sharding
from flexict_jax.models import qwen3
from flexict_jax.models.text_encoder import TextEncoder

pytestmark = pytest.mark.slow  # Qwen3 towers against transformers: minutes of model building

TINY = dict(vocab_size=50, width=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=48)
# configs/common.py's rules plus "vocab", which only the text towers use.
RULES = [("batch", ("data", "fsdp")), ("vocab", "tensor"), ("embed", "fsdp"), ("mlp", "tensor"),
         ("qkv", "tensor"), ("heads", "tensor"), ("norm", None), ("length", None), ("act_embed", None)]
HF_TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=64)
QWEN3_TINY = qwen3.Qwen3Config(**{k: v for k, v in HF_TINY.items() if k != "max_position_embeddings"})


def _forward(model: TextEncoder, tokens, mask):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, t, m: nnx.merge(graphdef, s)(t, m))(state, jnp.asarray(tokens), jnp.asarray(mask))


def _pad(sequences: list[np.ndarray], length: int, side: str, rng: np.random.Generator, vocab: int):
    """Pads with random token ids, so a pad id that leaked into the output would show."""
    tokens = rng.integers(0, vocab, size=(len(sequences), length))
    mask = np.zeros((len(sequences), length), bool)
    for i, seq in enumerate(sequences):
        where = slice(length - len(seq), length) if side == "left" else slice(0, len(seq))
        tokens[i, where], mask[i, where] = seq, True
    return tokens, mask


def _randomise(model: TextEncoder, seed: int) -> None:
    """Non-trivial norm scales, so a misplaced norm cannot hide behind scale 1."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    params = jax.tree.map_with_path(
        lambda path, v: v + jax.random.uniform(next(keys), v.shape, minval=-0.5, maxval=0.5)
        if path[-1].key == "scale" else v, params)
    qwen3.load_into(model, params)


# --- from-scratch encoder -------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal,pooling", [(False, "mean"), (False, "last"), (True, "last")])
def test_padding_does_not_change_the_pooled_output(causal, pooling):
    model = TextEncoder(**TINY, causal=causal, pooling=pooling, rngs=nnx.Rngs(0))
    _randomise(model, 1)
    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, 50, size=n) for n in (9, 4, 1)]
    alone = np.stack([_forward(model, s[None], np.ones((1, len(s)), bool))["pooled"][0] for s in sequences])
    for side in ("left", "right"):
        tokens, mask = _pad(sequences, 12, side, rng, 50)
        out = _forward(model, tokens, mask)
        assert out["hidden"].shape == (3, 12, 32) and out["pooled"].shape == (3, 32)
        # Right padding keeps every position: exact up to reduction order. Left padding shifts the RoPE
        # positions, which attention only sees as differences (float rounding only).
        np.testing.assert_allclose(out["pooled"], alone, rtol=1e-5, atol=1e-5, err_msg=side)


def test_causal_attention_looks_only_backwards():
    tokens = np.arange(8)[None] % 50
    changed = tokens.copy()
    changed[0, 5] = 49
    mask = np.ones((1, 8), bool)
    for causal in (True, False):
        model = TextEncoder(**TINY, causal=causal, rngs=nnx.Rngs(0))
        before, after = _forward(model, tokens, mask)["hidden"], _forward(model, changed, mask)["hidden"]
        prefix_moved = float(jnp.max(jnp.abs(before[0, :5] - after[0, :5])))
        assert (prefix_moved == 0.0) == causal, (causal, prefix_moved)
        assert float(jnp.max(jnp.abs(before[0, 5:] - after[0, 5:]))) > 1e-3


def test_parameter_names_shapes_and_logical_axes():
    model = TextEncoder(**TINY, rngs=nnx.Rngs(0))
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    layer = {("input_layernorm", "scale"): (32,), ("post_attention_layernorm", "scale"): (32,),
             ("self_attn", "q_proj", "kernel"): (32, 32), ("self_attn", "k_proj", "kernel"): (32, 16),
             ("self_attn", "v_proj", "kernel"): (32, 16), ("self_attn", "o_proj", "kernel"): (32, 32),
             ("self_attn", "q_norm", "scale"): (8,), ("self_attn", "k_norm", "scale"): (8,),
             ("mlp", "gate_proj", "kernel"): (32, 48), ("mlp", "up_proj", "kernel"): (32, 48),
             ("mlp", "down_proj", "kernel"): (48, 32)}
    expected = {("embed_tokens", "embedding"): (50, 32), ("norm", "scale"): (32,)}
    expected |= {("layers", i) + path: shape for i in range(2) for path, shape in layer.items()}
    assert {path: tuple(v.shape) for path, v in flat.items()} == expected
    for path, param in flat.items():
        names = param.get_metadata().get("out_sharding")
        assert names is not None and len(names) == param.ndim, path
    with nnx.logical_axis_rules(RULES):
        specs = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.get_partition_spec(nnx.state(model, nnx.Param)))}
    for path, spec in specs.items():
        axes = [a for entry in spec if entry is not None for a in ((entry,) if isinstance(entry, str) else entry)]
        assert set(axes) <= set(sharding.MESH_AXES), (path, spec)
    assert specs[("embed_tokens", "embedding")] == jax.P("tensor", "fsdp")
    assert specs[("layers", 0, "self_attn", "k_proj", "kernel")] == jax.P("fsdp", "tensor")
    assert specs[("layers", 1, "self_attn", "o_proj", "kernel")] == jax.P("tensor", "fsdp")
    assert specs[("layers", 0, "mlp", "down_proj", "kernel")] == jax.P("tensor", "fsdp")


def test_sharded_forward_matches_unsharded():
    model = TextEncoder(**TINY, rngs=nnx.Rngs(0))
    tokens, mask = _pad([np.arange(n) for n in (3, 8, 5, 1, 2, 6, 7, 4)], 8, "left", np.random.default_rng(0), 50)
    expected = _forward(model, tokens, mask)
    mesh = sharding.make_mesh((2, 4, 1))
    graphdef, state = nnx.split(model)
    with sharding.activate(mesh, RULES):
        state = jax.device_put(state, nnx.get_named_sharding(state, mesh))
        tokens, mask = (jax.device_put(x, jax.NamedSharding(mesh, sharding.batch_spec(2))) for x in (tokens, mask))
        out = jax.jit(lambda s, t, m: nnx.merge(graphdef, s)(t, m))(state, tokens, mask)
    assert state["embed_tokens"]["embedding"][...].sharding.spec == jax.P("tensor", "fsdp")
    for name in expected:
        np.testing.assert_allclose(out[name], expected[name], rtol=1e-5, atol=1e-5)


def test_remat_matches():
    tokens, mask = _pad([np.arange(5), np.arange(3)], 6, "left", np.random.default_rng(0), 50)
    grads = []
    for remat in (False, True):
        model = TextEncoder(**TINY, remat=remat, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        loss = lambda s: jnp.sum(nnx.merge(graphdef, s)(tokens, mask)["pooled"] ** 2)  # noqa: E731
        grads.append(jax.jit(jax.grad(loss))(state))
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_bad_configuration_and_input_are_reported():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        TextEncoder(**{**TINY, "num_kv_heads": 3}, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="pooling"):
        TextEncoder(**TINY, pooling="cls", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="head_dim must be even"):
        TextEncoder(**TINY, head_dim=7, rngs=nnx.Rngs(0))
    model = TextEncoder(**TINY, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="tokens \\[B, L\\]"):
        model(jnp.zeros((2, 5), jnp.int32), jnp.ones((2, 4), bool))


# --- Qwen3 port ---------------------------------------------------------------------------------------------

def test_qwen3_embedding_06b_has_595m_parameters():
    abstract = nnx.eval_shape(lambda: qwen3.qwen3_encoder(qwen3.Qwen3Config(), rngs=nnx.Rngs(0)))
    n_params = sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert n_params == 595_776_512  # docs/recipe.md §2.1


@pytest.fixture(scope="module")
def hf_model():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.Qwen3Model(transformers.Qwen3Config(**HF_TINY, attn_implementation="eager")).eval()
    with torch.no_grad():  # larger than the 0.02 init, so attention is far from uniform
        for name, p in model.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if name.endswith("norm.weight") else torch.randn_like(p) * 0.3)
    return model


@pytest.fixture(scope="module")
def hf_folder(hf_model, tmp_path_factory):
    """The model saved as several safetensors shards plus model.safetensors.index.json."""
    folder = tmp_path_factory.mktemp("qwen3_sharded")
    hf_model.save_pretrained(folder, max_shard_size="20KB")
    assert (folder / qwen3.WEIGHTS_INDEX_FILE).is_file()
    return folder


def _assert_matches_transformers(model: TextEncoder, hf_model) -> None:
    """Our tower and a transformers Qwen3Model on the same left-padded token ids: hidden states of real tokens
    to 1e-4, and the last-token pooling against each sequence encoded alone, cosine >= 0.9999."""
    import torch
    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, 64, size=n) for n in (10, 6, 1, 8)]
    tokens, mask = _pad(sequences, 10, "left", rng, 64)
    with torch.no_grad():
        reference = hf_model(input_ids=torch.from_numpy(tokens),
                             attention_mask=torch.from_numpy(mask.astype(np.int64))).last_hidden_state.numpy()
        alone = [hf_model(input_ids=torch.from_numpy(s[None])).last_hidden_state[0, -1].numpy() for s in sequences]
    with jax.default_matmul_precision("highest"):
        out = _forward(model, tokens, mask)
    # Hidden states of real tokens (padding rows are meaningless on both sides).
    np.testing.assert_allclose(np.asarray(out["hidden"])[mask], reference[mask], rtol=1e-4, atol=1e-4)
    # Last-token pooling of the left-padded batch against each sequence encoded alone by transformers.
    pooled = np.asarray(out["pooled"])
    for got, want in zip(pooled, alone):
        cosine = got @ want / (np.linalg.norm(got) * np.linalg.norm(want))
        assert cosine >= 0.9999, cosine
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(pooled, reference[:, -1], rtol=1e-4, atol=1e-4)


def test_qwen3_matches_transformers(hf_model, hf_folder):
    config, params = qwen3.load_hf_folder(hf_folder)
    assert config == QWEN3_TINY
    model = qwen3.qwen3_encoder(config, rngs=nnx.Rngs(1))
    qwen3.load_into(model, params)
    _assert_matches_transformers(model, hf_model)


def test_exported_vlm_text_tower_matches_transformers(hf_model, tmp_path):
    """The text tower of a `python -m flexict_jax.export --kind=vlm` file (upstream's `text_model.backbone.*` keys,
    docs/torch_format.md §3.2), loaded strictly into a fresh transformers Qwen3Model of the same config, computes what our
    JAX tower computes."""
    import torch
    import transformers
    from run_utils import run_cli

    from flexict_jax import export, import_torch, torch_format
    from flexict_jax.models.vit import VisionTransformer
    from flexict_jax.models.vlm import VisionLanguageHead

    tower = qwen3.qwen3_encoder(QWEN3_TINY, rngs=nnx.Rngs(3))
    _randomise(tower, 4)
    arch = torch_format.Architecture(dim=24, depth=1, num_heads=2)
    parts = {"backbone": VisionTransformer(**arch.to_config(), rngs=nnx.Rngs(5)),
             "head": VisionLanguageHead(tower, vision_width=arch.dim, rngs=nnx.Rngs(6))}
    state = {name: jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(m, nnx.Param))) for name, m in parts.items()}
    params = {"backbone": state["backbone"], **state["head"]}
    workdir, out = tmp_path / "stage3", tmp_path / "vlm.pth"
    import_torch.write_workdir(workdir, {"step": np.int32(1), "params": params,
                                         "teacher": {"backbone": params["backbone"]}},
                               {"stage": "stage3", "config": {"model": arch.to_config()}})
    assert run_cli(export.main, ["--workdir", str(workdir), "--kind", "vlm", "--format", "flexict", "--out", str(out),
                                 "--allow-custom-architecture"]) == 0
    prefix = torch_format.VLM_TEXT
    text_state = {k[len(prefix):]: v for k, v in torch.load(out, weights_only=True)["model"].items()
                  if k.startswith(prefix)}
    reference = transformers.Qwen3Model(hf_model.config).eval()
    reference.load_state_dict(text_state, strict=True)
    _assert_matches_transformers(tower, reference)


def test_hf_round_trip_is_bitwise(hf_model):
    torch_state = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    params = qwen3.hf_state_dict_to_params(torch_state, QWEN3_TINY)
    exported = qwen3.params_to_hf_state_dict(params)
    assert exported.keys() == torch_state.keys()
    for key, value in torch_state.items():
        assert exported[key].dtype == value.dtype and np.array_equal(exported[key], value), key
    model = qwen3.qwen3_encoder(QWEN3_TINY, rngs=nnx.Rngs(0))
    live = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    again = qwen3.hf_state_dict_to_params(qwen3.params_to_hf_state_dict(live), QWEN3_TINY)
    assert jax.tree.structure(again) == jax.tree.structure(live)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(live)):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    # Checkpoints may come back with string layer keys.
    stringly = {**params, "layers": {str(i): layer for i, layer in params["layers"].items()}}
    assert qwen3.params_to_hf_state_dict(stringly).keys() == exported.keys()


def test_single_file_bf16_causal_lm_folder(hf_model, tmp_path):
    """The released layout: one bf16 model.safetensors, possibly a causal-LM's "model." prefix + lm_head."""
    import torch
    from safetensors.torch import save_file
    state = {"model." + k: v.to(torch.bfloat16).contiguous() for k, v in hf_model.state_dict().items()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3", **HF_TINY}))
    _, params = qwen3.load_hf_folder(tmp_path)
    q = params["layers"][1]["self_attn"]["q_proj"]["kernel"]
    assert q.dtype == np.float32
    expected = hf_model.state_dict()["layers.1.self_attn.q_proj.weight"].to(torch.bfloat16).float().numpy().T
    assert np.array_equal(q, expected)


def test_hf_folder_errors_are_reported(hf_model, hf_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        qwen3.load_hf_folder(tmp_path / "Qwen/Qwen3-Embedding-0.6B")
    with pytest.raises(FileNotFoundError, match="config.json"):
        qwen3.load_hf_folder(tmp_path)
    hf_config = json.loads((hf_folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        qwen3.load_hf_folder(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    with pytest.raises(ValueError, match="cannot read safetensors weights"):
        qwen3.load_hf_folder(tmp_path)
    with pytest.raises(ValueError, match="sliding-window"):
        qwen3.Qwen3Config.from_hf_dict({**hf_config, "use_sliding_window": True})
    with pytest.raises(ValueError, match="RoPE scaling"):
        qwen3.Qwen3Config.from_hf_dict({**hf_config, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    config = qwen3.Qwen3Config.from_hf_dict(hf_config)
    state = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    with pytest.raises(ValueError, match="missing \\['norm.weight'\\]"):
        qwen3.hf_state_dict_to_params({k: v for k, v in state.items() if k != "norm.weight"}, config)
    with pytest.raises(ValueError, match="unexpected \\['layers.0.self_attn.q_proj.bias'\\]"):
        qwen3.hf_state_dict_to_params({**state, "layers.0.self_attn.q_proj.bias": np.zeros(64)}, config)
    with pytest.raises(ValueError, match="layers.0.self_attn.k_proj.weight has shape \\(16, 32\\)"):
        qwen3.hf_state_dict_to_params({**state, "layers.0.self_attn.k_proj.weight": np.zeros((16, 32))}, config)
