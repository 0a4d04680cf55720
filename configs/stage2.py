"""Stage 2: 3D anatomical SSL, starting from the stage-1 EMA teacher inflated to 3D.

    python -m flexict_jax.train --config=configs/stage2.py[:tiny|:demo] --workdir=DIR \\
        --config.data.dir=DATASET_DIR --config.init.from=STAGE1_WORKDIR [--config.init.step=N]

DATASET_DIR comes from `python -m data_prep.ingest ... --spacing 2,2,2` (docs/recipe.md §7: 2 mm isotropic). The
hand-off runs once: the first checkpoint of this run holds the inflated weights and resuming never re-inflates
(docs/recipe.md §13 #4). Defaults follow `fleximeddinov3_b_ct_3D_randcrop_pretrain.yaml` (docs/recipe.md §7).
"""
from __future__ import annotations

import ml_collections as mlc

from configs import common


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    variant = common.parse_arg(arg, variant="base").variant
    if variant not in ("base", "demo", "tiny"):
        raise ValueError(f"configs/stage2.py: unknown variant {variant!r}; use base, demo or tiny")
    # Recipe §7: 25 per GPU x 8 GPUs.
    c = common.ssl_config("stage2", variant, global_batch_size=200, total_steps=1_000_000)
    c.data = mlc.ConfigDict(dict(
        kind="volumes3d",
        dir=mlc.config_dict.placeholder(str),  # an ingested dataset (manifest.jsonl + zarr3 volumes) at 2 mm
        global_crop_size=160, local_crop_size=80, n_global_crops=2, n_local_crops=8,
        global_crop_extent=(80, 160),  # voxels per axis, drawn independently per axis (docs/recipe.md §7)
        local_crop_extent=(15, 40),
        pad_to=160, global_crop_mode="random",
        view_region=0,  # 0: crops anywhere in the volume (the recipe); > 0: see demo
        flip_prob=0.5, flip_global_crops=(0,),  # upstream flips only global crop 1 (docs/recipe.md §13 #8): faithful
        hu_window=(-1000.0, 1000.0), intensity_augment=True, intensity=common.INTENSITY_AUGMENT,
        mask=dict(probability=0.5, ratio=(0.1, 0.5), kind="rcc", grid=4, box_fraction=(0.02, 0.05),
                  box_aspect=(0.5, 2.0), exact_count=True),
        num_workers=4, worker_buffer_size=2, read_threads=4, prefetch_buffer_size=4))
    c.loss.dino_weight = 0.5  # docs/recipe.md §3.6 table, stage 2
    c.loss.koleo_group_size = 25
    c.model.drop_path_group_size = 25  # the per-GPU batch (docs/recipe.md §7)
    c.schedules = mlc.ConfigDict(dict(
        lr=common.schedule(0.0, 2e-4 * c.get_ref("lr_scale"), 2e-4 * c.get_ref("lr_scale"), warmup_steps=30_000),
        weight_decay=common.constant(0.04),
        momentum=common.constant(0.994),
        teacher_temperature=common.schedule(0.04, 0.07, 0.07, warmup_steps=30_000)))  # warm-up repeated, §7
    c.optim.freeze_last_layer_steps = 1000
    c.optim.idle_patterns = ["backbone/patch_embed_2d"]  # 3D stage: the 2D embedding gets no update/decay
    c.init.mode = "inflate_2d_to_3d"

    if variant == "tiny":
        common.cpu_sized(c, "tiny")
        c.global_batch_size = 8
        c.total_steps = 6
        c.data.update(dict(global_crop_size=32, local_crop_size=16, n_local_crops=2, global_crop_extent=(16, 32),
                           local_crop_extent=(6, 12), pad_to=32))
        c.loss.koleo_group_size = 4
        c.schedules.lr = common.schedule(0.0, 1e-3, 1e-3, warmup_steps=2)
        c.schedules.teacher_temperature = common.schedule(0.04, 0.07, 0.07, warmup_steps=3)
        c.optim.freeze_last_layer_steps = 1
    elif variant == "demo":
        common.cpu_sized(c, "demo")
        # Stage 1's demo batch, lr and length (docs/evaluation.md "Stage 2 on view regions"): at batch 8 the
        # DINO-local term stays at ln K.
        c.global_batch_size = 16
        c.total_steps = 300
        # Every crop of an example lies in one 48³ region (96 mm), as every stage-1 crop lies in one slice: crops
        # anywhere in a phantom share almost nothing, and the 8 phantoms look alike, so the DINO head collapses
        # and the DINO terms stay above ln K (docs/evaluation.md "Stage 2 on view regions").
        c.data.update(dict(global_crop_size=48, local_crop_size=24, n_local_crops=4, global_crop_extent=(24, 48),
                           local_crop_extent=(12, 24), pad_to=48, view_region=48))
        c.loss.koleo_group_size = 8
        c.schedules.lr = common.schedule(0.0, 1e-3, 1e-3, warmup_steps=20)
        c.schedules.momentum = common.constant(0.99)
        c.log_every = 10
        common.small_scale_learning(c)  # the heads are new (init.mode inflate_2d_to_3d); LayerScale comes from stage 1
    return c
