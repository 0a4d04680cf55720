"""DINO CLS-token loss: cross-entropy between student crops and teacher crops (docs/recipe.md §3.2, §3.6)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def dino_cross_entropy(student_logits: jax.Array, teacher_probs: jax.Array, student_temperature: float = 0.1,
                       *, ignore_diagonal: bool = False) -> jax.Array:
    """Mean over (student crop, teacher crop, sample) of −Σ_k t·log_softmax(s/τ_s) (docs/recipe.md §3.2).

    Args:
      student_logits: [S, B, K] DINO-head logits of S student crops of B samples.
      teacher_probs: [T, B, K] teacher targets (rows sum to 1, e.g. from `sinkhorn_knopp`).
      student_temperature: τ_s, fixed at 0.1 in every stage (docs/recipe.md §3).
      ignore_diagonal: drop the pairs s == t. The global term compares the 2 student globals with the 2
        teacher globals of the same images, and only the cross-view pairs count (`global_ignore_diagonal`).

    Returns:
      float32 scalar. B may be sharded over the mesh: the mean is over the global batch.
    """
    if student_logits.ndim != 3 or teacher_probs.ndim != 3 or student_logits.shape[1:] != teacher_probs.shape[1:]:
        raise ValueError(f"dino_cross_entropy: expected student [S, B, K] and teacher [T, B, K], got "
                         f"{student_logits.shape} and {teacher_probs.shape}")
    n_student, batch, _ = student_logits.shape
    n_teacher = teacher_probs.shape[0]
    log_probs = jax.nn.log_softmax(student_logits.astype(jnp.float32) / student_temperature, axis=-1)
    # [S, T, B]: contracting K per sample never materialises an [S, T, B, K] tensor.
    cross_entropy = -jnp.einsum("sbk,tbk->stb", log_probs, teacher_probs.astype(jnp.float32))
    if not ignore_diagonal:
        return jnp.mean(cross_entropy)
    n_pairs = n_student * n_teacher - min(n_student, n_teacher)
    if n_pairs == 0:
        raise ValueError(f"dino_cross_entropy: ignore_diagonal leaves no pairs for {n_student} student and "
                         f"{n_teacher} teacher crops")
    off_diagonal = 1.0 - jnp.eye(n_student, n_teacher, dtype=jnp.float32)
    return jnp.sum(cross_entropy * off_diagonal[:, :, None]) / (n_pairs * batch)


def dino_term_weights(n_global: int, n_local: int) -> tuple[float, float]:
    """(scale_local, scale_global): each DINO term weighted by its share of crop pairs (docs/recipe.md §3.6).

    The global term has n_g(n_g−1) off-diagonal pairs and the local term n_g·n_l pairs, so for the 2 global
    and 8 local crops of every stage this is (16/18, 2/18).
    """
    if n_global < 1 or n_local < 0:
        raise ValueError(f"dino_term_weights: need n_global >= 1 and n_local >= 0, got {n_global}, {n_local}")
    global_pairs = n_global * (n_global - 1)
    local_pairs = n_global * n_local
    total = global_pairs + local_pairs
    if total == 0:
        raise ValueError(f"dino_term_weights: {n_global} global and {n_local} local crops give no DINO pairs")
    return local_pairs / total, global_pairs / total
