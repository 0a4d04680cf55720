"""The stage-3 alignment task ("TIPS + OSL"): report-guided vision-language training — docs/recipe.md §2.5, §8.

The student is the stage-2 model (backbone, DINO and iBOT heads, continued from the stage-2 EMA teacher) plus
the vision-language parts of `models.vlm`: a text tower (trained from scratch on the reports' sentencepiece
vocabulary, or the Qwen3-Embedding port imported from a local Hugging Face folder), the vision projection and
the logit scale, all top-level so that each is its own clip and parameter group (docs/recipe.md §4, §8). The EMA
teacher tracks the image side only.

Loss (docs/recipe.md §8): L = 0.5·DINO-local + 1.0·iBOT + 1.0·CLIP + 0.5·OSL, no KoLeo, no global DINO term. The
student sees its single global crop masked (RCC-3D, half the samples) and the local crops; the teacher the
unmasked global crop. The image embedding comes from the masked student global crop as upstream does
(`loss.clip_from_masked`); SigLIP can replace CLIP (`loss.contrastive`).
"""
from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from absl import logging
from flax import nnx

from flexict_jax import checkpointing
from flexict_jax.data import pipeline_align
from flexict_jax.errors import ConfigError
from flexict_jax.losses import contrastive, dino, ibot, sinkhorn
from flexict_jax.models import precision, qwen3, vlm
from flexict_jax.models.text_encoder import TextEncoder
from flexict_jax.tasks.common import crops_first, flatten_crops, gather_masked_tokens, merge_model
from flexict_jax.tasks.dino import DinoModel
from flexict_jax.variants import Variant

Params = dict[str, Any]
CONTRASTIVE_LOSSES = ("clip", "siglip")
IMAGE_PARTS = ("backbone", "dino_head", "ibot_head")
# What a "vlm" hand-off needs from its source: the parts of upstream's FlexiCT-3D-VLM (docs/torch_format.md §3.2).
VLM_PARTS = ("backbone", "vision_projection", "text_tower", "logit_scale")
# Stage 3 continues stage 2 (or a stage-3 run), or starts from a vision-language checkpoint ("vlm").
INIT_MODES = ("continue", "inflate_2d_to_3d", "backbone", "vlm")
# SigLIP's initialisation (Zhai et al. 2023): t' = ln 10, b = -10.
SIGLIP_LOGIT_SCALE_INIT, SIGLIP_LOGIT_BIAS_INIT = math.log(10.0), -10.0
# Scalars of the CLIP/SigLIP/OSL logits: they stay float32 under bf16 compute (a bf16 ℓ = ln(1/0.07) would be
# off by up to 0.4 % in e^ℓ), the logits being float32 (docs/scaling.md "Mixed precision").
LOGIT_PARAMS = ("logit_scale", "logit_bias")


class AlignModel(DinoModel, vlm.VisionLanguageHead):
    """The stage-2 model plus the VLM head's parts at the top level: backbone, dino_head, ibot_head, text_tower,
    vision_projection, logit_scale (and text_projection when the tower's width differs from the embedding
    width, logit_bias for SigLIP)."""

    def __init__(self, model: Mapping[str, Any], heads: Mapping[str, Any], text_tower: TextEncoder, *,
                 embed_dim: int | None, contrastive_loss: str, rngs: nnx.Rngs):
        DinoModel.__init__(self, model, heads, rngs=rngs)
        siglip = contrastive_loss == "siglip"
        vlm.VisionLanguageHead.__init__(
            self, text_tower, vision_width=model["dim"], embed_dim=embed_dim,
            logit_scale_init=SIGLIP_LOGIT_SCALE_INIT if siglip else vlm.LOGIT_SCALE_INIT,
            logit_bias_init=SIGLIP_LOGIT_BIAS_INIT if siglip else None, rngs=rngs)


