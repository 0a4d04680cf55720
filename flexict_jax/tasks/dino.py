"""The DINO/iBOT/KoLeo self-distillation task of stages 1 (2D), 1.1 (2D + Gram) and 2 (3D) — docs/recipe.md §3, §5-§7.

Pure functions over pytrees (`flexict_jax.tasks.Task`): `loss_fn` computes the student loss given the EMA
teacher, and the frozen Gram teacher when the stage has one. The trainer owns sharding, the optimizer, the EMA and the loop; this file owns what is specific
to DINO.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from flax import nnx

from flexict_jax.errors import ConfigError
from flexict_jax.losses import dino, gram, ibot, koleo, sinkhorn
from flexict_jax.models import precision
from flexict_jax.models.heads import DINOHead
from flexict_jax.models.vit import VisionTransformer
from flexict_jax.tasks.common import crops_first, flatten_crops, gather_masked_tokens, merge_model
from flexict_jax.variants import Variant

Params = dict[str, Any]
# Stage 1 starts from scratch or continues a run; stage 1.1 continues stage 1; stage 2 inflates stage 1's
# backbone (heads re-initialised, docs/recipe.md §7). A vision-language source is stage 3's.
INIT_MODES = ("continue", "inflate_2d_to_3d", "backbone")
# config.model keys that are not VisionTransformer arguments: the task applies them around the model.
TASK_MODEL_KEYS = ("compute_dtype",)


class DinoModel(nnx.Module):
    """Backbone + separate DINO (CLS) and iBOT (patch) heads (docs/recipe.md §2.4, `ibot.separate_head: true`).

    The student and the EMA teacher are two parameter sets of this one module structure.
    """

    def __init__(self, model: Mapping[str, Any], heads: Mapping[str, Any], *, rngs: nnx.Rngs):
        self.backbone = VisionTransformer(**{k: v for k, v in model.items() if k not in TASK_MODEL_KEYS}, rngs=rngs)
        self.dino_head = DINOHead(model["dim"], **heads, rngs=rngs)
        self.ibot_head = DINOHead(model["dim"], **heads, rngs=rngs)


def build_model(config: mlc.ConfigDict, seed: int) -> DinoModel:
    return DinoModel(config.model.to_dict(), config.heads.to_dict(), rngs=nnx.Rngs(seed))


def step_batch(local: Mapping[str, np.ndarray], variant: Variant) -> dict[str, np.ndarray]:
    """The arrays one step needs: the crops, the iBOT masks of this step's patch size, and the Gram teacher's
    crops when the stage has them (stage 1.1)."""
    if "resolution_index" in local and int(local["resolution_index"]) != variant.resolution_index:
        raise RuntimeError(f"data/step mismatch: the batch was built at resolution {int(local['resolution_index'])} "
                           f"but this step draws {variant.resolution_index}; the iterator is out of step")
    batch = {"global_crops": local["global_crops"], "local_crops": local["local_crops"],
             "masks": local[f"masks_p{variant.patch_size}"]}
    if "gram_crops" in local:
        batch["gram_crops"] = local["gram_crops"]
    return batch


def loss_fn(student: Params, teacher: Params, batch: Mapping[str, jax.Array], key: jax.Array, *,
            graphdef: nnx.GraphDef, abstract_state: nnx.State, config: mlc.ConfigDict, patch_size: int,
            teacher_temperature: jax.Array,
            gram_teacher: Params | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Total loss (docs/recipe.md §3.6) and its terms, plus `target_diagnostics` (logged, not part of the total). `batch`
    holds this step's masks under "masks"; with a frozen `gram_teacher` (stage 1.1) the batch also has
    "gram_crops" and the Gram term is added (docs/recipe.md §3.5). Student, teacher and crops run in
    config.model.compute_dtype (`precision`); the loss is float32."""
    loss_cfg, n_global, n_local = config.loss, config.data.n_global_crops, config.data.n_local_crops
    dtype = precision.compute_dtype(config.model.get("compute_dtype", "float32"))
    student, teacher = precision.cast_for_compute((student, teacher), dtype)
    global_crops = flatten_crops(batch["global_crops"]).astype(dtype)
    local_crops = flatten_crops(batch["local_crops"]).astype(dtype)
    masks = flatten_crops(batch["masks"])  # [B * n_global, N]
    n_images = masks.shape[0]
    masked = gather_masked_tokens(batch["masks"], config)

    # Teacher: eval mode, unmasked global crops, no gradient (docs/recipe.md §3.2–3.3).
    t_model = merge_model(graphdef, abstract_state, jax.lax.stop_gradient(teacher))
    t_out = t_model.backbone(global_crops, patch_size=patch_size, train=False)
    t_cls_logits = t_model.dino_head(t_out["cls"])
    t_patch_logits = masked.logits(t_model.ibot_head, t_out["patch"])
    t_cls_probs = sinkhorn.sinkhorn_knopp(t_cls_logits, teacher_temperature,
                                          n_iterations=loss_cfg.sinkhorn_iterations)
    t_patch_probs = masked.rows(sinkhorn.sinkhorn_knopp(
        t_patch_logits, teacher_temperature, n_iterations=loss_cfg.sinkhorn_iterations, valid=masked.valid))
    diagnostics = {**target_diagnostics("dino", t_cls_logits, t_cls_probs),
                   **target_diagnostics("ibot", t_patch_logits, t_patch_probs, valid=masked.valid)}
    t_cls_probs = crops_first(t_cls_probs, n_global)

    # Student: masked global crops and unmasked local crops, train mode (drop path, RoPE rescale).
    s_model = merge_model(graphdef, abstract_state, student)
    key_global, key_local = jax.random.split(key)
    s_global = s_model.backbone(global_crops, patch_size=patch_size, masks=masks, train=True, key=key_global,
                                crops_per_sample=n_global)
    s_local = s_model.backbone(local_crops, patch_size=patch_size, train=True, key=key_local,
                               crops_per_sample=n_local)
    s_global_logits = crops_first(s_model.dino_head(s_global["cls"]), n_global)
    s_local_logits = crops_first(s_model.dino_head(s_local["cls"]), n_local)
    s_patch_logits = masked.logits(s_model.ibot_head, s_global["patch"])

    tau = loss_cfg.student_temperature
    scale_local, scale_global = dino.dino_term_weights(n_global, n_local)
    terms = {
        "dino_local": dino.dino_cross_entropy(s_local_logits, t_cls_probs, tau),
        "dino_global": dino.dino_cross_entropy(s_global_logits, t_cls_probs, tau, ignore_diagonal=True),
        "ibot": ibot.ibot_patch_loss(s_patch_logits, t_patch_probs, masked.weight, n_images, tau),
        # KoLeo on the pre-head CLS of each global crop, averaged over crops (docs/recipe.md §3.4).
        "koleo": jnp.mean(jnp.stack([
            koleo.koleo_loss(cls, group_size=loss_cfg.koleo_group_size)
            for cls in crops_first(s_global["cls"], n_global)])),
    }
    if gram_teacher is not None:
        terms["gram"] = _gram_term(precision.cast_for_compute(gram_teacher, dtype), teacher,
                                   batch["gram_crops"].astype(dtype), s_global["patch"],
                                   graphdef=graphdef, abstract_state=abstract_state, patch_size=patch_size)
    total = (loss_cfg.dino_weight * (scale_local * loss_cfg.dino_local_weight * terms["dino_local"]
                                     + scale_global * terms["dino_global"])
             + loss_cfg.koleo_weight * n_global * terms["koleo"]  # upstream's koleo_scale = n_global
             + loss_cfg.ibot_weight * terms["ibot"]
             + (loss_cfg.gram_weight * terms["gram"] if "gram" in terms else 0.0))
    return total, {**terms, **diagnostics}


