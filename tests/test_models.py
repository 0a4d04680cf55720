"""Backbone, RoPE, patch embedding and DINO/iBOT heads (tiny dims except the abstract parameter counts)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flexict_jax import sharding
from flexict_jax.models import rope
from flexict_jax.models.heads import DINOHead
from flexict_jax.models.layers import batch_subset_residual, dense_dot_general, gelu
from flexict_jax.models.patch_embed import PatchEmbed
from flexict_jax.models.vit import VisionTransformer

TINY = dict(dim=48, depth=2, num_heads=4)
# docs/torch_format.md §1.3: what torch computes for 100 ** (2 * arange(18) / 36) op by op in bf16.
BF16_PERIODS = [1.0, 1.2890625, 1.671875, 2.15625, 2.78125, 3.59375, 4.65625, 6.0, 7.78125, 10.0, 12.875, 16.5,
                21.625, 27.875, 35.75, 46.25, 60.5, 77.5]
RULES = [("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"), ("qkv", "tensor"),
         ("heads", "tensor"), ("proto", "fsdp"), ("head_mlp2", "fsdp"), ("head_mlp", "tensor"),
         ("bottleneck", None), ("norm", None), ("length", None), ("act_embed", None)]


def _n_params(module: nnx.Module) -> int:
    return sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(module, nnx.Param)))


def _paths(module: nnx.Module) -> set[str]:
    return {".".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def _forward(model: VisionTransformer, x, **kwargs):
    """One jitted forward; static arguments go through the closure."""
    graphdef, state = nnx.split(model)
    masks, key = kwargs.pop("masks", None), kwargs.pop("key", None)

    @jax.jit
    def run(state, x, masks, key):
        return nnx.merge(graphdef, state)(x, masks=masks, key=key, **kwargs)
    return run(state, x, masks, key)


@pytest.fixture(scope="module")
def model() -> VisionTransformer:
    # A large LayerScale so that the residual branches (and so drop path and RoPE) visibly matter.
    return VisionTransformer(**TINY, drop_path_rate=0.5, layerscale_init=0.5, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def images() -> jax.Array:
    return jax.random.normal(jax.random.key(1), (4, 32, 24, 1))


# --- structure ---------------------------------------------------------------------------------------------

def test_default_backbone_has_144m_parameters():
    abstract = nnx.eval_shape(lambda: VisionTransformer(rngs=nnx.Rngs(0)))
    assert _n_params(abstract) == 143_999_424  # docs/recipe.md §2.1


def test_head_parameter_count():
    abstract = nnx.eval_shape(lambda: DINOHead(864, rngs=nnx.Rngs(0)))
    # 864·2048 + 2048 + 2048² + 2048 + 2048·256 + 256 + 256·65536 ≈ 23.27M (docs/recipe.md §2.4)
    assert _n_params(abstract) == 23_269_632


def test_parameter_names_and_shapes(model):
    block = {"norm1.scale", "norm1.bias", "attn.qkv.kernel", "attn.proj.kernel", "attn.proj.bias", "ls1.gamma",
             "norm2.scale", "norm2.bias", "mlp.fc1.kernel", "mlp.fc1.bias", "mlp.fc2.kernel", "mlp.fc2.bias",
             "ls2.gamma"}
    expected = {"patch_embed_2d.kernel", "patch_embed_2d.bias", "patch_embed_3d.kernel", "patch_embed_3d.bias",
                "cls_token", "storage_tokens", "mask_token", "norm.scale", "norm.bias"}
    expected |= {f"blocks.{i}.{name}" for i in range(2) for name in block}
    assert _paths(model) == expected
    d = TINY["dim"]
    assert model.patch_embed_2d.kernel.shape == (8, 8, 1, d)  # HWIO
    assert model.patch_embed_3d.kernel.shape == (8, 8, 8, 1, d)  # DHWIO
    assert model.cls_token.shape == (1, 1, d) and model.storage_tokens.shape == (1, 4, d)
    assert model.mask_token.shape == (1, d)
    assert model.blocks[0].attn.qkv.kernel.shape == (d, 3 * d) and model.blocks[0].attn.qkv.bias is None
    assert model.blocks[0].mlp.fc1.kernel.shape == (d, 4 * d)


def test_head_names_and_output():
    head = DINOHead(48, hidden_dim=32, bottleneck_dim=16, num_prototypes=64, rngs=nnx.Rngs(0))
    assert _paths(head) == {"mlp.fc1.kernel", "mlp.fc1.bias", "mlp.fc2.kernel", "mlp.fc2.bias", "mlp.fc3.kernel",
                            "mlp.fc3.bias", "last_layer.kernel"}
    x = jax.random.normal(jax.random.key(0), (5, 48))
    z = head.bottleneck(x)
    np.testing.assert_allclose(np.linalg.norm(z, axis=-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(head(x), z @ head.last_layer.kernel[...], rtol=1e-5, atol=1e-6)
    assert head(x).shape == (5, 64)
    # Zero input gives a zero bottleneck (biases start at 0): the eps keeps the normalisation finite.
    np.testing.assert_array_equal(head.bottleneck(jnp.zeros((1, 48))), 0.0)


def test_initialisation():
    model = VisionTransformer(**TINY, rngs=nnx.Rngs(0))
    block = model.blocks[0]
    np.testing.assert_array_equal(block.ls1.gamma[...], np.float32(1e-5))
    np.testing.assert_array_equal(model.mask_token[...], 0.0)
    np.testing.assert_array_equal(block.norm1.scale[...], 1.0)
    np.testing.assert_array_equal(block.attn.proj.bias[...], 0.0)
    # Trunc-normal 0.02 (torch cuts at ±2 absolute, i.e. effectively untruncated at this std).
    assert abs(float(jnp.std(block.mlp.fc1.kernel[...])) - 0.02) < 2e-3
    # Patch kernel: kaiming-uniform, fan_in 64, gain 1 -> U(±√(3/64)); bias U(±1/8).
    kernel = np.asarray(model.patch_embed_2d.kernel[...])
    assert np.abs(kernel).max() <= math.sqrt(3 / 64) and np.abs(kernel).max() > 0.9 * math.sqrt(3 / 64)
    assert np.abs(model.patch_embed_2d.bias[...]).max() <= 1 / 8


def test_bad_configuration_is_reported():
    with pytest.raises(ValueError, match="divisible by 12"):
        VisionTransformer(dim=48, depth=1, num_heads=8, rngs=nnx.Rngs(0))  # head_dim 6
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        VisionTransformer(dim=50, depth=1, num_heads=4, rngs=nnx.Rngs(0))


# --- forward -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,patch_size,n_tokens", [
    ((2, 32, 24, 1), 8, 12), ((2, 32, 24, 1), 16, 2),
    ((2, 16, 24, 8, 1), 8, 6), ((2, 16, 32, 16, 1), 16, 2),
    ((2, 35, 27, 1), 8, 12),  # not a multiple of the patch: truncated like a strided conv
])
def test_forward_shapes(model, shape, patch_size, n_tokens):
    out = _forward(model, jnp.ones(shape), patch_size=patch_size)
    d = TINY["dim"]
    assert out["cls"].shape == (2, d) and out["storage"].shape == (2, 4, d)
    assert out["patch"].shape == (2, n_tokens, d) and out["prenorm"].shape == (2, 5 + n_tokens, d)


def test_masks_replace_patch_tokens(model, images):
    masks = np.zeros((4, 12), bool)
    masks[:, [1, 5]] = True
    plain = _forward(model, images, patch_size=8)
    masked = _forward(model, images, patch_size=8, masks=jnp.asarray(masks))
    none_masked = _forward(model, images, patch_size=8, masks=jnp.zeros((4, 12), bool))
    np.testing.assert_array_equal(none_masked["cls"], plain["cls"])
    # A masked position holds the mask token whatever the image said there.
    other = _forward(model, -images, patch_size=8, masks=jnp.asarray(masks))
    diff = jnp.abs(masked["patch"] - plain["patch"]).max(axis=-1)
    assert bool(jnp.all(diff[:, 1] > 1e-3)) and bool(jnp.all(diff[:, 5] > 1e-3))
    assert not np.allclose(other["patch"][:, 1], masked["patch"][:, 1])  # attention still sees the rest
    with pytest.raises(ValueError, match="masks shape"):
        model(images, patch_size=8, masks=jnp.zeros((4, 11), bool))


def test_eval_is_deterministic_and_train_uses_the_key(model, images):
    eval_a = _forward(model, images, patch_size=8)
    eval_b = _forward(model, images, patch_size=8)
    np.testing.assert_array_equal(eval_a["prenorm"], eval_b["prenorm"])
    train_a = _forward(model, images, patch_size=8, train=True, key=jax.random.key(7))
    train_b = _forward(model, images, patch_size=8, train=True, key=jax.random.key(7))
    train_c = _forward(model, images, patch_size=8, train=True, key=jax.random.key(8))
    np.testing.assert_array_equal(train_a["prenorm"], train_b["prenorm"])
    assert not np.allclose(train_a["prenorm"], eval_a["prenorm"], atol=1e-6)
    assert not np.allclose(train_a["prenorm"], train_c["prenorm"], atol=1e-6)
    with pytest.raises(ValueError, match="key"):
        model(images, patch_size=8, train=True)


def test_single_sample_train_equals_eval():
    # With B=1 the drop-path subset is the whole batch with scale 1 (docs/torch_format.md §2.8).
    model = VisionTransformer(**TINY, drop_path_rate=0.2, rope_rescale=None, layerscale_init=0.5,
                              rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (1, 16, 24, 1))
    train = _forward(model, x, patch_size=8, train=True, key=jax.random.key(3))
    np.testing.assert_array_equal(train["prenorm"], _forward(model, x, patch_size=8)["prenorm"])


def test_rope_rescale_alone_changes_the_train_forward(images):
    model = VisionTransformer(**TINY, layerscale_init=0.5, rngs=nnx.Rngs(0))  # drop path off, rescale 2
    train = _forward(model, images, patch_size=8, train=True, key=jax.random.key(3))
    assert not np.allclose(train["patch"], _forward(model, images, patch_size=8)["patch"], atol=1e-6)


def test_bf16_rope_backbone_is_close_to_fp32(images):
    # Same seed, same parameters (the periods are constants); only the RoPE precision differs.
    fp32, bf16 = (VisionTransformer(**TINY, layerscale_init=0.5, rope_bf16=b, rngs=nnx.Rngs(0)) for b in (False, True))
    a, b = (_forward(m, images, patch_size=8)["prenorm"] for m in (fp32, bf16))
    assert 0 < float(jnp.abs(a - b).max()) < 5e-2 * float(jnp.abs(a).max())


def test_gelu_matches_jax_exact_gelu_and_its_derivatives():
    # Both tails, zero, and the bulk: the value, the first derivative (the custom rule) and the second (the rule's
    # own autodiff, as a jvp-of-grad would use it). Absolute tolerance: in the far negative tail 1 + erf rounds to
    # 0 (as in torch's formula) where erfc keeps values below 1e-6.
    x = jnp.concatenate([jnp.linspace(-12.0, 12.0, 4001), jnp.array([0.0, -1e-3, 1e-3])])

    def reference(v):
        return jax.nn.gelu(v, approximate=False)
    np.testing.assert_allclose(gelu(x), reference(x), rtol=1e-6, atol=1e-6)
    for order in (1, 2):
        ours, theirs = gelu, reference
        for _ in range(order):
            ours, theirs = jax.grad(ours), jax.grad(theirs)
        np.testing.assert_allclose(jax.vmap(ours)(x), jax.vmap(theirs)(x), rtol=1e-5, atol=1e-6)
    assert gelu(jnp.ones(3, jnp.bfloat16)).dtype == jnp.bfloat16


@pytest.mark.parametrize("shape", [(3, 7, 6), (5, 6)])
def test_cpu_dense_backward_matches_autodiff(shape):
    """The CPU backward of the linear layers (models.layers, docs/jax_notes.md §A7) gives autodiff's gradients."""
    x = jax.random.normal(jax.random.key(0), shape)
    kernel = jax.random.normal(jax.random.key(1), (6, 9))
    numbers = (((len(shape) - 1,), (0,)), ((), ()))

    def loss(dot):
        return lambda x, kernel: jnp.sum(jnp.sin(dot(x, kernel, numbers)))
    ours = jax.jit(jax.grad(loss(dense_dot_general), argnums=(0, 1)))(x, kernel)
    plain = jax.jit(jax.grad(loss(jax.lax.dot_general), argnums=(0, 1)))(x, kernel)
    for a, b in zip(ours, plain):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_batch_subset_stochastic_depth():
    x = jnp.zeros((5, 3, 2))
    out = batch_subset_residual(x, lambda h: h + 1.0, 0.5, jax.random.key(0))
    per_sample = np.asarray(out[:, 0, 0])
    # max(int(5 * 0.5), 1) = 2 samples get the branch, scaled by 5 / 2.
    assert sorted(per_sample.tolist()) == [0.0, 0.0, 0.0, 2.5, 2.5]
    np.testing.assert_array_equal(batch_subset_residual(x, lambda h: h + 1.0, 0.5, None), 1.0)


