"""Image-text losses of stage 3: CLIP (docs/recipe.md §8), SigLIP (a config option) and OSL (docs/recipe.md §8).

All functions take GLOBAL arrays: under `jax.jit` with the batch sharded over the mesh, `image @ text.T`
compares every image with every text of the global batch (XLA inserts the all-gather), which is what
upstream's ring-exchange CLIP computes (docs/recipe.md §8, §14.1). Embeddings are expected L2-normalised; the
arithmetic runs in float32 whatever their dtype.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _similarities(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array, name: str) -> jax.Array:
    """[B, B] logits e^ℓ · v_i·t_j."""
    if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(f"{name}: expected image and text embeddings of the same [B, E] shape, got "
                         f"{image_emb.shape} and {text_emb.shape}")
    if jnp.ndim(logit_scale):
        raise ValueError(f"{name}: logit_scale must be a scalar, got shape {jnp.shape(logit_scale)}")
    return jnp.exp(logit_scale) * (image_emb.astype(jnp.float32) @ text_emb.astype(jnp.float32).T)


def clip_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array) -> jax.Array:
    """Symmetric InfoNCE over the global batch (docs/recipe.md §8), with s_ij = e^ℓ·v_i·t_j:

        L = ½·mean_i[−s_ii + LSE_j s_ij] + ½·mean_i[−s_ii + LSE_j s_ji].

    Args:
      image_emb, text_emb: [B, E]; row i of each is a matching pair.
      logit_scale: ℓ, a scalar in log space (e^ℓ is the inverse temperature).

    Returns:
      float32 scalar.
    """
    logits = _similarities(image_emb, text_emb, logit_scale, "clip_loss")
    # s_ii as a masked row sum, not jnp.diagonal: the same values (the other terms are exact zeros), and its
    # gradient is a product, where diagonal's is a scatter-add that the TPU compiler offloads to the SparseCore
    # and its cost model cannot price (docs/scaling.md §4).
    matching = jnp.sum(logits * jnp.eye(logits.shape[0], dtype=logits.dtype), axis=1)
    image_to_text = jnp.mean(jax.nn.logsumexp(logits, axis=1) - matching)
    text_to_image = jnp.mean(jax.nn.logsumexp(logits, axis=0) - matching)
    return 0.5 * (image_to_text + text_to_image)


def siglip_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array, bias: jax.Array) -> jax.Array:
    """Sigmoid loss (SigLIP, Zhai et al. 2023): every (image, text) pair is an independent binary task.

        z_ij = e^ℓ·v_i·t_j + b,  y_ij = +1 if i == j else −1,  L = −(1/B) Σ_ij log σ(y_ij·z_ij).

    Args:
      image_emb, text_emb: [B, E] matching rows.
      logit_scale: ℓ, a scalar in log space; bias: b, a scalar (SigLIP initialises ℓ = ln 10, b = −10).

    Returns:
      float32 scalar: the mean over images of the summed pair losses, so it does not shrink as B grows.
    """
    if jnp.ndim(bias):
        raise ValueError(f"siglip_loss: bias must be a scalar, got shape {jnp.shape(bias)}")
    logits = _similarities(image_emb, text_emb, logit_scale, "siglip_loss") + bias
    signs = 2.0 * jnp.eye(logits.shape[0], dtype=jnp.float32) - 1.0
    return -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / logits.shape[0]


def osl_loss(image_emb: jax.Array, pos_emb: jax.Array, neg_emb: jax.Array, labels: jax.Array,
             logit_scale: jax.Array) -> jax.Array:
    """Opposite-sentence loss (docs/recipe.md §8): does the image match a finding or its negation?

    For pair k of sample b, the logits e^ℓ·[v_b·t(s⁺_bk), v_b·t(s⁻_bk)] go through a 2-way cross-entropy
    whose target is the sentence (index 0) for a true pair (label 1: this patient's finding) and its
    negation (index 1) for a false pair (label 0: another patient's finding, absent here). Equivalently a
    logistic loss on e^ℓ·v·(t⁺ − t⁻) with target `label`.

    Args:
      image_emb: [B, E] image embeddings.
      pos_emb, neg_emb: [B, K, E] embeddings of the K sentences of each sample and of their negations.
      labels: [B, K] int: 1 true pair, 0 false pair, -1 padding (ignored).
      logit_scale: ℓ, the CLIP logit scale (OSL runs at the CLIP temperature).

    Returns:
      float32 scalar: the mean over valid pairs of the global batch (upstream averages per GPU and then over
      GPUs, which weighs GPUs with few valid pairs more); 0 when no pair is valid.
    """
    if (image_emb.ndim != 2 or labels.ndim != 2 or labels.shape[0] != image_emb.shape[0]
            or pos_emb.shape != (*labels.shape, image_emb.shape[1]) or neg_emb.shape != pos_emb.shape):
        raise ValueError(f"osl_loss: expected image [B, E], pos/neg [B, K, E] and labels [B, K], got "
                         f"{image_emb.shape}, {pos_emb.shape}, {neg_emb.shape} and {labels.shape}")
    if jnp.ndim(logit_scale):
        raise ValueError(f"osl_loss: logit_scale must be a scalar, got shape {jnp.shape(logit_scale)}")
    if not isinstance(labels, jax.core.Tracer):
        unknown = np.setdiff1d(np.asarray(labels), [-1, 0, 1])
        if unknown.size:
            raise ValueError(f"osl_loss: labels must be 1, 0 or -1 (padding), got {unknown.tolist()}")
    image = image_emb.astype(jnp.float32)[:, None, :]
    scale = jnp.exp(logit_scale)
    logits = jnp.stack([scale * jnp.sum(image * pos_emb.astype(jnp.float32), axis=-1),
                        scale * jnp.sum(image * neg_emb.astype(jnp.float32), axis=-1)], axis=-1)
    target = jnp.where(labels == 1, 0, 1)
    cross_entropy = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), target[..., None], axis=-1)[..., 0]
    valid = labels >= 0
    # where(), not a product with `valid`: a non-finite padding pair must not turn the sum into NaN.
    return jnp.sum(jnp.where(valid, cross_entropy, 0.0)) / jnp.maximum(jnp.sum(valid), 1)
