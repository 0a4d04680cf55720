"""Stage 1.1: high-resolution 2D continuation with Gram anchoring (docs/recipe.md §6, `fleximeddinov3_b_ct_highres.yaml`).

    python -m flexict_jax.train --config=configs/stage1_hires.py[:tiny] --workdir=DIR --config.data.dir=SLICES \\
        --config.init.from=STAGE1_WORKDIR --config.gram.from_workdir=STAGE1_WORKDIR [--config.gram.step=N]

No code edit is needed (upstream must un-comment its multi-resolution loader, docs/recipe.md §13 #3): each step draws
one of the 5 resolution triples × 2 patch sizes from a step-seeded RNG, and batch t is built at step t's shapes.
"""
from __future__ import annotations

import ml_collections as mlc

from configs import common, stage1


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    variant = common.parse_arg(arg, variant="base").variant
    if variant not in ("base", "demo", "tiny"):
        raise ValueError(f"configs/stage1_hires.py: unknown variant {variant!r}; use base, demo or tiny")
    c = stage1.get_config(variant)
    c.stage = "stage1_hires"
    c.global_batch_size = 400  # 50 per GPU x 8 (docs/recipe.md §6)
    if variant == "base":  # tiny/demo keep their stage-1 groups
        c.model.drop_path_group_size = 50
    c.total_steps = 100_000
    c.data.kind = "slices2d_hires"
    # (global, local, Gram-teacher) crop sizes and their mixture probabilities (docs/recipe.md §6 table); each is split
    # 1/2-1/2 over patch 16 and 8. Local 168 is not a multiple of 16: the last 8 pixels are dropped, as upstream.
    c.data.resolutions = ((384, 112, 512), (512, 112, 768), (512, 144, 768), (512, 168, 768), (512, 224, 768))
    c.data.resolution_probs = (0.3, 0.3, 0.3, 0.05, 0.05)
    c.data.hflip_prob = 0.0  # horizontal flips off in stage 1.1
    c.loss.dino_local_weight = 0.5  # `reweight_dino_local_loss`
    c.loss.koleo_group_size = None  # distributed KoLeo over the global batch
    c.loss.gram_weight = 1.5
    # LR: a half-cosine ramp 0 → 5e-5·scale over 10k steps, then constant (docs/recipe.md §6).
    c.schedules.lr = common.schedule(0.0, 0.0, 5e-5 * c.get_ref("lr_scale"), warmup_steps=0, cosine_steps=10_000)
    c.schedules.teacher_temperature = common.constant(0.07)
    c.schedules.momentum = common.constant(0.999)
    c.optim.freeze_last_layer_steps = 0
    c.init.mode = "continue"  # backbone + heads of the stage-1 teacher; the EMA teacher starts as a copy
    if variant == "tiny":
        c.global_batch_size = 8
        c.total_steps = 6
        c.data.resolutions = ((32, 16, 48), (32, 16, 64))
        c.data.resolution_probs = (0.5, 0.5)
        c.schedules.lr = common.schedule(0.0, 0.0, 1e-3, warmup_steps=0, cosine_steps=3)
    elif variant == "demo":  # the stage-1 demo model at 2 resolutions, Gram crops 1.5x the global crops
        c.global_batch_size = 16
        c.total_steps = 100
        c.data.resolutions = ((64, 32, 96), (96, 32, 128))
        c.data.resolution_probs = (0.5, 0.5)
        c.loss.koleo_group_size = None
        c.schedules.lr = common.schedule(0.0, 0.0, 3e-4, warmup_steps=0, cosine_steps=30)
    return c
