"""Parameter mapping to and from the upstream FlexiCT state_dict: key set, layouts, dtypes, strict errors."""
from __future__ import annotations

import io
import math

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from flexict_jax import torch_format
from flexict_jax.models import qwen3
from flexict_jax.models.vit import VisionTransformer
from flexict_jax.tasks.dino import DinoModel

torch = pytest.importorskip("torch")
from run_utils import last_bf16_bit_flipped  # noqa: E402

from flexict_jax import torch_reference  # noqa: E402  (imports torch)

# docs/torch_format.md §1.3, values torch computes op by op in bf16.
BF16_PERIODS = [1.0, 1.2890625, 1.671875, 2.15625, 2.78125, 3.59375, 4.65625, 6.0, 7.78125, 10.0, 12.875, 16.5,
                21.625, 27.875, 35.75, 46.25, 60.5, 77.5]
TINY = torch_format.Architecture(dim=48, depth=2, num_heads=2)
TINY_HEADS = dict(hidden_dim=32, bottleneck_dim=16, num_prototypes=64)


def spec_state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """docs/torch_format.md §1.3 written out: the 219 entries of the released backbone, in state_dict order."""
    shapes = {"cls_token": (1, 1, 864), "storage_tokens": (1, 4, 864), "mask_token": (1, 864),
              "patch_embed_2D.proj.weight": (864, 1, 8, 8), "patch_embed_2D.proj.bias": (864,),
              "patch_embed_3D.proj.weight": (864, 1, 8, 8, 8), "patch_embed_3D.proj.bias": (864,),
              "rope_embed_2D.periods": (18,), "rope_embed_3D.periods": (12,)}
    for i in range(16):
        shapes.update({f"blocks.{i}.norm1.weight": (864,), f"blocks.{i}.norm1.bias": (864,),
                       f"blocks.{i}.attn.qkv.weight": (2592, 864), f"blocks.{i}.attn.proj.weight": (864, 864),
                       f"blocks.{i}.attn.proj.bias": (864,), f"blocks.{i}.ls1.gamma": (864,),
                       f"blocks.{i}.norm2.weight": (864,), f"blocks.{i}.norm2.bias": (864,),
                       f"blocks.{i}.mlp.fc1.weight": (3456, 864), f"blocks.{i}.mlp.fc1.bias": (3456,),
                       f"blocks.{i}.mlp.fc2.weight": (864, 3456), f"blocks.{i}.mlp.fc2.bias": (864,),
                       f"blocks.{i}.ls2.gamma": (864,)})
    return {**shapes, "norm.weight": (864,), "norm.bias": (864,)}


@pytest.fixture(scope="module")
def full_size_export() -> dict[str, np.ndarray]:
    """The export of the default backbone's abstract shapes (zero-stride arrays: no memory, no compute)."""
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: VisionTransformer(rngs=nnx.Rngs(0)))))
    zeros = jax.tree.map(lambda a: np.broadcast_to(np.zeros((), a.dtype), a.shape), abstract)
    return torch_format.backbone_to_torch(zeros, torch_format.UPSTREAM)


def random_params(arch: torch_format.Architecture, heads: bool, seed: int = 0) -> dict:
    """Our param tree (fresh NNX keys: int block indices) with a distinct random value in every entry."""
    model = nnx.eval_shape(lambda: DinoModel(arch.to_config(), TINY_HEADS if heads else
                                             dict(hidden_dim=8, bottleneck_dim=8, num_prototypes=8),
                                             rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(nnx.state(model))
    if not heads:
        params = {"backbone": params["backbone"]}
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), params)


