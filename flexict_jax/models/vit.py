"""The FlexiCT ViT backbone (`fleximeddinov3_base`; docs/recipe.md §2.1, docs/torch_format.md §1–§2).

One module serves 2-D slices and 3-D volumes: the input rank picks the patch embedding and the RoPE, as
upstream does, and both patch embeddings always exist (every FlexiCT checkpoint carries both).
Token order is [CLS, storage×4, patches]; patches are row-major over (D,) H, W.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flexict_jax import sharding
from flexict_jax.models import rope
from flexict_jax.models.layers import Block, layer_norm
from flexict_jax.models.patch_embed import PatchEmbed

RESIDUAL_AXES = ("batch", "length", "act_embed")
# What a block keeps for the backward pass (config.model.remat_policy); "none" keeps everything.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs, recompute norms/GELU/RoPE
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight matmuls only
}


class VisionTransformer(nnx.Module):
    """Defaults are the released 144M backbone: 864 wide, 16 deep, 12 heads, 4 storage tokens, patch 8."""

    def __init__(self, *, dim: int = 864, depth: int = 16, num_heads: int = 12, mlp_ratio: float = 4.0,
                 num_storage_tokens: int = 4, in_chans: int = 1, base_patch_size: int = 8,
                 layerscale_init: float = 1e-5, drop_path_rate: float = 0.0, rope_base: float = 100.0,
                 rope_rescale: float | None = 2.0, rope_bf16: bool = False,
                 rope_periods_2d: tuple[float, ...] | None = None, rope_periods_3d: tuple[float, ...] | None = None,
                 remat_policy: str = "none",
                 scan_blocks: bool = False, drop_path_group_size: int | None = None, attention_impl: str = "auto",
                 rngs: nnx.Rngs):
        """
        drop_path_rate: batch-subset stochastic depth, the same rate in every block (docs/recipe.md §2.1).
        rope_rescale: r of the training-time coordinate rescale s = exp(U(-ln r, ln r)); None = off.
        rope_bf16: emulate upstream's bf16 RoPE (needed for parity with released checkpoints).
        rope_periods_2d, rope_periods_3d: explicit RoPE periods, e.g. a checkpoint's own `periods` buffers
            (made on another device, they may differ from ours in the last bf16 bit); checked to be plausible
            for head_dim and rope_base. None = computed from rope_base and head_dim (in bf16 with rope_bf16).
        remat_policy: what each block stores for the backward pass, a key of REMAT_POLICIES.
        scan_blocks: run the blocks as one `lax.scan` over their stacked parameters: one block is compiled
            instead of `depth` (compile time), while parameters stay one entry per block (checkpoint layout).
        drop_path_group_size: stochastic depth draws its subset within groups of this many samples (upstream:
            the per-GPU batch); None = one group over the whole batch.
        attention_impl: the attention kernel, a key of `attention.ATTENTION_IMPLS` ("auto": per platform).
        """
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        rope.check_head_dim(dim // num_heads)
        if rope_rescale is not None and rope_rescale < 1.0:
            raise ValueError(f"rope_rescale must be >= 1 (a max factor) or None, got {rope_rescale}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.dim = dim
        self.num_storage_tokens = num_storage_tokens
        self.drop_path_rate = drop_path_rate
        self.rope_rescale = rope_rescale
        self.rope_bf16 = rope_bf16
        if remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy must be one of {sorted(REMAT_POLICIES)}, got {remat_policy!r}")
        if drop_path_group_size is not None and drop_path_group_size < 1:
            raise ValueError(f"drop_path_group_size must be >= 1 or None, got {drop_path_group_size}")
        self.remat_policy = remat_policy
        self.scan_blocks = scan_blocks
        self.drop_path_group_size = drop_path_group_size
        head_dim = dim // num_heads
        # Constants, not parameters. (Torch checkpoints hold them as bf16 `rope_embed_*.periods` buffers,
        # i.e. rope.rope_periods(..., bf16=True), whatever precision this model computes RoPE in.)
        self.rope_periods_2d = rope.model_periods(head_dim, 2, rope_base, bf16=rope_bf16, explicit=rope_periods_2d)
        self.rope_periods_3d = rope.model_periods(head_dim, 3, rope_base, bf16=rope_bf16, explicit=rope_periods_3d)

        self.patch_embed_2d = PatchEmbed(2, in_chans, dim, base_patch_size, rngs=rngs)
        self.patch_embed_3d = PatchEmbed(3, in_chans, dim, base_patch_size, rngs=rngs)
        token_init = nnx.initializers.normal(0.02)
        self.cls_token = nnx.Param(token_init(rngs.params(), (1, 1, dim)), out_sharding=(None, None, "embed"))
        self.storage_tokens = nnx.Param(token_init(rngs.params(), (1, num_storage_tokens, dim)),
                                        out_sharding=(None, None, "embed"))
        self.mask_token = nnx.Param(jnp.zeros((1, dim)), out_sharding=(None, "embed"))
        self.blocks = nnx.List([
            Block(dim, num_heads, mlp_ratio, layerscale_init=layerscale_init, drop_path_rate=drop_path_rate,
                  rope_bf16=rope_bf16, attention_impl=attention_impl, rngs=rngs)
            for _ in range(depth)])
        self.norm = layer_norm(dim, rngs=rngs)

    def __call__(self, x: jax.Array, *, patch_size: int, masks: jax.Array | None = None, train: bool = False,
                 key: jax.Array | None = None, crops_per_sample: int = 1) -> dict[str, jax.Array]:
        """Encodes [B, H, W, C] slices or [B, D, H, W, C] volumes.

        masks: bool [B, N]; masked patch embeddings are replaced by the mask token (iBOT).
        train: stochastic depth and the RoPE coordinate rescale, all randomness drawn from `key`.
        crops_per_sample: the rows of `x` are sample-major with this many crops per sample; a drop-path group
            is drop_path_group_size samples, i.e. that many times this many rows.
        Returns cls [B, dim], storage [B, S, dim], patch [B, N, dim] (after the final norm) and prenorm
        [B, 1+S+N, dim] (before it).
        """
        if x.ndim not in (4, 5):
            raise ValueError(f"expected [B, H, W, C] or [B, D, H, W, C] input, got shape {x.shape}")
        patch_embed = self.patch_embed_2d if x.ndim == 4 else self.patch_embed_3d
        tokens, grid = patch_embed(x, patch_size)
        batch = tokens.shape[0]
        if masks is not None:
            if masks.shape != tokens.shape[:2]:
                raise ValueError(f"masks shape {masks.shape} does not match the {tokens.shape[:2]} patch tokens")
            tokens = jnp.where(masks[..., None], self.mask_token[...][None], tokens)
        prefix = [jnp.broadcast_to(self.cls_token[...], (batch, 1, self.dim)),
                  jnp.broadcast_to(self.storage_tokens[...], (batch, self.num_storage_tokens, self.dim))]
        h = sharding.constrain(jnp.concatenate(prefix + [tokens], axis=1), RESIDUAL_AXES)

        block_keys = None
        rescale = None
        if train and (self.drop_path_rate > 0.0 or self.rope_rescale is not None):
            if key is None:
                raise ValueError("train=True needs a PRNG `key` for stochastic depth and the RoPE rescale")
            rope_key, blocks_key = jax.random.split(key)
            if self.drop_path_rate > 0.0:
                block_keys = jax.random.split(blocks_key, len(self.blocks))
            if self.rope_rescale is not None:
                rescale = rope.sample_rescale(rope_key, self.rope_rescale, bf16=self.rope_bf16)
        periods = self.rope_periods_2d if len(grid) == 2 else self.rope_periods_3d
        sin, cos = rope.rope_sincos(grid, periods, rescale=rescale, bf16=self.rope_bf16)

        groups = 1
        if block_keys is not None and self.drop_path_group_size is not None:
            rows_per_group = self.drop_path_group_size * crops_per_sample
            if batch % rows_per_group:
                raise ValueError(f"{batch} rows ({crops_per_sample} crops per sample) do not split into drop-path "
                                 f"groups of {self.drop_path_group_size} samples")
            groups = batch // rows_per_group
        h = self._run_blocks(h, sin, cos, block_keys, groups)
        normed = self.norm(h)
        prefix_len = 1 + self.num_storage_tokens
        return {"cls": normed[:, 0], "storage": normed[:, 1:prefix_len], "patch": normed[:, prefix_len:],
                "prenorm": h}

    def _run_blocks(self, h: jax.Array, sin: jax.Array, cos: jax.Array, block_keys: jax.Array | None,
                    groups: int) -> jax.Array:
        """The residual stream through every block, one after the other or as a scan over stacked parameters."""
        split = [nnx.split(block) for block in self.blocks]
        graphdef = split[0][0]

        def apply(block_state, h, key):
            block = nnx.merge(graphdef, block_state)
            return sharding.constrain(block(h, sin, cos, key, groups), RESIDUAL_AXES)
        if self.remat_policy != "none":
            # prevent_cse only matters outside a scan (jax.checkpoint docs); inside it costs fusion.
            apply = jax.checkpoint(apply, policy=REMAT_POLICIES[self.remat_policy],
                                   prevent_cse=not self.scan_blocks)
        if not self.scan_blocks:
            for i, (_, block_state) in enumerate(split):
                h = apply(block_state, h, None if block_keys is None else block_keys[i])
            return h
        stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *(block_state for _, block_state in split))
        h, _ = jax.lax.scan(lambda h, xs: (apply(xs[0], h, xs[1]), None), h, (stacked, block_keys))
        return h