def test_grouped_drop_path_draws_a_subset_per_group():
    x = jnp.zeros((12, 3, 2))
    out = np.asarray(batch_subset_residual(x, lambda h: h + 1.0, 0.5, jax.random.key(0), groups=3)[:, 0, 0])
    # 3 groups of 4 rows: max(int(4 * 0.5), 1) = 2 rows of each get the branch, scaled by 4 / 2.
    for group in out.reshape(3, 4):
        assert sorted(group.tolist()) == [0.0, 0.0, 2.0, 2.0]
    with pytest.raises(ValueError, match="drop-path groups"):
        batch_subset_residual(x, lambda h: h, 0.5, jax.random.key(0), groups=5)


@pytest.mark.parametrize("scan_blocks,remat_policy", [(True, "none"), (False, "full"), (True, "full"),
                                                      (True, "dots"), (True, "dots_no_batch")])
def test_scan_and_remat_match_the_plain_loop(images, scan_blocks, remat_policy):
    """Same outputs and gradients (drop path, RoPE rescale and grouped subsets on) as the unrolled, stored loop;
    the parameters keep one entry per block either way."""
    kwargs = dict(TINY, drop_path_rate=0.5, layerscale_init=0.5, drop_path_group_size=2)
    plain = VisionTransformer(**kwargs, rngs=nnx.Rngs(0))
    other = VisionTransformer(**kwargs, scan_blocks=scan_blocks, remat_policy=remat_policy, rngs=nnx.Rngs(0))
    assert _paths(plain) == _paths(other)

    def value_and_grads(model):
        graphdef, state = nnx.split(model)

        def loss(state):
            out = nnx.merge(graphdef, state)(images, patch_size=16, train=True, key=jax.random.key(1))
            return jnp.sum(out["patch"] ** 2) + jnp.sum(out["cls"])
        return jax.jit(jax.value_and_grad(loss))(state)
    (a_loss, a_grads), (b_loss, b_grads) = value_and_grads(plain), value_and_grads(other)
    np.testing.assert_allclose(a_loss, b_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(a_grads), jax.tree.leaves(b_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_backbone_rejects_rows_that_do_not_split_into_drop_path_groups(images):
    model = VisionTransformer(**TINY, drop_path_rate=0.5, drop_path_group_size=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="drop-path groups of 3 samples"):
        model(images, patch_size=16, train=True, key=jax.random.key(0))
    model(images, patch_size=16)  # eval mode has no drop path, so any batch works
    with pytest.raises(ValueError, match="remat_policy"):
        VisionTransformer(**TINY, remat_policy="some", rngs=nnx.Rngs(0))


def test_grouped_drop_path_keeps_the_gather_on_each_device():
    """On 8 devices, groups that follow the batch sharding need far less temporary memory than one group over the
    global batch, which gathers every sample's activations onto every device (docs/scaling.md §4)."""
    mesh = sharding.make_mesh((1, 8, 1))
    x = jnp.ones((64, 32, 32, 1))

    def temp_bytes(group_size):
        model = VisionTransformer(**TINY, drop_path_rate=0.2, drop_path_group_size=group_size, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)

        def loss(state, x):
            return jnp.sum(nnx.merge(graphdef, state)(x, patch_size=8, train=True, key=jax.random.key(0))["cls"])
        with sharding.activate(mesh, RULES):
            x_sharded = jax.device_put(x, jax.NamedSharding(mesh, sharding.batch_spec(4)))
            compiled = jax.jit(jax.grad(loss)).lower(state, x_sharded).compile()
        return compiled.memory_analysis().temp_size_in_bytes
    assert temp_bytes(8) < 0.5 * temp_bytes(None)


# --- patch embedding ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("patch_size", [8, 16, 4])
def test_patch_embedding_is_a_strided_conv(spatial_dims, patch_size):
    embed = PatchEmbed(spatial_dims, 2, 12, 8, rngs=nnx.Rngs(0))
    shape = (2, 35, 18, 2) if spatial_dims == 2 else (2, 17, 34, 20, 2)
    x = jax.random.normal(jax.random.key(0), shape)
    tokens, grid = embed(x, patch_size)
    kernel = embed.kernel_for(patch_size)
    dn = ("NHWC", "HWIO", "NHWC") if spatial_dims == 2 else ("NDHWC", "DHWIO", "NDHWC")
    conv = jax.lax.conv_general_dilated(x, kernel, (patch_size,) * spatial_dims, "VALID", dimension_numbers=dn,
                                        precision=jax.lax.Precision.HIGHEST) + embed.bias[...]
    assert grid == conv.shape[1:-1] == tuple(n // patch_size for n in shape[1:-1])
    np.testing.assert_allclose(tokens, conv.reshape(2, -1, 12), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_pi_resize_preserves_the_patch_response(spatial_dims):
    """<resize(x), ŵ> = <x, w> (docs/recipe.md §2.3), resize(x) by torch's own interpolate."""
    torch = pytest.importorskip("torch")
    embed = PatchEmbed(spatial_dims, 1, 6, 8, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).normal(size=(3, 1) + (8,) * spatial_dims).astype(np.float32)
    mode = dict(mode="bicubic", antialias=True) if spatial_dims == 2 else dict(mode="trilinear")
    upsampled = torch.nn.functional.interpolate(torch.from_numpy(x), size=(16,) * spatial_dims,
                                                align_corners=False, **mode).numpy()
    channels_last = (0,) + tuple(range(2, spatial_dims + 2)) + (1,)
    small, _ = embed(jnp.asarray(x.transpose(channels_last)), 8)
    large, _ = embed(jnp.asarray(upsampled.transpose(channels_last)), 16)
    np.testing.assert_allclose(large, small, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spatial_dims,patch_size", [(2, 16), (2, 4), (2, 12), (3, 4)])
def test_resampled_kernel_matches_torch(spatial_dims, patch_size):
    """Upstream's PatchEmbedND resample: basis kernels through F.interpolate, fp32 pinv (docs/torch_format.md §2.1)."""
    torch = pytest.importorskip("torch")
    embed = PatchEmbed(spatial_dims, 1, 4, 8, rngs=nnx.Rngs(0))
    old, new = (8,) * spatial_dims, (patch_size,) * spatial_dims
    basis = torch.eye(8 ** spatial_dims).reshape(-1, 1, *old)
    mode = dict(mode="bicubic", antialias=True) if spatial_dims == 2 else dict(mode="trilinear")
    operator = torch.nn.functional.interpolate(basis, size=new, align_corners=False, **mode)
    operator = operator.reshape(len(basis), -1).T  # [∏new, ∏old]
    weight = torch.from_numpy(np.array(embed.kernel[...])).movedim(-1, 0).movedim(-1, 1)  # -> O, I, spatial
    theirs = (weight.reshape(4, 1, -1) @ torch.linalg.pinv(operator)).reshape(4, 1, *new)
    ours = np.asarray(embed.kernel_for(patch_size))
    ours = np.moveaxis(np.moveaxis(ours, -1, 0), -1, 1)
    rel = np.linalg.norm(ours - theirs.numpy()) / np.linalg.norm(theirs.numpy())
    assert rel < 1e-5


def test_pi_resize_gradient_reaches_the_base_kernel():
    embed = PatchEmbed(2, 1, 4, 8, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(embed)
    x = jnp.ones((1, 32, 32, 1))
    grad = jax.grad(lambda s: nnx.merge(graphdef, s)(x, 16)[0].sum())(state)
    assert float(jnp.abs(grad["kernel"][...]).sum()) > 0


# --- RoPE --------------------------------------------------------------------------------------------------

def test_bf16_periods_match_upstream():
    assert rope.rope_periods(72, 2, 100.0, bf16=True).tolist() == BF16_PERIODS
    assert rope.rope_periods(72, 3, 100.0, bf16=True).tolist() == BF16_PERIODS[:12]
    exact = rope.rope_periods(72, 2, 100.0)
    np.testing.assert_allclose(exact, 100.0 ** (2 * np.arange(18) / 36), rtol=1e-6)
    assert exact.tolist() != BF16_PERIODS


@pytest.mark.parametrize("grid", [(8, 6), (32, 32), (4, 3, 2), (20, 20, 20)])
def test_bf16_tables_are_bit_identical_to_torch(grid):
    """docs/torch_format.md §2.3: every op of the table in bf16, in upstream's order."""
    torch = pytest.importorskip("torch")
    bf16 = torch.bfloat16
    periods = torch.tensor(BF16_PERIODS[:18 if len(grid) == 2 else 12], dtype=bf16)
    axes = [torch.arange(0.5, n, dtype=bf16) / n for n in grid]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(grid))
    coords = 2.0 * coords - 1.0
    angles = (2 * math.pi * coords[:, :, None] / periods[None, None, :]).flatten(1, 2).tile(2)
    sin, cos = jax.jit(lambda: rope.rope_sincos(grid, periods.float().numpy(), bf16=True))()
    np.testing.assert_array_equal(np.asarray(sin), torch.sin(angles).float().numpy())
    np.testing.assert_array_equal(np.asarray(cos), torch.cos(angles).float().numpy())


def test_bf16_rotation_rounds_every_token():
    sin, cos = rope.rope_sincos((2, 3), rope.rope_periods(24, 2, bf16=True), bf16=True)
    x = jax.random.normal(jax.random.key(0), (2, 5 + 6, 3, 24))
    out = rope.apply_rope(x, sin, cos, bf16=True)
    np.testing.assert_array_equal(out[:, :5], x[:, :5].astype(jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_array_equal(out, out.astype(jnp.bfloat16).astype(jnp.float32))


def test_fp32_rope_is_a_rotation_of_patch_tokens_only():
    sin, cos = rope.rope_sincos((4, 3, 2), rope.rope_periods(36, 3))
    assert sin.shape == cos.shape == (24, 36)
    x = jax.random.normal(jax.random.key(0), (2, 5 + 24, 2, 36))
    out = rope.apply_rope(x, sin, cos)
    np.testing.assert_array_equal(out[:, :5], x[:, :5])
    np.testing.assert_allclose(jnp.linalg.norm(out, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
    assert not np.allclose(out[:, 5:], x[:, 5:])


def test_rope_scores_depend_on_coordinate_differences():
    n = 10
    sin, cos = rope.rope_sincos((n,), rope.rope_periods(24, 1))
    q, k = jax.random.normal(jax.random.key(0), (2, 24))
    q_rot = rope.apply_rope(jnp.broadcast_to(q, (1, n, 1, 24)), sin, cos)[0, :, 0]
    k_rot = rope.apply_rope(jnp.broadcast_to(k, (1, n, 1, 24)), sin, cos)[0, :, 0]
    scores = np.asarray(q_rot @ k_rot.T)
    for offset in range(-n + 1, n):
        diagonal = np.diagonal(scores, offset)
        np.testing.assert_allclose(diagonal, diagonal[0], rtol=1e-4, atol=1e-4)
    assert np.ptp(np.diagonal(scores, 0)) < 1e-4 < abs(scores[0, 0] - scores[0, 3])


def test_rope_layout_is_axis_major_and_tiled():
    periods = rope.rope_periods(72, 2)
    sin, _ = rope.rope_sincos((2, 3), periods)
    row = np.asarray(sin)[4]  # token (h=1, w=1): coords (0.5, 0)
    expected_h = np.sin(2 * np.pi * 0.5 / periods)
    np.testing.assert_allclose(row[:18], expected_h, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(row[18:36], 0.0, atol=1e-7)
    np.testing.assert_array_equal(row[:36], row[36:])


# --- sharding ----------------------------------------------------------------------------------------------

def _specs(module: nnx.Module) -> dict[tuple, jax.P]:
    with nnx.logical_axis_rules(RULES):
        tree = nnx.get_partition_spec(nnx.state(module, nnx.Param))
    return {path: var.get_value() for path, var in nnx.to_flat_state(tree)}


def test_every_parameter_has_logical_axes_and_specs_resolve():
    model = VisionTransformer(**TINY, rngs=nnx.Rngs(0))
    head = DINOHead(48, hidden_dim=32, bottleneck_dim=16, num_prototypes=64, rngs=nnx.Rngs(0))
    for module in (model, head):
        for path, param in nnx.to_flat_state(nnx.state(module, nnx.Param)):
            names = param.get_metadata().get("out_sharding")
            assert names is not None and len(names) == param.ndim, path
    specs = {**_specs(model), **{("head",) + path: spec for path, spec in _specs(head).items()}}
    for path, spec in specs.items():
        axes = [a for entry in spec if entry is not None for a in ((entry,) if isinstance(entry, str) else entry)]
        # Flax leaves a logical name without a rule in the spec: every name must be covered by the rules.
        assert set(axes) <= set(sharding.MESH_AXES), (path, spec)
        assert len(axes) == len(set(axes)), (path, spec)
    assert specs[("blocks", 0, "attn", "qkv", "kernel")] == jax.P("fsdp", "tensor")
    assert specs[("blocks", 1, "attn", "proj", "kernel")] == jax.P("tensor", "fsdp")
    assert specs[("blocks", 0, "mlp", "fc2", "kernel")] == jax.P("tensor", "fsdp")
    assert specs[("patch_embed_3d", "kernel")] == jax.P(None, None, None, None, "fsdp")
    assert specs[("head", "last_layer", "kernel")] == jax.P(None, "fsdp")
    assert specs[("head", "mlp", "fc2", "kernel")] == jax.P("tensor", "fsdp")


def test_sharded_forward_matches_unsharded():
    model = VisionTransformer(**TINY, layerscale_init=0.5, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (8, 16, 16, 1))
    expected = _forward(model, x, patch_size=8)
    mesh = sharding.make_mesh((2, 4, 1))
    graphdef, state = nnx.split(model)
    with sharding.activate(mesh, RULES):
        state = jax.device_put(state, nnx.get_named_sharding(state, mesh))
        x = jax.device_put(x, jax.NamedSharding(mesh, sharding.batch_spec(4)))
        out = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, patch_size=8))(state, x)
    assert state["blocks"][0]["mlp"]["fc1"]["kernel"][...].sharding.spec == jax.P("fsdp", "tensor")
    for name in expected:
        np.testing.assert_allclose(out[name], expected[name], rtol=1e-5, atol=1e-5)