def target_diagnostics(name: str, teacher_logits: jax.Array, targets: jax.Array,
                       valid: jax.Array | None = None) -> dict[str, jax.Array]:
    """Two cheap numbers that say whether the teacher's targets can carry a signal (logged, not trained on).

    `{name}_teacher_spread`: the std over the teacher rows (crops or masked tokens) of each prototype logit,
    averaged over prototypes, before the temperature. Sinkhorn-Knopp makes every row uniform unless this is a
    sizeable fraction of the teacher temperature (0.04-0.07): at init with LayerScale 1e-5 it is 1e-7-1e-4.
    `{name}_target_entropy`: the mean entropy of the Sinkhorn-Knopp targets; ln K means uniform targets and a
    cross-entropy of ln K (DINO) that gives the student no signal; it falls as the targets sharpen.
    """
    logits = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32)
    weight = jnp.ones(logits.shape[:1], jnp.float32) if valid is None else valid.astype(jnp.float32)
    n_rows = jnp.maximum(jnp.sum(weight), 1.0)
    mean = jnp.sum(logits * weight[:, None], axis=0) / n_rows
    variance = jnp.sum(jnp.square(logits - mean) * weight[:, None], axis=0) / n_rows
    probs = targets.reshape(logits.shape)
    entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0), axis=-1)
    return {f"{name}_teacher_spread": jnp.mean(jnp.sqrt(variance)),
            f"{name}_target_entropy": jnp.sum(entropy * weight) / n_rows}


def _gram_term(gram_teacher: Params, teacher: Params, gram_crops: jax.Array, student_patch: jax.Array, *,
               graphdef: nnx.GraphDef, abstract_state: nnx.State, patch_size: int) -> jax.Array:
    """Gram anchoring (docs/recipe.md §3.5, §6): the frozen Gram teacher sees the same field of view at a higher
    resolution; its patch grid is resized to the student's before comparing per-image Gram matrices."""
    crops = flatten_crops(gram_crops)
    # Only the backbone of the Gram teacher exists; the EMA teacher's heads fill the unused head slots.
    model = merge_model(graphdef, abstract_state, jax.lax.stop_gradient(dict(teacher, backbone=gram_teacher["backbone"])))
    teacher_patch = model.backbone(crops, patch_size=patch_size, train=False)["patch"]
    spatial = crops.ndim - 2
    grid_from = (crops.shape[1] // patch_size,) * spatial
    grid_to = (round(student_patch.shape[1] ** (1 / spatial)),) * spatial
    return gram.gram_loss(student_patch, gram.resize_patch_grid(teacher_patch, grid_from, grid_to))


def teacher_params(params: Params) -> Params:
    """The EMA teacher tracks backbone and both heads: all of the DINO student."""
    return params


def after_update(params: Params) -> Params:
    return params


def initial_params(config: mlc.ConfigDict, params: Params) -> Params:
    del config
    return params


def validate(config: mlc.ConfigDict) -> None:
    """DINO has no keys beyond those every stage has (`flexict_jax.config_check`)."""
    del config


def check_vlm_source(config: mlc.ConfigDict, source: str, parts: Params, meta: dict) -> None:
    raise ConfigError("config.init.mode='vlm' starts stage 3 from a vision-language checkpoint; use "
                      "--config=configs/stage3.py")
