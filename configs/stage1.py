"""Stage 1: 2D axial SSL (DINO + iBOT + KoLeo, Sinkhorn-Knopp centring, EMA teacher).

    python -m flexict_jax.train --config=configs/stage1.py[:tiny|:demo] --workdir=DIR --config.data.dir=SLICES

Defaults are the recipe's (`fleximeddinov3_b_ct_pretrain.yaml`, recipe §5); `tiny` is for tests (seconds on
CPU), `demo` for the README quickstart (a small ViT that visibly learns in a few minutes on 2 cores).
"""
from __future__ import annotations

import ml_collections as mlc

from configs import common
from flexict_jax.optim import lr_scale_sqrt_1024


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    arg = common.parse_arg(arg, variant="base")
    variant = arg.variant
    if variant not in ("base", "demo", "tiny"):
        raise ValueError(f"configs/stage1.py: unknown variant {variant!r}; use base, demo or tiny")
    c = mlc.ConfigDict()
    c.stage = "stage1"
    c.variant = variant
    c.seed = 0

    # Recipe §5: 100 per GPU x 8 GPUs; "epoch" = 1000 iterations; 1000 epochs planned.
    c.global_batch_size = mlc.FieldReference(800)
    c.total_steps = 1_000_000

    c.model = mlc.ConfigDict(dict(
        **common.BACKBONES["base"], mlp_ratio=4.0, num_storage_tokens=4, in_chans=1, base_patch_size=8,
        layerscale_init=1e-5, drop_path_rate=0.2,  # recipe §2.1: same rate in every block
        rope_base=100.0, rope_rescale=2.0,  # recipe §2.2: training-time coordinate rescale in [1/2, 2]
        rope_bf16=False,  # fp32 RoPE for new training (recipe §13 #13); True emulates upstream
        remat=False))
    c.heads = mlc.ConfigDict(common.HEADS["base"])
    # Recipe §2.3: one patch size per step, 16 or 8 with probability 1/2, drawn from a step-seeded RNG.
    c.patch_sizes = (16, 8)
    c.patch_size_probs = (0.5, 0.5)

    c.data = mlc.ConfigDict(dict(
        kind="slices2d",
        dir=mlc.config_dict.placeholder(str),  # the slices dir from `python -m data_prep.slices`
        global_crop_size=256, local_crop_size=112, n_global_crops=2, n_local_crops=8,  # recipe §5
        global_crop_scale=(0.32, 1.0), local_crop_scale=(0.05, 0.32), crop_ratio=(3 / 4, 4 / 3),
        hflip_prob=0.5, hu_window=(-1000.0, 1000.0),
        intensity=dict(noise_prob=0.1, noise_std=0.1, smooth_prob=0.2, smooth_sigma=(0.5, 1.0),
                       scale_prob=0.15, scale_factor=0.25, lowres_prob=0.25, lowres_zoom=(0.5, 1.0),
                       contrast_prob=0.1, contrast_gamma=(0.7, 1.5)),
        mask=dict(probability=0.5, ratio=(0.1, 0.5), min_block_patches=4, block_aspect=(0.3, 1 / 0.3),
                  max_block_fraction=0.5),
        num_workers=4, worker_buffer_size=2, read_threads=4, prefetch_buffer_size=8))

    c.loss = mlc.ConfigDict(dict(
        dino_weight=1.0, dino_local_weight=1.0, ibot_weight=1.0,
        koleo_weight=0.1,  # applied x n_global_crops, as upstream (recipe §3.6): effective 0.2
        koleo_group_size=100,  # upstream KoLeo runs per GPU batch of 100 (recipe §3.4); fixed groups keep
        # the loss independent of the device count
        student_temperature=0.1, sinkhorn_iterations=3))

    # Recipe §4: lr = base * 4 * sqrt(global_batch / 1024) (`sqrt_wrt_1024`), peak and end alike; a reference,
    # so --config.global_batch_size=... rescales it.
    lr_scale = lr_scale_sqrt_1024(c.get_ref("global_batch_size"))
    c.schedules = mlc.ConfigDict(dict(
        lr=common.schedule(0.0, 2e-4 * lr_scale, 2e-4 * lr_scale, warmup_steps=30_000),
        weight_decay=common.constant(0.04),
        momentum=common.constant(0.994),
        teacher_temperature=common.schedule(0.04, 0.07, 0.07, warmup_steps=30_000)))
    c.optim = mlc.ConfigDict(dict(
        clip_grad=3.0, unclipped=[], betas=(0.9, 0.999), eps=1e-8, layer_decay=0.9, patch_embed_lr_mult=0.2,
        freeze_last_layer_steps=3000,
        idle_patterns=["backbone/patch_embed_3d"]))  # 2D stage: the 3D patch embedding gets no update/decay

    # Stage hand-off (stage 1 starts from scratch; upstream's 1-channel ImageNet backbone is not public, §5).
    c.init = common.init_section()
    common.mesh_and_checkpoint(c)

    if variant == "tiny":
        c.global_batch_size = 8
        c.total_steps = 6
        c.model.update(common.BACKBONES["tiny"])
        c.heads = mlc.ConfigDict(common.HEADS["tiny"])
        c.data.update(dict(global_crop_size=32, local_crop_size=16, n_local_crops=2, num_workers=0,
                           read_threads=1, prefetch_buffer_size=2))
        c.loss.koleo_group_size = 4
        c.schedules.lr = common.schedule(0.0, 1e-3, 1e-3, warmup_steps=2)
        c.schedules.teacher_temperature = common.schedule(0.04, 0.07, 0.07, warmup_steps=3)
        c.optim.freeze_last_layer_steps = 1
        c.ckpt.update(every_steps=3, keep_last=2, async_save=False)
        c.log_every = 1
    elif variant == "demo":
        c.global_batch_size = 16
        c.total_steps = 300
        c.model.update(common.BACKBONES["demo"])
        c.model.drop_path_rate = 0.1
        c.heads = mlc.ConfigDict(common.HEADS["demo"])
        c.data.update(dict(global_crop_size=64, local_crop_size=32, n_local_crops=4, num_workers=0))
        c.loss.koleo_group_size = 16
        c.schedules.lr = common.schedule(0.0, 5e-4, 5e-4, warmup_steps=30)
        c.schedules.momentum = common.constant(0.99)
        c.schedules.teacher_temperature = common.schedule(0.04, 0.07, 0.07, warmup_steps=100)
        c.optim.freeze_last_layer_steps = 20
        c.ckpt.update(every_steps=100, keep_last=2)
        c.log_every = 10
    return c
