"""Pieces shared by the stage configs: argument parsing, model sizes, mesh rules, schedules."""
from __future__ import annotations

import ml_collections as mlc

# Model sizes: the FlexiCT backbone is 864 wide, 16 deep, 12 heads (recipe §2.1); `small`/`large` exist in
# upstream code but no checkpoint uses them. `tiny` and `demo` are CPU-sized (dim % (6*heads) == 0 keeps 3D
# RoPE possible, recipe §2.1).
BACKBONES = {
    "base": dict(dim=864, depth=16, num_heads=12),
    "small": dict(dim=432, depth=12, num_heads=6),
    "large": dict(dim=1152, depth=24, num_heads=16),
    "demo": dict(dim=96, depth=4, num_heads=4),
    "tiny": dict(dim=48, depth=2, num_heads=2),
}
HEADS = {  # recipe §2.4: 2048 -> 256 -> 65,536
    "base": dict(hidden_dim=2048, bottleneck_dim=256, num_prototypes=65536),
    "demo": dict(hidden_dim=256, bottleneck_dim=64, num_prototypes=1024),
    "tiny": dict(hidden_dim=64, bottleneck_dim=32, num_prototypes=128),
}

# Logical axis -> mesh axes (maxtext style). Default = pure FSDP within a slice (jax_stack.md §C4): the batch is
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
    ("norm", None),
    ("length", None),
    ("act_embed", None),
)


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
    """One `linear_warmup_cosine_decay` section (recipe §4); values may be ml_collections FieldReferences."""
    return mlc.ConfigDict(dict(start=start, peak=peak, end=end, warmup_steps=warmup_steps,
                               cosine_steps=cosine_steps))


def constant(value: float) -> mlc.ConfigDict:
    return schedule(value, value, value, 0)


def init_section(mode: str = "none") -> mlc.ConfigDict:
    """Where a run starts when its workdir has no checkpoint yet: `--config.init.from=PREVIOUS_WORKDIR`
    [`--config.init.step=N`] takes that run's EMA teacher (recipe §1: every stage hands its teacher on).
    `mode`: "continue" (backbone + heads), "inflate_2d_to_3d" (stage 2: inflate the patch embedding, new heads,
    recipe §7), "backbone" (backbone only, new heads)."""
    section = mlc.ConfigDict(dict(step=mlc.config_dict.placeholder(int), mode=mode))
    section["from"] = mlc.config_dict.placeholder(str)
    return section


def mesh_and_checkpoint(config: mlc.ConfigDict) -> None:
    config.mesh = (1, -1, 1)  # (data, fsdp, tensor); -1 takes the remaining devices
    config.sharding_rules = SHARDING_RULES
    config.ckpt = mlc.ConfigDict(dict(every_steps=1000, keep_last=3, keep_every=0, async_save=True))
    config.log_every = 10
    # NaN/inf loss: skip that update; stop (keeping the last good checkpoint) after this many in a row
    # (upstream aborts after more than two, recipe §4).
    config.max_consecutive_nonfinite = 3
