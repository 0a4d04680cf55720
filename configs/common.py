"""Pieces shared by the stage configs: argument parsing, model sizes, mesh rules, schedules."""
from __future__ import annotations

import ml_collections as mlc

# Model sizes: the FlexiCT backbone is 864 wide, 16 deep, 12 heads (docs/recipe.md §2.1); `small`/`large` exist in
# upstream code but no checkpoint uses them. `tiny` and `demo` are CPU-sized (dim % (6*heads) == 0 keeps 3D
# RoPE possible, docs/recipe.md §2.1).
BACKBONES = {
    "base": dict(dim=864, depth=16, num_heads=12),
    "small": dict(dim=432, depth=12, num_heads=6),
    "large": dict(dim=1152, depth=24, num_heads=16),
    "demo": dict(dim=96, depth=4, num_heads=4),
    "tiny": dict(dim=48, depth=2, num_heads=2),
}
HEADS = {  # docs/recipe.md §2.4: 2048 -> 256 -> 65,536, last layer trunc-normal(0.02)
    "base": dict(hidden_dim=2048, bottleneck_dim=256, num_prototypes=65536, last_layer_init_std=0.02),
    "demo": dict(hidden_dim=256, bottleneck_dim=64, num_prototypes=1024, last_layer_init_std=0.02),
    "tiny": dict(hidden_dim=64, bottleneck_dim=32, num_prototypes=128, last_layer_init_std=0.02),
}

# Logical axis -> mesh axes (maxtext style). Default = pure FSDP within a slice (docs/jax_notes.md §C4): the batch is
# split over every data-like axis, the large weight dimension over "fsdp", and "tensor" carries optional
# tensor parallelism (size 1 unless the mesh says otherwise).
SHARDING_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("qkv", "tensor"),
    ("heads", "tensor"),
    ("head_mlp", "tensor"),
    ("head_mlp2", "fsdp"),
    ("bottleneck", None),
    ("proto", "fsdp"),
    ("vocab", "tensor"),
    ("norm", None),
    ("length", None),
    ("act_embed", None),
)


INTENSITY_AUGMENT = dict(  # MONAI transforms applied once per slice/volume before cropping (docs/recipe.md §5, §7)
    noise_prob=0.1, noise_std=0.1, smooth_prob=0.2, smooth_sigma=(0.5, 1.0), scale_prob=0.15, scale_factor=0.25,
    lowres_prob=0.25, lowres_zoom=(0.5, 1.0), contrast_prob=0.1, contrast_gamma=(0.7, 1.5))