def validate(config: mlc.ConfigDict) -> None:
    """Stage-3 keys; errors name the key and the fix."""
    text, loss = config.text, config.loss
    if loss.get("gram_weight", 0.0) > 0:
        raise ConfigError("stage 3 has no Gram anchoring: set config.loss.gram_weight = 0")
    if text.tower not in pipeline_align.TEXT_TOWERS:
        raise ConfigError(f"config.text.tower={text.tower!r} must be one of {pipeline_align.TEXT_TOWERS}")
    if text.tower == "qwen3" and not text.hf_folder:
        raise ConfigError("config.text.tower='qwen3' needs --config.text.hf_folder=DIR, a local Hugging Face "
                         "Qwen3(-Embedding) folder (config.json, *.safetensors, tokenizer.json); nothing is "
                         "downloaded. Or train a tower from scratch: --config.text.tower=scratch")
    if loss.contrastive not in CONTRASTIVE_LOSSES:
        raise ConfigError(f"config.loss.contrastive={loss.contrastive!r} must be one of {CONTRASTIVE_LOSSES}")
    if loss.contrastive == "siglip" and not ("logit_bias" in config.optim.unclipped
                                             and "logit_bias" in config.optim.get("no_weight_decay", ())):
        raise ConfigError("config.loss.contrastive='siglip' adds a logit bias that must be unclipped and "
                         "undecayed like the logit scale: use --config=configs/stage3.py:VARIANT,contrastive=siglip")
    if config.get("eval") and config.eval.every_steps and config.eval.patch_size not in config.patch_sizes:
        raise ConfigError(f"config.eval.patch_size={config.eval.patch_size} must be one of config.patch_sizes="
                         f"{tuple(config.patch_sizes)}")
    if config.get("eval") and config.eval.every_steps:
        batch, devices, processes = int(config.eval.batch_size), jax.device_count(), jax.process_count()
        if batch < 1 or batch % devices or batch % processes:
            raise ConfigError(f"config.eval.batch_size={batch} must be a positive multiple of the device count "
                              f"({devices}) and the process count ({processes})")
    if text.tower == "qwen3":
        _qwen3_config(text.hf_folder)


def _qwen3_config(folder: str) -> qwen3.Qwen3Config:
    """The architecture of the local Qwen3 folder (its config.json; the weights are read by `initial_params`)."""
    path = pathlib.Path(folder) / qwen3.CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"config.text.hf_folder={folder}: no {qwen3.CONFIG_FILE} (nothing is downloaded)")
    try:
        return qwen3.Qwen3Config.from_hf_dict(json.loads(path.read_text()), source=str(path))
    except json.JSONDecodeError as e:
        raise ConfigError(f"config.text.hf_folder: {path} is not valid JSON ({e})") from e


def _text_tower(config: mlc.ConfigDict, rngs: nnx.Rngs) -> TextEncoder:
    text, impl = config.text, config.model.get("attention_impl", "auto")
    vocab_size = pipeline_align.load_text_tokenizer(text, config.data.dir).vocab_size
    if text.tower == "qwen3":
        tower_config = _qwen3_config(text.hf_folder)
        if vocab_size > tower_config.vocab_size:
            raise ConfigError(f"config.text: the tokenizer has {vocab_size} ids but the Qwen3 embedding of "
                             f"{text.hf_folder} only {tower_config.vocab_size}")
        return qwen3.qwen3_encoder(tower_config, remat=text.remat, attention_impl=impl, rngs=rngs)
    return TextEncoder(vocab_size=vocab_size, **text.scratch.to_dict(), remat=text.remat,
                       attention_impl=impl, rngs=rngs)


def build_model(config: mlc.ConfigDict, seed: int) -> AlignModel:
    rngs = nnx.Rngs(seed)
    return AlignModel(config.model.to_dict(), config.heads.to_dict(), _text_tower(config, rngs),
                      embed_dim=config.text.embed_dim, contrastive_loss=config.loss.contrastive, rngs=rngs)