def through_torch(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """numpy -> torch tensors -> torch.save/load (in memory) -> numpy, as the .pth round trip does."""
    buffer = io.BytesIO()
    torch.save({k: torch_reference.to_torch(v) for k, v in state.items()}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert [str(t.dtype) for t in loaded.values()] == [
        "torch.bfloat16" if k.endswith("periods") else "torch.float32" for k in loaded]
    return {k: torch_reference.to_numpy(v) for k, v in loaded.items()}


def _leaves(tree) -> dict[str, np.ndarray]:
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


# --- key set, shapes, dtypes at the released size ------------------------------------------------------------

def test_default_size_exports_the_219_upstream_keys_in_order(full_size_export):
    expected = spec_state_dict_shapes()
    assert len(full_size_export) == 219
    assert list(full_size_export) == list(expected)
    assert {k: v.shape for k, v in full_size_export.items()} == expected
    assert sum(math.prod(v.shape) for k, v in full_size_export.items() if "periods" not in k) == 143_999_424


def test_dtypes_params_fp32_periods_bf16_with_upstream_values(full_size_export):
    for key, value in full_size_export.items():
        assert value.dtype == (ml_dtypes.bfloat16 if key.endswith("periods") else np.float32), key
    assert full_size_export["rope_embed_2D.periods"].astype(np.float32).tolist() == BF16_PERIODS
    assert full_size_export["rope_embed_3D.periods"].astype(np.float32).tolist() == BF16_PERIODS[:12]


def test_reference_module_has_exactly_the_upstream_state_dict(full_size_export):
    """The torch reference builds upstream's module tree: same keys, shapes and buffer dtypes (§1.2–1.3)."""
    reference = torch_reference.FlexiCTBackbone()
    state = reference.state_dict()
    assert list(state) == list(full_size_export)
    assert {k: tuple(v.shape) for k, v in state.items()} == spec_state_dict_shapes()
    assert state["rope_embed_2D.periods"].dtype == torch.bfloat16
    assert state["rope_embed_2D.periods"].float().tolist() == BF16_PERIODS  # torch's own bf16 arithmetic
    assert [k for k, v in state.items() if v.dtype != torch.float32] == ["rope_embed_2D.periods",
                                                                         "rope_embed_3D.periods"]


def test_architecture_is_inferred_from_shapes(full_size_export):
    assert torch_format.infer_architecture(full_size_export) == torch_format.UPSTREAM
    assert torch_format.UPSTREAM.upstream_differences() == []
    assert torch_format.Architecture.from_config(dict(dim=864, depth=16, num_heads=12, remat_policy="full")) == \
        torch_format.UPSTREAM
    assert "dim=48 (upstream builds 864)" in TINY.upstream_differences()


# --- bitwise round trips ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,heads", [(TINY, True), (TINY, False),
                                        (torch_format.Architecture(dim=864, depth=1, num_heads=12), False)],
                         ids=["tiny-with-heads", "tiny-backbone", "full-width-one-block"])
def test_round_trip_jax_torch_jax_is_bitwise(arch, heads):
    params = random_params(arch, heads)
    exported = torch_format.params_to_torch(params, arch)
    assert len([k for k in exported if k.startswith("backbone.")]) == 9 + 13 * arch.depth + 2
    assert any(k.startswith("dino_head.") for k in exported) == heads
    restored, found = torch_format.params_from_torch(through_torch(exported), rope_base=arch.rope_base)
    assert found == arch
    original, back = _leaves(params), _leaves(restored)
    assert sorted(original) == sorted(back)
    for key, value in original.items():
        assert back[key].dtype == np.float32 and back[key].shape == value.shape, key
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_layouts_follow_the_torch_conventions():
    """OIHW/OIDHW conv kernels, (out, in) Linear weights, [q|k|v] head-major qkv rows (docs/torch_format.md §1.5)."""
    params = random_params(TINY, heads=True)
    state = torch_format.params_to_torch(params, TINY)
    backbone, block = params["backbone"], params["backbone"]["blocks"][0]
    np.testing.assert_array_equal(state["backbone.patch_embed_2D.proj.weight"],
                                  backbone["patch_embed_2d"]["kernel"].transpose(3, 2, 0, 1))
    np.testing.assert_array_equal(state["backbone.patch_embed_3D.proj.weight"],
                                  backbone["patch_embed_3d"]["kernel"].transpose(4, 3, 0, 1, 2))
    qkv = state["backbone.blocks.0.attn.qkv.weight"]
    head_dim = TINY.head_dim
    for s in range(3):  # row s·dim + h·head_dim + d of torch = column of ours
        for h in range(TINY.num_heads):
            rows = slice(s * TINY.dim + h * head_dim, s * TINY.dim + (h + 1) * head_dim)
            np.testing.assert_array_equal(qkv[rows], block["attn"]["qkv"]["kernel"][:, rows].T)
    np.testing.assert_array_equal(state["backbone.blocks.0.mlp.fc1.weight"], block["mlp"]["fc1"]["kernel"].T)
    np.testing.assert_array_equal(state["dino_head.mlp.4.weight"], params["dino_head"]["mlp"]["fc3"]["kernel"].T)
    np.testing.assert_array_equal(state["ibot_head.last_layer.weight"],
                                  params["ibot_head"]["last_layer"]["kernel"].T)
    assert state["backbone.mask_token"].shape == (1, TINY.dim)  # 2-D, unlike cls_token (§7.6)