def ssl_config(stage: str, variant: str, *, global_batch_size: int, total_steps: int) -> mlc.ConfigDict:
    """The sections every DINO-style stage shares (docs/recipe.md §2–§4); stage files fill in data, schedules, init."""
    from flexict_jax.optim import lr_scale_sqrt_1024
    c = mlc.ConfigDict()
    c.stage = stage
    c.task = "dino"  # flexict_jax.tasks: "dino" (stages 1, 1.1, 2) or "align" (stage 3)
    c.variant = variant
    c.seed = 0
    c.global_batch_size = mlc.FieldReference(global_batch_size)
    c.total_steps = total_steps
    c.model = mlc.ConfigDict(dict(
        **BACKBONES["base"], mlp_ratio=4.0, num_storage_tokens=4, in_chans=1, base_patch_size=8,
        layerscale_init=1e-5, drop_path_rate=0.2,  # docs/recipe.md §2.1: same rate in every block
        rope_base=100.0, rope_rescale=2.0,  # docs/recipe.md §2.2: training-time coordinate rescale in [1/2, 2]
        rope_bf16=False,  # fp32 RoPE for new training (docs/recipe.md §13 #13); True emulates upstream
        # Explicit RoPE periods (a released file's own bf16 buffers, docs/torch_format.md §1.3); None = computed from
        # rope_base and head_dim. A run started from (or resuming) a checkpoint that has them takes them.
        rope_periods_2d=None, rope_periods_3d=None,
        remat_policy="none",  # flexict_jax.models.vit.REMAT_POLICIES: none / full / dots / dots_no_batch
        scan_blocks=True,  # one compiled block for all 16 (ViT-B stage-1 step compile 60 s -> 26 s on CPU)
        drop_path_group_size=None,  # stages set upstream's per-GPU batch (docs/recipe.md §2.1: subset per GPU batch)
        # Recipe §4: upstream computes in bf16 on float32 master weights (docs/scaling.md "Mixed precision").
        # The recipe variants are for accelerators; tiny/demo set float32 (XLA:CPU has no fast bf16 matmul).
        compute_dtype="bfloat16",
        # flexict_jax.models.attention: auto (cuDNN on GPU in bf16, splash on TPU, else XLA) / xla / cudnn / splash
        attention_impl="auto"))
    c.heads = mlc.ConfigDict(HEADS["base"])
    # Recipe §2.3: one patch size per step, 16 or 8 with probability 1/2, drawn from a step-seeded RNG.
    c.patch_sizes = (16, 8)
    c.patch_size_probs = (0.5, 0.5)
    c.loss = mlc.ConfigDict(dict(
        dino_weight=1.0, dino_local_weight=1.0, ibot_weight=1.0,
        koleo_weight=0.1,  # applied x n_global_crops, as upstream (docs/recipe.md §3.6): effective 0.2
        koleo_group_size=100,  # upstream KoLeo runs per GPU batch (docs/recipe.md §3.4); fixed groups keep the loss
        # independent of the device count; None = the whole global batch
        gram_weight=0.0,  # > 0 enables Gram anchoring against `gram` below (docs/recipe.md §3.5)
        student_temperature=0.1, sinkhorn_iterations=3))
    # The frozen Gram teacher: the EMA teacher of an earlier run (docs/recipe.md §6), loaded once and then kept in this
    # run's checkpoints.
    c.gram = mlc.ConfigDict(dict(from_workdir=mlc.config_dict.placeholder(str),
                                 step=mlc.config_dict.placeholder(int)))
    # Recipe §4: lr = base * 4 * sqrt(global_batch / 1024) (`sqrt_wrt_1024`), peak and end alike; a reference,
    # so --config.global_batch_size=... rescales it.
    c.lr_scale = lr_scale_sqrt_1024(c.get_ref("global_batch_size"))
    c.optim = mlc.ConfigDict(dict(
        clip_grad=3.0, unclipped=[], betas=(0.9, 0.999), eps=1e-8, layer_decay=0.9, patch_embed_lr_mult=0.2,
        freeze_last_layer_steps=3000, idle_patterns=[]))
    c.init = init_section()
    # The demo's monitor embeds 4 slices per volume: 8 phantoms x 4 slices of 256 tokens are already ~10 demo
    # training steps of compute (32k tokens at 16 slices per volume made each evaluation take 45-80 s on 2 cores).
    c.eval = organ_monitor_section(c, every_steps=100 if variant == "demo" else 0,
                                   max_slices=4 if variant == "demo" else 16)
    mesh_and_checkpoint(c)
    return c


def organ_monitor_section(c: mlc.ConfigDict, every_steps: int, max_slices: int = 16) -> mlc.ConfigDict:
    """Stages 1-2's in-training organ kNN monitor (flexict_jax.evals.monitor): every `every_steps` steps (0 = off)
    the EMA teacher's patch tokens of a labelled dataset are classified by a kNN across subjects, logged as
    eval/knn_balanced_accuracy."""
    return mlc.ConfigDict(dict(
        every_steps=every_steps,
        dataset=mlc.config_dict.placeholder(str),  # ingested, with label maps; None = the training data's own
        classes=mlc.config_dict.placeholder(str),  # CSV "index,name" of the label values (None: labels.json)
        patch_size=16, batch_size=c.get_ref("global_batch_size"),  # global; a multiple of the device count
        max_slices=max_slices,  # 2-D: labelled axial slices per volume (evenly spaced)
        crop=64,  # 3-D: cube size the volumes are tiled into
        knn_k=20, knn_temperature=0.07))  # DINO's kNN eval


def cpu_sized(c: mlc.ConfigDict, variant: str) -> None:
    """Shrinks the model for the `tiny` (tests, seconds) and `demo` (quickstart, minutes) variants."""
    c.model.update(BACKBONES[variant])
    c.heads = mlc.ConfigDict(HEADS[variant])
    c.data.update(dict(num_workers=0, read_threads=1, prefetch_buffer_size=2))
    c.model.drop_path_group_size = 4 if variant == "tiny" else 8  # divides the tiny/demo batches of every stage
    c.model.compute_dtype = "float32"
    if variant == "tiny":
        c.ckpt.update(every_steps=3, keep_last=2, async_save=False)
        c.log_every = 1
    else:
        c.model.drop_path_rate = 0.1
        c.ckpt.update(every_steps=100, keep_last=2)