def initial_params(config: mlc.ConfigDict, params: Params) -> Params:
    """A new run's student with the Qwen3 text tower's imported weights (`text.tower = "qwen3"`, docs/recipe.md §2.5);
    the from-scratch tower keeps its random initialisation. Arrays keep the shardings of `params`."""
    if config.text.tower != "qwen3":
        return params
    folder = config.text.hf_folder
    _, weights = qwen3.load_hf_folder(folder)
    like = params["text_tower"]
    tower = checkpointing.conform(weights, like, what=f"config.text.hf_folder={folder}")
    logging.info("text tower: Qwen3 weights from %s", folder)
    return {**params, "text_tower": jax.device_put(tower, jax.tree.map(lambda a: a.sharding, like))}


def step_batch(local: Mapping[str, np.ndarray], variant: Variant) -> dict[str, np.ndarray]:
    """The crops, the iBOT masks of this step's patch size, and the caption and OSL tokens."""
    batch = {"global_crops": local["global_crops"], "local_crops": local["local_crops"],
             "masks": local[f"masks_p{variant.patch_size}"]}
    return {**batch, **{key: local[key] for key in pipeline_align.TEXT_KEYS}}


def _contrastive_term(model: AlignModel, image_emb: jax.Array, caption_emb: jax.Array, kind: str) -> jax.Array:
    if kind == "siglip":
        return contrastive.siglip_loss(image_emb, caption_emb, model.logit_scale[...], model.logit_bias[...])
    return contrastive.clip_loss(image_emb, caption_emb, model.logit_scale[...])


def _osl_term(model: AlignModel, image_emb: jax.Array, batch: Mapping[str, jax.Array]) -> jax.Array:
    """OSL (docs/recipe.md §8); a sample's K sentences and their K negations go through the text tower in one call."""
    n_pairs = batch["osl_labels"].shape[1]
    tokens = jnp.concatenate([batch["osl_pos_tokens"], batch["osl_neg_tokens"]], axis=1)  # [B, 2K, L]
    mask = jnp.concatenate([batch["osl_pos_mask"], batch["osl_neg_mask"]], axis=1)
    sentences = model.embed_text(flatten_crops(tokens), flatten_crops(mask))  # sample-major: batch-sharded
    sentences = sentences.reshape(tokens.shape[:2] + sentences.shape[-1:])
    return contrastive.osl_loss(image_emb, sentences[:, :n_pairs], sentences[:, n_pairs:], batch["osl_labels"],
                                model.logit_scale[...])


