"""Mixed precision (config.model.compute_dtype, flexict_jax.models.precision; docs/scaling.md "Mixed precision").

bf16 keeps 8 significant bits (unit roundoff 2^-9 ≈ 0.2 %). A tiny model's loss passes through a few dozen
rounded ops, each adding an independent error of that order, so agreement to ~1 % of the loss (and ~10 % in
the L2 norm of each module's gradient, which goes through twice as many ops and sums many small terms) is what
bf16 can deliver; a missing float32 island (softmax, Sinkhorn, the normalisations) or a wrong cast moves the
result by far more (exp/log of bf16-rounded logits of magnitude ~1/τ = 10 are off by several %).
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import stage1, stage3
from flexict_jax import sharding, train_step
from flexict_jax.models import precision
from flexict_jax.models.text_encoder import TextEncoder
from flexict_jax.tasks import align, dino
from flexict_jax.variants import Variant

pytestmark = pytest.mark.slow  # each test compiles full train steps twice (bf16 and f32)

LOSS_RTOL = 1e-2
GRAD_RTOL = 0.1
BATCH = 8


def _deterministic(config):
    config.model.drop_path_rate = 0.0  # same computation in both precisions: no random subset, no RoPE rescale
    config.model.rope_rescale = None
    # LayerScale 1e-5 leaves a fresh network near the identity: every CLS is then LN(cls_token) to ~1e-6, and
    # KoLeo's log nearest-neighbour distance (~e^-12) is below bf16's resolution, in upstream's bf16 as here.
    # Blocks that contribute give samples distinct embeddings, as in training.
    config.model.layerscale_init = 0.1
    return config


def _dino_batch(config, patch_size=16):
    rng = np.random.default_rng(0)
    g, loc = config.data.global_crop_size, config.data.local_crop_size
    n_global, n_local = config.data.n_global_crops, config.data.n_local_crops
    tokens = (g // patch_size) ** 2
    masks = np.zeros((BATCH, n_global, tokens), bool)
    masks[::2, 0, : tokens // 2] = True
    return {"global_crops": rng.normal(size=(BATCH, n_global, g, g, 1)).astype(np.float32),
            "local_crops": rng.normal(size=(BATCH, n_local, loc, loc, 1)).astype(np.float32), "masks": masks}


def _align_batch(config, patch_size=16):
    rng = np.random.default_rng(1)
    g, loc, n_local = config.data.global_crop_size, config.data.local_crop_size, config.data.n_local_crops
    tokens = (g // patch_size) ** 3
    masks = np.zeros((BATCH, 1, tokens), bool)
    masks[::2, 0, : tokens // 2] = True
    pairs, osl_len, caption_len = config.text.osl_pairs, config.text.osl_len, config.text.caption_len

    def text(*shape):
        lengths = rng.integers(3, shape[-1], size=shape[:-1])
        return rng.integers(1, 64, size=shape).astype(np.int32), np.arange(shape[-1]) < lengths[..., None]
    caption, caption_mask = text(BATCH, caption_len)
    pos, pos_mask = text(BATCH, pairs, osl_len)
    neg, neg_mask = text(BATCH, pairs, osl_len)
    return {"global_crops": rng.normal(size=(BATCH, 1, g, g, g, 1)).astype(np.float32),
            "local_crops": rng.normal(size=(BATCH, n_local, loc, loc, loc, 1)).astype(np.float32), "masks": masks,
            "caption_tokens": caption, "caption_mask": caption_mask, "osl_pos_tokens": pos, "osl_pos_mask": pos_mask,
            "osl_neg_tokens": neg, "osl_neg_mask": neg_mask,
            "osl_labels": rng.integers(-1, 2, size=(BATCH, pairs)).astype(np.int32)}


def _align_model(config):
    tower = TextEncoder(vocab_size=64, **config.text.scratch.to_dict(), rngs=nnx.Rngs(1))
    return align.AlignModel(config.model.to_dict(), config.heads.to_dict(), tower, embed_dim=None,
                            contrastive_loss="clip", rngs=nnx.Rngs(0))


def _loss_and_grads(task, model_fn, config, batch, dtype_name):
    config = config.copy_and_resolve_references()
    config.model.compute_dtype = dtype_name
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: model_fn(config)))
    params = nnx.to_pure_dict(nnx.state(model_fn(config)))

    @jax.jit
    def run(params):
        return jax.value_and_grad(task.loss_fn, has_aux=True)(
            params, task.teacher_params(params), batch, jax.random.key(0), graphdef=graphdef,
            abstract_state=abstract, config=config, patch_size=16, teacher_temperature=0.04)
    (loss, terms), grads = run(params)
    return float(loss), jax.device_get(terms), jax.device_get(grads)


def _assert_agree(task, model_fn, config, batch):
    loss32, terms32, grads32 = _loss_and_grads(task, model_fn, config, batch, "float32")
    loss16, terms16, grads16 = _loss_and_grads(task, model_fn, config, batch, "bfloat16")
    assert np.isfinite(loss16)
    assert loss16 == pytest.approx(loss32, rel=LOSS_RTOL)
    for name in terms32:
        assert float(terms16[name]) == pytest.approx(float(terms32[name]), rel=LOSS_RTOL, abs=1e-4), name
    # Gradients come back float32 (the cast's transpose), close to the float32 ones per top-level module.
    assert all(g.dtype == np.float32 for g in jax.tree.leaves(grads16))
    for part in grads32:
        a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(grads32[part])])
        b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(grads16[part])])
        assert np.linalg.norm(b - a) <= GRAD_RTOL * np.linalg.norm(a) + 1e-12, part


def test_precision_names_the_key_of_a_bad_dtype():
    with pytest.raises(ValueError, match="config.model.compute_dtype='float16'"):
        precision.compute_dtype("float16")


def test_recipe_variants_compute_in_bf16_and_cpu_variants_in_f32():
    assert stage1.get_config().model.compute_dtype == "bfloat16"
    assert stage3.get_config().model.compute_dtype == "bfloat16"
    assert stage1.get_config("tiny").model.compute_dtype == "float32"
    assert stage1.get_config("demo").model.compute_dtype == "float32"


def test_stage1_dino_loss_and_gradients_agree_in_bf16_and_f32():
    config = _deterministic(stage1.get_config("tiny"))
    _assert_agree(dino, lambda c: dino.build_model(c, 0), config, _dino_batch(config))


def test_stage3_align_loss_and_gradients_agree_in_bf16_and_f32():
    config = _deterministic(stage3.get_config("tiny"))
    _assert_agree(align, _align_model, config, _align_batch(config))


def test_bf16_train_step_has_bf16_dots_and_keeps_float32_state():
    config = _deterministic(stage1.get_config("tiny"))
    config.model.compute_dtype = "bfloat16"
    mesh = sharding.make_mesh(config.mesh)
    with sharding.activate(mesh, config.sharding_rules):
        program = train_step.build_program(config, mesh)
        local = _dino_batch(config)
        step = program.train_step(config, Variant(16), local)
        state = jax.jit(program.init_state, out_shardings=program.state_shardings)()
        batch = sharding.global_batch(mesh, local)
        hlo = step.lower(state, batch).as_text()
        dots = [line for line in hlo.splitlines() if "stablehlo.dot_general" in line]
        operands = [tuple(t.split("x")[-1] for t in re.search(r": \(tensor<([^>]*)>, tensor<([^>]*)>\)", line).groups())
                    for line in dots]
        bf16 = [o for o in operands if o == ("bf16", "bf16")]
        # float32 operands rounded to bf16 by the dot itself: jax's attention backward (BF16_BF16_F32).
        bf16_algorithm = [line for line in dots if "lhs_precision_type = bf16" in line]
        # float32 by design: the PI-resize of the patch kernel (HIGHEST, as upstream's float32 pinv) ...
        resize = [line for line in dots if "precision = [HIGHEST, HIGHEST]" in line]
        # ... and the losses: DINO cross-entropy (local, global; forward, backward) and KoLeo x·xᵀ (2 crops).
        rest = len(dots) - len(bf16) - len(bf16_algorithm) - len(resize)
        assert len(bf16) > 60 and rest <= 6, operands
        new, metrics = step(state, batch)
        assert bool(metrics["finite"]) and np.isfinite(float(metrics["loss"]))
        for part in ("params", "teacher", "opt_state"):
            dtypes = {leaf.dtype for leaf in jax.tree.leaves(new[part]) if jnp.issubdtype(leaf.dtype, jnp.floating)}
            assert dtypes == {jnp.dtype(jnp.float32)}, part