def test_checkpoint_string_block_keys_map_like_int_keys():
    params = random_params(TINY, heads=False)
    as_saved = {"backbone": {**params["backbone"],
                             "blocks": {str(i): b for i, b in params["backbone"]["blocks"].items()}}}
    a, b = torch_format.params_to_torch(params, TINY), torch_format.params_to_torch(as_saved, TINY)
    assert list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)


# --- strict import errors ----------------------------------------------------------------------------------------

@pytest.fixture()
def tiny_payload() -> dict[str, np.ndarray]:
    return torch_format.params_to_torch(random_params(TINY, heads=True), TINY)


def _edit(state: dict, drop: str | None = None, **changes) -> dict:
    state = {k: v for k, v in state.items() if k != drop}
    state.update({k.replace("__", "."): v for k, v in changes.items()})
    return state


@pytest.mark.parametrize("change,message", [
    (lambda s: _edit(s, drop="backbone.mask_token"), "missing key backbone.mask_token"),
    (lambda s: _edit(s, drop="backbone.blocks.1.ls2.gamma"), "missing key backbone.blocks.1.ls2.gamma"),
    (lambda s: _edit(s, backbone__blocks__0__attn__qkv__bias=np.zeros(144, np.float32)),
     "unexpected key backbone.blocks.0.attn.qkv.bias (the backbone has no qkv bias"),
    (lambda s: _edit(s, backbone__blocks__1__mlp__fc1__weight=s["backbone.blocks.1.mlp.fc1.weight"].T),
     "key backbone.blocks.1.mlp.fc1.weight has shape (48, 192), expected (192, 48)"),
    (lambda s: _edit(s, backbone__norm__weight=np.ones(48, np.int32)),
     "key backbone.norm.weight has dtype int32"),
    (lambda s: {k: v for k, v in s.items() if not k.startswith("ibot_head.")},
     "missing key ibot_head.mlp.0.weight"),
    (lambda s: _edit(s, drop="dino_head.mlp.2.bias"), "missing key dino_head.mlp.2.bias"),
    (lambda s: _edit(s, student__cls_token=np.zeros((1, 1, 48), np.float32)), "unexpected key student.cls_token"),
    (lambda s: {k[len("backbone."):]: v for k, v in s.items() if k.startswith("backbone.")},
     "unexpected key cls_token"),
], ids=["missing-token", "missing-block-key", "qkv-bias", "transposed-fc1", "int-dtype", "one-head", "head-key",
        "foreign-prefix", "no-prefix"])
def test_bad_state_dicts_name_the_first_offending_key(tiny_payload, change, message):
    with pytest.raises(torch_format.FormatError) as error:
        torch_format.params_from_torch(change(tiny_payload))
    assert message in str(error.value)


def test_periods_off_by_the_last_bf16_bit_become_explicit_and_export_back_bitwise(tiny_payload):
    key = "backbone.rope_embed_2D.periods"
    flipped = last_bf16_bit_flipped(tiny_payload[key], 3)
    params, arch = torch_format.params_from_torch(through_torch({**tiny_payload, key: flipped}))
    assert arch.rope_periods_2d == tuple(flipped.astype(np.float32).tolist()) and arch.rope_periods_3d is None
    assert arch.without_periods() == TINY and arch.upstream_differences() == TINY.upstream_differences()
    again = torch_format.params_to_torch(params, arch)
    assert again[key].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(again[key].view(np.uint16), flipped.view(np.uint16))
    np.testing.assert_array_equal(again["backbone.rope_embed_3D.periods"].view(np.uint16),
                                  tiny_payload["backbone.rope_embed_3D.periods"].view(np.uint16))
    # Both models take them: ours (from the config keys) and the torch reference (which also loads the buffer).
    model = nnx.eval_shape(lambda: VisionTransformer(**arch.to_config(), rngs=nnx.Rngs(0)))
    assert model.rope_periods_2d == arch.rope_periods_2d
    reference = torch_reference.FlexiCTBackbone(**arch.to_config())
    assert reference.rope_embed_2D.periods.float().tolist() == list(arch.rope_periods_2d)