def loss_fn(student: Params, teacher: Params, batch: Mapping[str, jax.Array], key: jax.Array, *,
            graphdef: nnx.GraphDef, abstract_state: nnx.State, config: mlc.ConfigDict, patch_size: int,
            teacher_temperature: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Total stage-3 loss (docs/recipe.md §8) and its terms; `batch` is `step_batch`'s. The models run in
    config.model.compute_dtype (`precision`), the logit scale/bias and the loss in float32."""
    loss_cfg, n_local = config.loss, config.data.n_local_crops
    logged_scale = student["logit_scale"]
    dtype = precision.compute_dtype(config.model.get("compute_dtype", "float32"))
    student = {k: v if k in LOGIT_PARAMS else precision.cast_for_compute(v, dtype) for k, v in student.items()}
    teacher = precision.cast_for_compute(teacher, dtype)
    global_crops = flatten_crops(batch["global_crops"]).astype(dtype)  # [B, G, G, G, 1]: one global crop/sample
    local_crops = flatten_crops(batch["local_crops"]).astype(dtype)
    masks = flatten_crops(batch["masks"])
    masked = gather_masked_tokens(batch["masks"], config)

    # Teacher: eval mode, unmasked global crop. It has no text side; the student's fills those slots, unused.
    t_model = merge_model(graphdef, abstract_state, jax.lax.stop_gradient({**student, **teacher}))
    t_out = t_model.backbone(global_crops, patch_size=patch_size, train=False)
    t_cls_probs = crops_first(sinkhorn.sinkhorn_knopp(t_model.dino_head(t_out["cls"]), teacher_temperature,
                                                       n_iterations=loss_cfg.sinkhorn_iterations), 1)
    t_patch_probs = masked.rows(sinkhorn.sinkhorn_knopp(
        masked.logits(t_model.ibot_head, t_out["patch"]), teacher_temperature,
        n_iterations=loss_cfg.sinkhorn_iterations, valid=masked.valid))

    s_model = merge_model(graphdef, abstract_state, student)
    key_global, key_local, key_clip = jax.random.split(key, 3)
    s_global = s_model.backbone(global_crops, patch_size=patch_size, masks=masks, train=True, key=key_global)
    s_local = s_model.backbone(local_crops, patch_size=patch_size, train=True, key=key_local,
                               crops_per_sample=n_local)
    # Upstream embeds the masked global crop (docs/recipe.md §8 quirk); the flag embeds an unmasked student view.
    s_image = s_global if loss_cfg.clip_from_masked else s_model.backbone(
        global_crops, patch_size=patch_size, train=True, key=key_clip)
    image_emb = s_model.embed_image(s_image["cls"], s_image["patch"])
    caption_emb = s_model.embed_text(batch["caption_tokens"], batch["caption_mask"])

    tau = loss_cfg.student_temperature
    terms = {
        # 8 student locals vs the 1 teacher global, no global term and no pair-count scale factors (docs/recipe.md §8).
        "dino_local": dino.dino_cross_entropy(crops_first(s_model.dino_head(s_local["cls"]), n_local),
                                              t_cls_probs, tau),
        "ibot": ibot.ibot_patch_loss(masked.logits(s_model.ibot_head, s_global["patch"]), t_patch_probs,
                                     masked.weight, masks.shape[0], tau),
        loss_cfg.contrastive: _contrastive_term(s_model, image_emb, caption_emb, loss_cfg.contrastive),
        "osl": _osl_term(s_model, image_emb, batch),
    }
    total = (loss_cfg.dino_weight * terms["dino_local"] + loss_cfg.ibot_weight * terms["ibot"]
             + loss_cfg.contrastive_weight * terms[loss_cfg.contrastive] + loss_cfg.osl_weight * terms["osl"])
    # Logged: the logit scale this step used, i.e. the clamped value after the previous step.
    return total, {**terms, "logit_scale": logged_scale}


def teacher_params(params: Params) -> Params:
    """The EMA teacher tracks the image side only: backbone and both heads (docs/recipe.md §8)."""
    return {part: params[part] for part in IMAGE_PARTS}


def after_update(params: Params) -> Params:
    """Clamps the logit scale to [0, ln 100] after every optimizer step (docs/recipe.md §2.5)."""
    return vlm.clamp_logit_scale(params)


def check_vlm_source(config: mlc.ConfigDict, source: str, parts: Params, meta: dict) -> None:
    """A "vlm" hand-off needs the parts of upstream's FlexiCT-3D-VLM (docs/torch_format.md §3.2) and a text tower of the
    kind this run trains."""
    missing = [part for part in VLM_PARTS if part not in parts]
    if missing:
        raise checkpointing.IncompatibleCheckpointError(
            f"config.init.from={source}: no {missing} (it has {sorted(parts)}), so not a vision-language checkpoint; "
            f"config.init.mode='vlm' needs `import_torch --kind=vlm` output or a stage-3 run")
    # The upstream VLM's tower is Qwen3 (causal, last-token pooling); as a from-scratch tower (bidirectional, mean
    # pooling) the same weights would compute something else, with no shape to tell.
    source_config = meta.get("config", {})
    tower = "qwen3" if "text_tower" in source_config else source_config.get("text", {}).get("tower")
    if tower != config.text.tower:
        raise checkpointing.IncompatibleCheckpointError(
            f"config.init.from={source}: its text tower is {tower!r} but config.text.tower={config.text.tower!r}"
            + ("; pass --config.text.tower=qwen3 --config.text.hf_folder=DIR (a local Qwen3(-Embedding) folder for "
               "its config.json and tokenizer; its weights are not read)" if tower == "qwen3" else ""))
