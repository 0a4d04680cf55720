"""Stage-3 evaluation on embeddings (numpy): image->text Recall@K and zero-shot AUC (docs/recipe.md §11.6).

Embeddings are compared by cosine similarity (rows are L2-normalised here), as the CLIP head does.

- Report retrieval: image i's report is text i; Recall@K is the fraction of images whose report ranks among
  the K texts most similar to the image, over the whole evaluation set. Exact ties (identical reports, e.g.
  two normal studies with the same wording) are broken uniformly at random *in expectation*: an image whose
  report ties with t other texts below g strictly better ones counts (K - g) / (t + 1), clipped to [0, 1].
  So identical texts neither inflate nor deflate the score, and the result is deterministic.
- Zero-shot classification: each finding gets the prompt pair "{finding}." / "No {finding}.", lower-cased like
  the training captions; an image's probability of the finding is the softmax over the pair of the scaled
  similarities, sigmoid(scale * (v·t⁺ - v·t⁻)), and the AUC is computed per finding from those scores.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats

from flexict_jax.data.report_rules import model_text

RECALL_KS = (1, 5, 10)


def _unit_rows(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D [N, D] array of embeddings, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{what}: embeddings contain NaN or inf")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError(f"{what}: row {int(np.flatnonzero(norms[:, 0] == 0)[0])} is a zero vector")
    return x / norms


def recall_at_k(image_embeddings: np.ndarray, text_embeddings: np.ndarray, ks: Sequence[int] = RECALL_KS,
                chunk: int = 1024) -> dict[str, float]:
    """{"recall@K": ...} of image->text retrieval where image i matches text i (see the module docstring)."""
    images, texts = _unit_rows(image_embeddings, "image embeddings"), _unit_rows(text_embeddings, "text embeddings")
    if images.shape != texts.shape:
        raise ValueError(f"image embeddings {images.shape} and text embeddings {texts.shape} must pair up row by row")
    n = len(images)
    ks = [int(k) for k in ks]
    if any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive, got {ks}")
    hits = np.zeros(len(ks))
    for start in range(0, n, chunk):  # bounded memory: chunk x N similarities at a time
        scores = images[start:start + chunk] @ texts.T
        rows = np.arange(len(scores))
        own = scores[rows, start + rows][:, None]
        better = (scores > own).sum(axis=1)
        ties = (scores == own).sum(axis=1) - 1
        for j, k in enumerate(ks):
            hits[j] += np.clip((k - better) / (ties + 1), 0.0, 1.0).sum()
    return {f"recall@{k}": float(h / n) for k, h in zip(ks, hits)}


def zero_shot_prompts(findings: Sequence[str]) -> tuple[list[str], list[str]]:
    """The prompt pair per finding: "{finding}." and "No {finding}.", as the text tower sees them (docs/recipe.md §11.6)."""
    return [model_text(f"{f}.") for f in findings], [model_text(f"No {f}.") for f in findings]


def zero_shot_probabilities(image_embeddings: np.ndarray, positive_text_embeddings: np.ndarray,
                            negative_text_embeddings: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """[N, C] probability of each finding per image: softmax over (prompt, negated prompt) of
    `scale` x cosine similarity, `scale` being the model's e^logit_scale."""
    images = _unit_rows(image_embeddings, "image embeddings")
    positive = _unit_rows(positive_text_embeddings, "positive prompt embeddings")
    negative = _unit_rows(negative_text_embeddings, "negative prompt embeddings")
    if positive.shape != negative.shape or positive.shape[1] != images.shape[1]:
        raise ValueError(f"prompt embeddings {positive.shape} / {negative.shape} do not match images {images.shape}")
    margin = scale * (images @ positive.T - images @ negative.T)
    return 1.0 / (1.0 + np.exp(-margin))


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); NaN when a class is absent."""
    scores, labels = np.asarray(scores, np.float64).ravel(), np.asarray(labels).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} differ in size")
    positive = labels == 1
    n_pos, n_neg = int(positive.sum()), int((labels == 0).sum())
    if n_pos + n_neg != labels.size:
        raise ValueError("labels must be 0 or 1")
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = stats.rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def zero_shot_auc(probabilities: np.ndarray, labels: np.ndarray, findings: Sequence[str]) -> Mapping[str, float]:
    """{"zero_shot_auc/<finding>": AUC, ..., "zero_shot_auc": mean over findings with both classes}.

    `labels` [N, C] holds 1 (present), 0 (absent) or -1 (unknown, left out of that finding's AUC).
    """
    probabilities, labels = np.asarray(probabilities), np.asarray(labels)
    if probabilities.shape != labels.shape or probabilities.shape[1] != len(findings):
        raise ValueError(f"probabilities {probabilities.shape}, labels {labels.shape} and {len(findings)} findings "
                         f"do not match")
    result = {}
    for c, finding in enumerate(findings):
        known = labels[:, c] >= 0
        result[f"zero_shot_auc/{finding}"] = roc_auc(probabilities[known, c], labels[known, c])
    defined = [v for v in result.values() if not np.isnan(v)]
    result["zero_shot_auc"] = float(np.mean(defined)) if defined else float("nan")
    return result
