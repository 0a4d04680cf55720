"""Axial rotary position embedding (RoPE) for 2-D and 3-D patch grids (docs/recipe.md §2.2, docs/torch_format.md §2.3).

Layout, as upstream: per-axis coordinates in (-1, 1) at patch centres ("separate" normalisation), angles
2π·c/period flattened axis-major to head_dim/2 values and tiled twice, rotate-half (NeoX) pairing of channel
j with j + head_dim/2. Only patch tokens are rotated; the prefix (CLS + storage) tokens pass through.

`bf16=True` reproduces the upstream bf16 RoPE op by op: every step of the table is rounded to bfloat16, and q
and k (all tokens) are rounded to bfloat16 before a bf16 rotation. Released checkpoints need it for ~1e-5
parity (docs/torch_format.md §0); fp32 is the sensible choice for new training (docs/recipe.md §13 item 13). The rounding is
`reduce_precision` on float32 values rather than bfloat16 arithmetic, because XLA:GPU may keep excess
precision inside fused bf16 chains (docs/torch_format.md §2.3); float32 ops followed by a rounding are exactly what
torch's CPU bf16 kernels do.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np


def round_bf16(x: jax.Array) -> jax.Array:
    """Rounds float32 values to the nearest bfloat16 (ties to even), keeping the float32 dtype."""
    return jax.lax.reduce_precision(x, exponent_bits=8, mantissa_bits=7)


def _rounding(bf16: bool):
    return round_bf16 if bf16 else (lambda x: x)


def check_head_dim(head_dim: int) -> None:
    """2-D RoPE needs head_dim % 4 == 0 and 3-D RoPE head_dim % 6 == 0; the backbone carries both."""
    if head_dim % 12:
        raise ValueError(
            f"head_dim = dim / num_heads = {head_dim} must be divisible by 12: 2-D RoPE uses head_dim/4 "
            f"frequencies per axis and 3-D RoPE head_dim/6 (upstream asserts dim % (6*num_heads) == 0)")


def rope_periods(head_dim: int, num_axes: int, base: float = 100.0, bf16: bool = False) -> np.ndarray:
    """Periods base^(2j / (head_dim/2)) for j < head_dim / (2·num_axes), as float32.

    The denominator is head_dim/2 for 2-D and 3-D alike, so the 3-D periods are the first ones of the 2-D
    list (docs/recipe.md §2.2). With `bf16`, every op is rounded to bfloat16 as torch does, which is not the same as
    rounding the exact values (docs/torch_format.md §1.3).
    """
    check_head_dim(head_dim)
    j = np.arange(head_dim // (2 * num_axes))
    if not bf16:
        return (float(base) ** (2.0 * j / (head_dim // 2))).astype(np.float32)
    bf = ml_dtypes.bfloat16
    exponent = (2.0 * j.astype(np.float32) / np.float32(head_dim // 2)).astype(bf).astype(np.float32)
    return (np.float32(base) ** exponent).astype(bf).astype(np.float32)


def periods_tolerance(base: float) -> float:
    """Largest |ln(period) − ln(exact period)| accepted for explicit periods. The bf16 chain may round the
    exponent 2j/(head_dim/2) differently by one ulp (≤ 2^-8) on another device, which scales the period by up to
    base^(2^-8), and rounds the result by ≤ 2^-8 more; twice that admits device differences (released files were
    made on CUDA, docs/torch_format.md §1.3; this CPU's bf16 periods sit ≤ 0.016 from exact) and still refuses a wrong
    base or head_dim."""
    return 2 * 2.0 ** -8 * (math.log(base) + 1)


def check_periods(periods: Sequence[float] | np.ndarray, head_dim: int, num_axes: int, base: float, *,
                  what: str) -> tuple[float, ...]:
    """Explicit periods (a checkpoint's own RoPE buffers) as a tuple of floats, after checking that they are
    plausible RoPE periods for this head_dim and base; the ValueError names `what` and the reason."""
    check_head_dim(head_dim)
    values = np.asarray(periods, dtype=np.float64)
    count = head_dim // (2 * num_axes)
    if values.shape != (count,):
        raise ValueError(f"{what}: {values.shape[0] if values.ndim == 1 else values.shape} values, but {num_axes}-D "
                         f"RoPE with head_dim {head_dim} has {count} periods")
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"{what}: periods must be finite and positive, got {values.tolist()}")
    if np.any(np.diff(values) <= 0):
        raise ValueError(f"{what}: periods must increase strictly (base^(2j/(head_dim/2))), got {values.tolist()}")
    exact = float(base) ** (2.0 * np.arange(count) / (head_dim // 2))
    error = np.abs(np.log(values) - np.log(exact))
    worst = int(np.argmax(error))
    if error[worst] > periods_tolerance(base):
        raise ValueError(f"{what}: period {worst} = {values[worst]} is far from base^(2j/(head_dim/2)) = "
                         f"{exact[worst]:.6g} (base {base}, head_dim {head_dim}); more than bf16 rounding can explain")
    return tuple(values.tolist())


def model_periods(head_dim: int, num_axes: int, base: float, *, bf16: bool,
                  explicit: Sequence[float] | None = None) -> tuple[float, ...]:
    """The periods a model uses: `explicit` ones (checked) when given, else `rope_periods` of base and head_dim."""
    if explicit is not None:
        return check_periods(explicit, head_dim, num_axes, base, what=f"rope_periods_{num_axes}d")
    return tuple(rope_periods(head_dim, num_axes, base, bf16=bf16).tolist())


def rope_sincos(grid: Sequence[int], periods: Sequence[float] | np.ndarray, *, rescale: jax.Array | None = None,
                bf16: bool = False) -> tuple[jax.Array, jax.Array]:
    """(sin, cos) tables, each [prod(grid), 2·len(grid)·len(periods)], rows in row-major grid order.

    grid: patch counts per axis, (H, W) or (D, H, W).
    rescale: optional scalar multiplying all coordinates (the training-time rescale augmentation).
    """
    maybe_round = _rounding(bf16)
    axes = []
    for n in grid:
        # (i + 0.5) is exact in bf16 up to 128 patches per axis, the range docs/torch_format.md §2.3 covers.
        centres = jnp.arange(n, dtype=jnp.float32) + 0.5
        axes.append(maybe_round(centres / n))
    coords = jnp.stack(jnp.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(grid))
    coords = maybe_round(2.0 * coords - 1.0)
    if rescale is not None:
        coords = maybe_round(coords * rescale)
    angles = maybe_round(jnp.float32(2 * math.pi) * coords[:, :, None])
    angles = maybe_round(angles / jnp.asarray(periods, jnp.float32))
    angles = jnp.tile(angles.reshape(angles.shape[0], -1), 2)
    return maybe_round(jnp.sin(angles)), maybe_round(jnp.cos(angles))


def sample_rescale(key: jax.Array, max_factor: float, bf16: bool = False) -> jax.Array:
    """One log-uniform scalar s = exp(U(-ln r, ln r)) (docs/recipe.md §2.2: one per forward, shared by all blocks)."""
    maybe_round = _rounding(bf16)
    log_max = math.log(max_factor)
    u = maybe_round(jax.random.uniform(key, (), jnp.float32, -log_max, log_max))
    return maybe_round(jnp.exp(u))


def _rotate_half(x: jax.Array) -> jax.Array:
    first, second = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-second, first], axis=-1)


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array, *, bf16: bool = False) -> jax.Array:
    """Rotates the last sin.shape[0] tokens of x [B, T, heads, head_dim]; earlier (prefix) tokens pass.

    With `bf16`, the whole of x is rounded first: upstream casts q and k to bf16 including the prefix rows.
    The rotation runs in the tables' float32 and the result comes back in x's dtype, as upstream's `rope_apply`
    casts bf16 q/k to the RoPE dtype and back.
    """
    maybe_round = _rounding(bf16)
    dtype = x.dtype
    x = maybe_round(x.astype(jnp.promote_types(dtype, sin.dtype)))
    prefix = x.shape[1] - sin.shape[0]
    if prefix < 0:
        raise ValueError(f"RoPE tables cover {sin.shape[0]} tokens, but the sequence has only {x.shape[1]}")
    # Identity rows (sin 0, cos 1) for the prefix keep the rotation one elementwise op over all tokens.
    sin = jnp.pad(sin, ((prefix, 0), (0, 0)))[:, None, :]
    cos = jnp.pad(cos, ((prefix, 0), (0, 0)), constant_values=1.0)[:, None, :]
    return maybe_round(maybe_round(x * cos) + maybe_round(_rotate_half(x) * sin)).astype(dtype)