@pytest.mark.parametrize("axes,change,reason", [
    (3, lambda p: p[:-1], "3 values, but 3-D RoPE with head_dim 24 has 4 periods"),
    (2, lambda p: -p, "must be finite and positive"),
    (2, lambda p: p[::-1], "must increase strictly"),
    (2, lambda p: p * np.float32(1.1), r"is far from base\^\(2j/\(head_dim/2\)\)"),
], ids=["wrong-length", "non-positive", "not-increasing", "far-from-computed"])
def test_implausible_periods_are_refused_naming_the_key(tiny_payload, axes, change, reason):
    key = f"backbone.rope_embed_{axes}D.periods"
    bad = change(tiny_payload[key].astype(np.float32)).astype(ml_dtypes.bfloat16)
    with pytest.raises(torch_format.FormatError, match=f"key {key}: .*{reason}"):
        torch_format.params_from_torch({**tiny_payload, key: bad})
    with pytest.raises(ValueError, match=f"rope_periods_{axes}d: .*{reason}"):
        VisionTransformer(**{**TINY.to_config(), f"rope_periods_{axes}d": tuple(bad.astype(np.float32))},
                          rngs=nnx.Rngs(0))


def test_other_rope_base_is_refused_unless_declared(tiny_payload):
    arch = torch_format.Architecture(**{**TINY.to_config(), "rope_base": 1000.0})
    state = torch_format.params_to_torch(random_params(arch, heads=False), arch)
    with pytest.raises(torch_format.FormatError, match="rope_embed_2D.periods.*base 100.0"):
        torch_format.params_from_torch(state)
    assert torch_format.params_from_torch(state, rope_base=1000.0)[1] == arch


def test_non_finite_values_are_refused_both_ways(tiny_payload):
    params = random_params(TINY, heads=True)
    params["backbone"]["blocks"][1]["attn"]["proj"]["kernel"][3, 4] = np.nan
    with pytest.raises(torch_format.FormatError, match="parameter blocks/1/attn/proj/kernel has 1 NaN/inf"):
        torch_format.params_to_torch(params, TINY)
    tiny_payload["backbone.mask_token"] = np.full((1, 48), np.inf, np.float32)  # would poison every CLS (§2.2)
    with pytest.raises(torch_format.FormatError, match="key backbone.mask_token has 48 NaN/inf values"):
        torch_format.params_from_torch(tiny_payload)


# --- the VLM payload (docs/torch_format.md §3.2) ------------------------------------------------------------------------

def random_vlm_params(arch: torch_format.Architecture, text: qwen3.Qwen3Config, seed: int = 0) -> dict:
    """Stage-3 params: backbone + VisionLanguageHead(text tower, projection, logit scale), random values."""
    from flexict_jax.models import qwen3
    from flexict_jax.models.vlm import VisionLanguageHead

    head = nnx.eval_shape(lambda: VisionLanguageHead(qwen3.qwen3_encoder(text, rngs=nnx.Rngs(0)),
                                                     vision_width=arch.dim, rngs=nnx.Rngs(0)))
    params = {"backbone": random_params(arch, heads=False, seed=seed)["backbone"],
              **nnx.to_pure_dict(nnx.state(head, nnx.Param))}
    rng = np.random.default_rng(seed + 1)
    return {**jax.tree.map(lambda a: rng.normal(size=np.shape(a)).astype(np.float32), params),
            "backbone": params["backbone"]}