def small_scale_learning(c: mlc.ConfigDict) -> None:
    """Settings under which the DINO term leaves its uniform value ln K within minutes on a CPU (issue 16;
    measurements and reasons in docs/evaluation.md, "Small-scale settings that learn"). Call after the variant's
    schedules are set. The recipe's values are inert at this scale:

    - LayerScale 1e-5 gives every crop almost the same CLS token (mean pairwise cosine 0.995 even at 0.1), so
      the teacher's logits differ across crops by 1e-7 against a temperature of 0.04: Sinkhorn-Knopp returns uniform
      targets. LayerScale 1 gives a spread of about the temperature at init.
    - Trained from step 20, the last layer turns away from the bottleneck features and the head collapses to one
      output (bottleneck cosine 0.999): uniform targets and a uniform student, a fixed point at ln K. Frozen
      random prototypes of norm 1 (DINOv2's weight-normalised scale) make a uniform output impossible, so only a
      student that predicts its teacher lowers the loss.
    - A constant teacher temperature of 0.03 keeps the targets sharper than the student (0.1) from the start.
    """
    c.model.layerscale_init = 1.0
    c.heads.last_layer_init_std = c.heads.bottleneck_dim ** -0.5
    c.optim.freeze_last_layer_steps = 2**31 - 1  # never: the step counter is int32
    c.schedules.teacher_temperature = constant(0.03)


def parse_arg(arg: str | None, **defaults) -> mlc.ConfigDict:
    """big_vision-style `--config=file.py:variant,key=value` argument.

    The first bare word is the variant (e.g. `tiny`); `key=value` pairs override defaults of the same type.
    """
    out = mlc.ConfigDict(dict(defaults))
    for i, part in enumerate(p for p in (arg or "").split(",") if p):
        if "=" not in part:
            if i:
                raise ValueError(f"config argument {arg!r}: only the first item may be a bare variant name")
            out.variant = part
            continue
        key, value = part.split("=", 1)
        if key not in out:
            raise ValueError(f"config argument {arg!r}: unknown key {key!r}; known: {sorted(out.keys())}")
        default = out[key]
        out[key] = value.lower() in ("1", "true", "yes") if isinstance(default, bool) else type(default)(value)
    return out


def schedule(start: float, peak: float, end: float, warmup_steps: int, cosine_steps: int | None = None):
    """One `linear_warmup_cosine_decay` section (docs/recipe.md §4); values may be ml_collections FieldReferences."""
    return mlc.ConfigDict(dict(start=start, peak=peak, end=end, warmup_steps=warmup_steps,
                               cosine_steps=cosine_steps))


def constant(value: float) -> mlc.ConfigDict:
    return schedule(value, value, value, 0)


def init_section(mode: str = "none") -> mlc.ConfigDict:
    """Where a run starts when its workdir has no checkpoint yet: `--config.init.from=PREVIOUS_WORKDIR`
    [`--config.init.step=N`] takes that run's EMA teacher (docs/recipe.md §1: every stage hands its teacher on).
    `mode`: "continue" (backbone + heads), "inflate_2d_to_3d" (stage 2: inflate the patch embedding, new heads,
    docs/recipe.md §7), "backbone" (backbone only, new heads), "vlm" (stage 3 from an imported FlexiCT-3D-VLM or another
    stage-3 run: backbone, vision projection, text tower and logit scale, and the DINO/iBOT heads when the source
    has them, else new ones). `keep_heads`: "backbone" and "inflate_2d_to_3d" keep the source's heads instead
    (for small-scale experiments, docs/evaluation.md "Stage 2: settings tried"; no config sets it, and the
    recipe re-initialises them)."""
    # Stored as `from_workdir`: ml_collections cannot address a key named `from` on the command line, so
    # flexict_jax.train rewrites `--config.init.from=` to it.
    return mlc.ConfigDict(dict(from_workdir=mlc.config_dict.placeholder(str), step=mlc.config_dict.placeholder(int),
                               mode=mode, keep_heads=False))


def mesh_and_checkpoint(config: mlc.ConfigDict) -> None:
    config.mesh = (1, -1, 1)  # (data, fsdp, tensor); -1 takes the remaining devices
    config.sharding_rules = SHARDING_RULES
    config.ckpt = mlc.ConfigDict(dict(every_steps=1000, keep_last=3, keep_every=0, async_save=True))
    config.log_every = 10
    # Weights & Biases next to metrics.jsonl and TensorBoard: set a project to turn it on (needs `pip install
    # wandb`); mode "offline" writes WORKDIR/wandb/ without network (`wandb sync` uploads it later).
    config.wandb = mlc.ConfigDict(dict(project="", entity="", mode="online"))
    # NaN/inf loss: skip that update; stop (keeping the last good checkpoint) after this many in a row
    # (upstream aborts after more than two, docs/recipe.md §4).
    config.max_consecutive_nonfinite = 3
