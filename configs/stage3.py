"""Stage 3: report-guided vision-language alignment ("TIPS + OSL"), starting from the stage-2 EMA teacher.

    python -m flexict_jax.train --config=configs/stage3.py[:tiny|:demo][,contrastive=siglip] --workdir=DIR \\
        --config.data.dir=REPORTS_DIR --config.init.from=STAGE2_WORKDIR [--config.init.step=N] \\
        [--config.text.hf_folder=QWEN3_EMBEDDING_DIR | --config.text.tower=scratch]

REPORTS_DIR comes from `python -m data_prep.reports --dataset DATASET_DIR ...` on a dataset ingested at 2 mm
(`python -m data_prep.ingest ... --spacing 2,2,2 --split train|val`, then `python -m data_prep.volume_stats`);
the from-scratch text tower also needs `python -m data_prep.tokenizer --corpus REPORTS_DIR`. The backbone and
both heads continue from the stage-2 teacher (`init.mode = "continue"`); the text tower, the vision projection
and the logit scale are new. Defaults follow `tips/clip_osl.yaml` (docs/recipe.md §8); the recipe's text tower is
Qwen3-Embedding-0.6B, read from a local Hugging Face folder (never downloaded).
"""
from __future__ import annotations

import ml_collections as mlc

from configs import common, stage2

# Recipe §8: the stage-3 views differ from stage 2's only in these data keys.
STAGE3_IMAGE_VIEWS = dict(n_global_crops=1, global_crop_mode="center", local_crop_extent=(20, 40),
                          flip_prob=0.0, flip_global_crops=(), intensity_augment=False)


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    args = common.parse_arg(arg, variant="base", contrastive="clip")
    variant = args.variant
    if variant not in ("base", "demo", "tiny"):
        raise ValueError(f"configs/stage3.py: unknown variant {variant!r}; use base, demo or tiny")
    if args.contrastive not in ("clip", "siglip"):
        raise ValueError(f"configs/stage3.py: contrastive={args.contrastive!r}; use clip or siglip")
    # Recipe §8: 35 per GPU x 8 GPUs; 50 "epochs" of 1000 iterations.
    c = common.ssl_config("stage3", variant, global_batch_size=280, total_steps=50_000)
    c.task = "align"
    c.model.drop_path_group_size = 35  # the per-GPU batch (docs/recipe.md §8)
    # Preprocessing as stage 2 (2 mm, [-1000, 1000] clamp, z-score, RCC-3D masks), with the stage-3 views: one
    # centred global crop, locals of [20, 40] voxels, no intensity augmentation, no flips (docs/recipe.md §8).
    c.data = stage2.get_config(variant).data
    c.data.update(dict(kind="reports3d", **STAGE3_IMAGE_VIEWS))
    c.data.dir = mlc.config_dict.placeholder(str)  # a reports dir from `python -m data_prep.reports`
    c.data.dataset_dir = mlc.config_dict.placeholder(str)  # None: the dataset named in the reports' index.json
    c.data.split = "train"  # the records trained on; "" = records without a split
    c.text = mlc.ConfigDict(dict(
        tower="qwen3",  # docs/recipe.md §2.5: Qwen3-Embedding-0.6B; "scratch": a TextEncoder on the reports' vocabulary
        hf_folder=mlc.config_dict.placeholder(str),  # local Qwen3(-Embedding) folder: config.json, safetensors
        tokenizer=mlc.config_dict.placeholder(str),  # None: hf_folder (qwen3) or data.dir/tokenizer.model
        # The from-scratch tower (our choice; upstream has none): bidirectional, mean pooling, SwiGLU.
        scratch=dict(width=512, depth=8, num_heads=8, mlp_dim=1536, causal=False, pooling="mean",
                     rope_theta=10_000.0),
        embed_dim=mlc.config_dict.placeholder(int),  # None: the tower's width (Qwen3: 1024, identity projection)
        remat=True,  # docs/recipe.md §2.5: gradient checkpointing in the text tower
        caption_len=768, osl_len=256, osl_pairs=8))  # docs/recipe.md §8
    c.loss.update(dict(
        dino_weight=0.5,  # local term only, no pair-count scale factors (docs/recipe.md §3.6 table, §8)
        ibot_weight=1.0, koleo_weight=0.0, koleo_group_size=None,
        contrastive=args.contrastive, contrastive_weight=1.0, osl_weight=0.5,
        clip_from_masked=True))  # upstream embeds the masked student global crop (docs/recipe.md §8 quirk)
    lr_scale = c.get_ref("lr_scale")
    c.schedules = mlc.ConfigDict(dict(
        lr=common.schedule(1e-4 * lr_scale, 1e-4 * lr_scale, 1e-6 * lr_scale, warmup_steps=0),  # cosine, §8
        weight_decay=common.constant(0.04),
        momentum=common.constant(0.999),
        teacher_temperature=common.constant(0.07)))
    c.optim.freeze_last_layer_steps = 0  # docs/recipe.md §8: no last-layer freeze
    c.optim.idle_patterns = ["backbone/patch_embed_2d"]
    # Recipe §4, §8: clip each student submodule and the text tower; projection and logit scale unclipped, no
    # weight decay on the logit scale. SigLIP's bias is treated like the scale.
    scalars = ["logit_scale"] + (["logit_bias"] if args.contrastive == "siglip" else [])
    c.optim.unclipped = ["vision_projection"] + scalars
    c.optim.no_weight_decay = scalars
    c.init.mode = "continue"
    c.eval = mlc.ConfigDict(dict(
        every_steps=2500,  # 0 = no evaluation during training
        split="val",  # held-out records of the reports dir ("" = records without a split)
        batch_size=c.get_ref("global_batch_size"), patch_size=16,
        max_examples=mlc.config_dict.placeholder(int)))  # None: the whole split

    if variant == "tiny":
        common.cpu_sized(c, "tiny")
        c.global_batch_size = 8
        c.total_steps = 6
        c.text.update(dict(tower="scratch", remat=False, caption_len=48, osl_len=16, osl_pairs=4,
                           scratch=dict(width=32, depth=1, num_heads=2, mlp_dim=64, causal=False, pooling="mean",
                                        rope_theta=10_000.0)))
        c.schedules.lr = common.schedule(1e-3, 1e-3, 1e-4, warmup_steps=0)
        c.eval.update(dict(every_steps=3, patch_size=8))
    elif variant == "demo":
        common.cpu_sized(c, "demo")
        c.global_batch_size = 8
        c.total_steps = 600
        c.text.update(dict(tower="scratch", remat=False, caption_len=64, osl_len=24, osl_pairs=4,
                           scratch=dict(width=64, depth=2, num_heads=2, mlp_dim=128, causal=False, pooling="mean",
                                        rope_theta=10_000.0)))
        c.schedules.lr = common.schedule(1e-3, 1e-3, 1e-4, warmup_steps=0)
        c.schedules.momentum = common.constant(0.99)
        # A few phantoms cannot generalise to held-out ones: the demo shows retrieval on what it trains on.
        c.eval.update(dict(every_steps=100, patch_size=16, split="train"))
        c.log_every = 10
    return c
