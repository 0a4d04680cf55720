"""Frozen-feature probes (numpy): weighted kNN, L2-regularised softmax regression, their metrics and splits.

- kNN as DINO's `eval_knn.py` (Caron et al. 2021): features L2-normalised, cosine similarity to every training
  feature, the k nearest vote for their class with weight exp(similarity / T) (k = 20, T = 0.07 there).
- Linear probe: multinomial logistic regression on standardised features, mean cross-entropy + (λ/2)·|W|²
  (bias not decayed), minimised with L-BFGS to convergence, so the result is deterministic.
- Metrics over the classes of the evaluation: balanced accuracy (the mean per-class recall; its chance level is
  1 / #classes whatever the class frequencies), macro-F1 and the per-class recall.
- Splits never put one subject on both sides: by subject when there are two or more, else (one subject) by
  alternating slabs along z, which the caller reports.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import optimize

KNN_K = 20
KNN_TEMPERATURE = 0.07
LINEAR_L2 = 1e-3


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, n_classes: int, *, k: int = KNN_K,
                temperature: float = KNN_TEMPERATURE, chunk: int = 2048) -> np.ndarray:
    """Predicted class per test row: temperature-weighted votes of the k most cosine-similar training rows."""
    train, test = _unit_rows(train_x), _unit_rows(test_x)
    train_y = np.asarray(train_y, np.int64)
    k = min(k, len(train))
    predictions = np.empty(len(test), np.int64)
    for start in range(0, len(test), chunk):  # bounded memory: chunk x N_train similarities at a time
        sims = test[start:start + chunk] @ train.T
        nearest = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        weights = np.exp(np.take_along_axis(sims, nearest, axis=1) / temperature)
        votes = np.zeros((len(sims), n_classes))
        np.add.at(votes, (np.repeat(np.arange(len(sims)), k), train_y[nearest].ravel()), weights.ravel())
        predictions[start:start + chunk] = votes.argmax(axis=1)
    return predictions


def linear_probe_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, n_classes: int, *,
                         l2: float = LINEAR_L2, max_iterations: int = 500) -> np.ndarray:
    """Predicted class per test row of an L2-regularised softmax regression fitted on the training rows."""
    train_x = np.asarray(train_x, np.float64)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6  # standardised: one λ suits any feature scale
    x = (train_x - mean) / std
    y = np.asarray(train_y, np.int64)
    n, dim = x.shape
    onehot = np.zeros((n, n_classes))
    onehot[np.arange(n), y] = 1.0

    def loss_and_grad(flat: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = flat[:dim * n_classes].reshape(dim, n_classes), flat[dim * n_classes:]
        logits = x @ w + b
        logits -= logits.max(axis=1, keepdims=True)
        log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        loss = -(onehot * log_p).sum() / n + 0.5 * l2 * (w ** 2).sum()
        residual = (np.exp(log_p) - onehot) / n
        return loss, np.concatenate([(x.T @ residual + l2 * w).ravel(), residual.sum(0)])

    result = optimize.minimize(loss_and_grad, np.zeros(dim * n_classes + n_classes), jac=True, method="L-BFGS-B",
                               options={"maxiter": max_iterations})
    w, b = result.x[:dim * n_classes].reshape(dim, n_classes), result.x[dim * n_classes:]
    return ((np.asarray(test_x, np.float64) - mean) / std @ w + b).argmax(axis=1)


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, class_names: Mapping[int, str]
                           ) -> dict[str, Any]:
    """balanced_accuracy, macro_f1, accuracy and per_class recall over the classes of `class_names` (those the
    evaluation scores: every one must occur in y_true)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    recalls, f1s = {}, []
    for c, name in class_names.items():
        true, predicted = y_true == c, y_pred == c
        hits = int((true & predicted).sum())
        if not true.any():
            raise ValueError(f"class {c} ({name}) has no evaluation example")
        recall = hits / int(true.sum())
        precision = hits / int(predicted.sum()) if predicted.any() else 0.0
        recalls[name] = recall
        f1s.append(2 * precision * recall / (precision + recall) if hits else 0.0)
    return {"balanced_accuracy": float(np.mean(list(recalls.values()))), "macro_f1": float(np.mean(f1s)),
            "accuracy": float(np.mean(y_true == y_pred)), "per_class": {k: float(v) for k, v in recalls.items()}}


