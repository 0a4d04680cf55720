"""Stage-3 vision-language head (docs/recipe.md §2.5, §15 item 21; docs/torch_format.md §3.1).

  image embedding v = normalise(W_p · [CLS ‖ mean(patch tokens)]), W_p bias-free, init N(0, (2·width)^-0.5);
  text embedding  t = normalise(P(pooled text tower output)), P the identity when the tower's width equals
                      the embedding width (Qwen3-Embedding-0.6B: 1024 = 1024, so upstream has no projection
                      keys) and a bias-free Linear otherwise;
  similarity      e^ℓ · v·t with a learnable logit scale ℓ, init ln(1/0.07), clamped to [0, ln 100] after
                  every optimizer step (`clamp_logit_scale`).
Parameters: "vision_projection" {"kernel"}, "text_projection" {"kernel"} (only when widths differ),
"logit_scale" (a scalar; torch stores shape (1,)), "logit_bias" (only for SigLIP), "text_tower" {...}.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flexict_jax import ops
from flexict_jax.models.text_encoder import TextEncoder

LOGIT_SCALE_INIT = math.log(1 / 0.07)  # docs/recipe.md §2.5: temperature 0.07
LOGIT_SCALE_MIN = 0.0                  # docs/recipe.md §2.5: e^ℓ in [1, 100]
LOGIT_SCALE_MAX = math.log(100.0)


def l2_normalize(x: jax.Array) -> jax.Array:
    """torch `F.normalize`: x / max(‖x‖, 1e-12) over the last axis."""
    return ops.l2_normalize(x)


def _projection(in_features: int, out_features: int, *, rngs: nnx.Rngs) -> nnx.Linear:
    # Upstream initialises the 1728 -> 1024 vision projection with std 1728^-0.5 (docs/recipe.md §2.5): 1/sqrt(fan_in).
    init = nnx.initializers.normal(in_features ** -0.5)
    return nnx.Linear(in_features, out_features, use_bias=False, rngs=rngs,
                      kernel_init=nnx.with_partitioning(init, ("embed", None)))


class VisionLanguageHead(nnx.Module):
    """The text tower plus everything stage 3 adds on top of the vision backbone."""

    def __init__(self, text_tower: TextEncoder, *, vision_width: int, embed_dim: int | None = None,
                 logit_scale_init: float = LOGIT_SCALE_INIT, logit_bias_init: float | None = None,
                 rngs: nnx.Rngs):
        """
        text_tower: a `TextEncoder` (from scratch, or `qwen3.qwen3_encoder`); its pooled output is used.
        vision_width: the backbone width D; the image feature [CLS ‖ mean patch] has 2·D entries.
        embed_dim: the joint embedding width; None = the text tower's width (identity text projection).
        logit_scale_init: ℓ at init, ln(1/0.07) for CLIP (docs/recipe.md §2.5); SigLIP uses ln 10.
        logit_bias_init: None for CLIP (no bias, docs/recipe.md §2.5); a value (SigLIP: -10) adds a learnable bias.
        """
        embed_dim = text_tower.width if embed_dim is None else embed_dim
        if vision_width < 1 or embed_dim < 1:
            raise ValueError(f"vision_width and embed_dim must be positive, got {vision_width}, {embed_dim}")
        if not LOGIT_SCALE_MIN <= logit_scale_init <= LOGIT_SCALE_MAX:
            raise ValueError(f"logit_scale_init {logit_scale_init} is outside the clamp range "
                             f"[{LOGIT_SCALE_MIN}, ln 100]")
        self.text_tower = text_tower
        self.vision_projection = _projection(2 * vision_width, embed_dim, rngs=rngs)
        self.text_projection = (None if text_tower.width == embed_dim
                                else _projection(text_tower.width, embed_dim, rngs=rngs))
        self.logit_scale = nnx.Param(jnp.asarray(logit_scale_init, jnp.float32), out_sharding=())
        self.logit_bias = (None if logit_bias_init is None
                           else nnx.Param(jnp.asarray(logit_bias_init, jnp.float32), out_sharding=()))

    def embed_image(self, cls: jax.Array, patch: jax.Array) -> jax.Array:
        """Unit-norm image embeddings [B, E] from the backbone's post-norm cls [B, D] and patch [B, N, D].

        The patch mean is over every token, masked ones included, as upstream (docs/recipe.md §8 quirk).
        """
        if cls.ndim != 2 or patch.ndim != 3 or patch.shape[::2] != cls.shape:
            raise ValueError(f"expected cls [B, D] and patch [B, N, D], got {cls.shape} and {patch.shape}")
        features = jnp.concatenate([cls, jnp.mean(patch, axis=1)], axis=-1)
        return l2_normalize(self.vision_projection(features))

    def embed_text(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        """Unit-norm text embeddings [B, E] of token ids [B, L] with mask [B, L] (True = real token)."""
        pooled = self.text_tower(tokens, mask)["pooled"]
        if self.text_projection is not None:
            pooled = self.text_projection(pooled)
        return l2_normalize(pooled)


def clamp_logit_scale(params: Mapping[str, Any]) -> dict[str, Any]:
    """`params` with params["logit_scale"] clipped to [0, ln 100]; every other entry is passed through.

    Call it on the trainable parameters after each optimizer step (docs/recipe.md §2.5). Pure, so it works under jit.
    """
    if "logit_scale" not in params:
        raise KeyError(f"clamp_logit_scale: no 'logit_scale' among the parameters {sorted(params)}")
    return {**params, "logit_scale": jnp.clip(params["logit_scale"], LOGIT_SCALE_MIN, LOGIT_SCALE_MAX)}
