"""Stage 1: 2D axial SSL (DINO + iBOT + KoLeo, Sinkhorn-Knopp centring, EMA teacher).

    python -m flexict_jax.train --config=configs/stage1.py[:tiny|:demo] --workdir=DIR --config.data.dir=SLICES

Defaults are the recipe's (`fleximeddinov3_b_ct_pretrain.yaml`, docs/recipe.md §5); `tiny` is for tests (seconds on
CPU), `demo` for the README quickstart (a small ViT that visibly learns in a few minutes on 2 cores).
"""
from __future__ import annotations

import ml_collections as mlc

from configs import common


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    variant = common.parse_arg(arg, variant="base").variant
    if variant not in ("base", "demo", "tiny"):
        raise ValueError(f"configs/stage1.py: unknown variant {variant!r}; use base, demo or tiny")
    # Recipe §5: 100 per GPU x 8 GPUs; "epoch" = 1000 iterations; 1000 epochs planned.
    c = common.ssl_config("stage1", variant, global_batch_size=800, total_steps=1_000_000)
    c.data = mlc.ConfigDict(dict(
        kind="slices2d",
        dir=mlc.config_dict.placeholder(str),  # the slices dir from `python -m data_prep.slices`
        global_crop_size=256, local_crop_size=112, n_global_crops=2, n_local_crops=8,  # docs/recipe.md §5
        global_crop_scale=(0.32, 1.0), local_crop_scale=(0.05, 0.32), crop_ratio=(3 / 4, 4 / 3),
        hflip_prob=0.5, hu_window=(-1000.0, 1000.0), intensity=common.INTENSITY_AUGMENT,
        mask=dict(probability=0.5, ratio=(0.1, 0.5), min_block_patches=4, block_aspect=(0.3, 1 / 0.3),
                  max_block_fraction=0.5),
        num_workers=4, worker_buffer_size=2, read_threads=4, prefetch_buffer_size=8,
        on_corrupt="fail"))  # or "skip": a corrupt record is logged, counted and replaced (docs/operations.md)
    c.schedules = mlc.ConfigDict(dict(
        lr=common.schedule(0.0, 2e-4 * c.get_ref("lr_scale"), 2e-4 * c.get_ref("lr_scale"), warmup_steps=30_000),
        weight_decay=common.constant(0.04),
        momentum=common.constant(0.994),
        teacher_temperature=common.schedule(0.04, 0.07, 0.07, warmup_steps=30_000)))
    c.optim.freeze_last_layer_steps = 3000
    c.optim.idle_patterns = ["backbone/patch_embed_3d"]  # 2D stage: the 3D embedding gets no update/decay
    c.model.drop_path_group_size = 100  # the per-GPU batch (docs/recipe.md §5)

    if variant == "tiny":
        common.cpu_sized(c, "tiny")
        c.global_batch_size = 8
        c.total_steps = 6
        c.data.update(dict(global_crop_size=32, local_crop_size=16, n_local_crops=2))
        c.loss.koleo_group_size = 4
        c.schedules.lr = common.schedule(0.0, 1e-3, 1e-3, warmup_steps=2)
        c.schedules.teacher_temperature = common.schedule(0.04, 0.07, 0.07, warmup_steps=3)
        c.optim.freeze_last_layer_steps = 1
    elif variant == "demo":
        common.cpu_sized(c, "demo")
        c.global_batch_size = 16
        c.total_steps = 300
        c.data.update(dict(global_crop_size=64, local_crop_size=32, n_local_crops=4))
        c.loss.koleo_group_size = 16
        c.schedules.lr = common.schedule(0.0, 1e-3, 1e-3, warmup_steps=30)
        c.schedules.momentum = common.constant(0.99)
        c.log_every = 10
        common.small_scale_learning(c)
    return c