def chance_level(n_classes: int) -> float:
    """Balanced accuracy of a predictor that ignores its input (any constant or random guess): 1 / #classes."""
    return 1.0 / n_classes


def subject_split(subjects: Sequence[str], *, test_fraction: float = 0.5, seed: int = 0
                  ) -> tuple[list[str], list[str]]:
    """(train subjects, test subjects): a seeded draw of round(test_fraction · n) subjects, at least one on each
    side. Needs two or more distinct subjects."""
    unique = sorted(set(subjects))
    if len(unique) < 2:
        raise ValueError(f"a subject split needs at least 2 subjects, got {unique}")
    n_test = min(max(1, round(test_fraction * len(unique))), len(unique) - 1)
    order = np.random.default_rng(seed).permutation(len(unique))
    test = sorted(unique[i] for i in order[:n_test])
    return [s for s in unique if s not in test], test


def slab_split(z_mm: np.ndarray, slab_mm: float) -> np.ndarray:
    """True where a token is a test token: alternating slabs of `slab_mm` along z (even slabs train, odd test),
    for a dataset of one subject, where a subject split is impossible."""
    z = np.asarray(z_mm, np.float64)
    return ((z - z.min()) // slab_mm).astype(np.int64) % 2 == 1


def scorable_classes(train_y: np.ndarray, test_y: np.ndarray, *, min_train: int = 1) -> list[int]:
    """Classes a probe can be scored on: at least `min_train` training examples and one test example."""
    train_counts = np.bincount(np.asarray(train_y, np.int64))
    present = np.unique(test_y)
    return [int(c) for c in present if c < len(train_counts) and train_counts[c] >= min_train]


def run_probes(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
               class_names: Mapping[int, str], *, probes: Sequence[str] = ("knn", "linear"), k: int = KNN_K,
               temperature: float = KNN_TEMPERATURE, l2: float = LINEAR_L2) -> dict[str, Any]:
    """{"knn": metrics, "linear": metrics, "chance", "n_train", "n_test", "classes", "dropped_classes"} on the
    classes both sides have (the others are counted, not scored); labels are remapped to 0..C-1 for the probes."""
    train_y, test_y = np.asarray(train_y, np.int64), np.asarray(test_y, np.int64)
    classes = scorable_classes(train_y, test_y)
    if len(classes) < 2:
        raise ValueError(f"only {len(classes)} class(es) occur on both sides of the split: nothing to probe "
                         f"(train has {sorted(set(train_y.tolist()))[:20]}, test {sorted(set(test_y.tolist()))[:20]})")
    dropped = sorted((set(np.unique(train_y).tolist()) | set(np.unique(test_y).tolist())) - set(classes))
    remap = np.full(max(train_y.max(), test_y.max()) + 1, -1, np.int64)
    remap[classes] = np.arange(len(classes))
    keep_train, keep_test = remap[train_y] >= 0, remap[test_y] >= 0
    tx, ty, ex, ey = train_x[keep_train], remap[train_y[keep_train]], test_x[keep_test], remap[test_y[keep_test]]
    names = {i: class_names.get(c, str(c)) for i, c in enumerate(classes)}
    result: dict[str, Any] = {"chance": chance_level(len(classes)), "n_train": int(len(ty)), "n_test": int(len(ey)),
                              "classes": [names[i] for i in range(len(classes))],
                              "dropped_classes": [class_names.get(c, str(c)) for c in dropped]}
    if "knn" in probes:
        result["knn"] = classification_metrics(
            ey, knn_predict(tx, ty, ex, len(classes), k=k, temperature=temperature), names)
    if "linear" in probes:
        result["linear"] = classification_metrics(ey, linear_probe_predict(tx, ty, ex, len(classes), l2=l2), names)
    return result