def tiny_text(layers: int = 2):
    from flexict_jax.models import qwen3
    # head_dim 8 with 4 query / 2 KV heads on a width of 16: k_proj and v_proj are square (16 x 16), as
    # upstream's 1024 x 1024 (§7.3).
    return qwen3.Qwen3Config(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=8)


def spec_vlm_keys(depth: int, layers: int) -> list[str]:
    text = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "self_attn.q_norm",
            "self_attn.k_norm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm",
            "post_attention_layernorm"]
    backbone = list(torch_format.backbone_entries(depth))
    vision = sorted([e.key for e in backbone] + list(torch_format.PERIODS_KEYS.values()))
    return sorted(["logit_scale", "vlm_vision_projection.weight", "text_model.backbone.embed_tokens.weight",
                   "text_model.backbone.norm.weight"] + [f"vision_model.{k}" for k in vision]
                  + [f"text_model.backbone.layers.{i}.{name}.weight" for i in range(layers) for name in text])


def test_vlm_key_set_at_the_released_depths_is_the_531_upstream_keys():
    """Depths 16 (vision) and 28 (text) give upstream's 531 keys; names do not depend on the widths."""
    arch = torch_format.Architecture(dim=48, depth=16, num_heads=2)
    state = torch_format.vlm_to_torch(random_vlm_params(arch, tiny_text(layers=28)), arch)
    assert len(state) == 531
    assert sorted(state) == spec_vlm_keys(16, 28)
    assert list(state)[:2] == ["logit_scale", "vision_model.cls_token"]
    assert state["logit_scale"].shape == (1,) and state["vlm_vision_projection.weight"].shape == (16, 96)
    assert "text_model.backbone.rotary_emb.inv_freq" not in state and not any("lm_head" in k for k in state)


def test_vlm_round_trip_is_bitwise_and_layouts_are_torch():
    text = tiny_text()
    params = random_vlm_params(TINY, text)
    state = torch_format.vlm_to_torch(params, TINY)
    np.testing.assert_array_equal(state["vlm_vision_projection.weight"], params["vision_projection"]["kernel"].T)
    layer = params["text_tower"]["layers"][1]
    k_proj = state["text_model.backbone.layers.1.self_attn.k_proj.weight"]
    assert k_proj.shape == (16, 16)  # square: only the transpose convention tells the layouts apart
    np.testing.assert_array_equal(k_proj, layer["self_attn"]["k_proj"]["kernel"].T)
    restored, arch, config = torch_format.vlm_from_torch(through_torch(state))
    assert arch == TINY and config == text
    original, back = _leaves(params), _leaves(restored)
    assert sorted(original) == sorted(back)
    for key, value in original.items():
        assert back[key].dtype == np.float32 and back[key].shape == np.shape(value), key
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_vlm_errors_name_the_key():
    text = tiny_text()
    params = random_vlm_params(TINY, text)
    state = torch_format.vlm_to_torch(params, TINY)
    cases = [
        ({k: v for k, v in state.items() if k != "logit_scale"}, "missing key logit_scale"),
        ({**state, "logit_scale": np.zeros((), np.float32)}, "key logit_scale has shape (), expected (1,)"),
        ({**state, "text_model.projection.weight": np.zeros((16, 16), np.float32)},
         "unexpected key text_model.projection.weight"),
        ({k: v for k, v in state.items() if k != "vision_model.norm.bias"}, "missing key vision_model.norm.bias"),
        ({k: v for k, v in state.items() if k != "text_model.backbone.layers.1.mlp.up_proj.weight"},
         "layers.1.mlp.up_proj.weight"),
        ({k: v for k, v in state.items() if not k.startswith("text_model.")},
         "missing key text_model.backbone.embed_tokens.weight"),
    ]
    for bad, message in cases:
        with pytest.raises(torch_format.FormatError) as error:
            torch_format.vlm_from_torch(bad)
        assert message in str(error.value)
    with pytest.raises(torch_format.FormatError, match="upstream's VLM has no logit bias"):
        torch_format.vlm_to_torch({**params, "logit_bias": np.float32(-10.0)}, TINY)
    with pytest.raises(torch_format.FormatError, match="no 'text_tower'"):
        torch_format.vlm_to_torch({k: v for k, v in params.items() if k != "text_tower"}, TINY)
