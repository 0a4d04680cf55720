"""Stage-3 evaluation metrics on hand-made embeddings: image->text Recall@K and zero-shot AUC."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from flexict_jax.evals import retrieval


def test_recall_of_matching_embeddings_is_one():
    images = np.random.default_rng(0).normal(size=(300, 16))
    assert retrieval.recall_at_k(images, 3.0 * images) == {"recall@1": 1.0, "recall@5": 1.0, "recall@10": 1.0}


def test_recall_of_random_embeddings_is_k_over_n():
    n, trials = 400, 5
    results = [retrieval.recall_at_k(*np.random.default_rng(seed).normal(size=(2, n, 32))) for seed in range(trials)]
    for k in (1, 5, 10):
        mean = np.mean([r[f"recall@{k}"] for r in results])
        sigma = np.sqrt(k / n * (1 - k / n) / (n * trials))
        assert abs(mean - k / n) < 4 * sigma + 1e-3, (k, mean)


def test_recall_counts_ties_as_a_random_order():
    same = np.ones((50, 4))  # every text ties with every other: expected recall K/N exactly
    assert retrieval.recall_at_k(same, same, ks=(1, 10, 50, 80)) == pytest.approx(
        {"recall@1": 1 / 50, "recall@10": 10 / 50, "recall@50": 1.0, "recall@80": 1.0})
    # Two identical studies with identical reports: each one's report shares rank 1 with the other's.
    pairs = np.eye(4)
    pairs[1] = pairs[0]
    assert retrieval.recall_at_k(pairs, pairs, ks=(1, 2)) == {"recall@1": (0.5 + 0.5 + 1 + 1) / 4, "recall@2": 1.0}


def test_recall_of_a_shifted_pairing_and_chunking():
    rng = np.random.default_rng(1)
    images = rng.normal(size=(100, 64))
    assert retrieval.recall_at_k(images, np.roll(images, 1, axis=0), ks=(1,)) == {"recall@1": 0.0}
    texts = images + rng.normal(scale=1.0, size=images.shape)
    assert retrieval.recall_at_k(images, texts, chunk=7) == retrieval.recall_at_k(images, texts)


@pytest.mark.parametrize("images, texts, message", [
    (np.ones((3, 4)), np.ones((4, 4)), "pair up"),
    (np.ones((3, 4)), np.zeros((3, 4)), "zero vector"),
    (np.full((3, 4), np.nan), np.ones((3, 4)), "NaN"),
    (np.ones(4), np.ones(4), "2-D"),
])
def test_recall_rejects_bad_embeddings(images, texts, message):
    with pytest.raises(ValueError, match=message):
        retrieval.recall_at_k(images, texts)


def _pairwise_auc(scores, labels):
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = [1.0 if p > q else 0.5 if p == q else 0.0 for p, q in itertools.product(pos, neg)]
    return float(np.mean(wins))


def test_roc_auc():
    labels = np.array([0, 0, 1, 1, 0, 1])
    assert retrieval.roc_auc(labels * 2.0 - 1, labels) == 1.0
    assert retrieval.roc_auc(1.0 - labels, labels) == 0.0
    assert retrieval.roc_auc(np.zeros(6), labels) == 0.5
    rng = np.random.default_rng(2)
    scores, labels = rng.integers(0, 5, size=200).astype(float), rng.integers(0, 2, size=200)  # many ties
    assert retrieval.roc_auc(scores, labels) == pytest.approx(_pairwise_auc(scores, labels))
    assert abs(retrieval.roc_auc(rng.normal(size=4000), rng.integers(0, 2, size=4000)) - 0.5) < 0.04
    assert np.isnan(retrieval.roc_auc([0.1, 0.2], [1, 1]))
    with pytest.raises(ValueError, match="0 or 1"):
        retrieval.roc_auc([0.1, 0.2], [1, 2])


def test_zero_shot_prompts_and_probabilities():
    assert retrieval.zero_shot_prompts(["Lung nodule", "Pleural effusion"]) == (
        ["lung nodule.", "pleural effusion."], ["no lung nodule.", "no pleural effusion."])
    rng = np.random.default_rng(3)
    images, positive, negative = rng.normal(size=(5, 8)), rng.normal(size=(3, 8)), rng.normal(size=(3, 8))
    probabilities = retrieval.zero_shot_probabilities(images, positive, negative, scale=14.3)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    logits = 14.3 * np.stack([unit(images) @ unit(positive).T, unit(images) @ unit(negative).T])
    softmax = np.exp(logits) / np.exp(logits).sum(axis=0)
    np.testing.assert_allclose(probabilities, softmax[0], rtol=1e-12)


def test_zero_shot_auc_of_perfect_embeddings_is_one():
    """Finding c has prompt direction e_c and negated prompt -e_c; an image points along +e_c when it has the
    finding and -e_c when not, plus noise that leaves the ordering intact."""
    rng = np.random.default_rng(4)
    findings = ["emphysema", "cardiomegaly", "hiatal hernia"]
    labels = rng.integers(0, 2, size=(60, 3))
    labels[:3, 2] = -1  # unknown: left out
    directions = np.eye(3, 6)
    images = (np.where(labels == 1, 1.0, -1.0) @ directions) + 0.05 * rng.normal(size=(60, 6))
    probabilities = retrieval.zero_shot_probabilities(images, directions, -directions)
    assert np.all((probabilities > 0.5)[labels >= 0] == (labels == 1)[labels >= 0])
    result = retrieval.zero_shot_auc(probabilities, labels, findings)
    assert result == {"zero_shot_auc/emphysema": 1.0, "zero_shot_auc/cardiomegaly": 1.0,
                      "zero_shot_auc/hiatal hernia": 1.0, "zero_shot_auc": 1.0}
    flipped = retrieval.zero_shot_auc(1.0 - probabilities, labels, findings)
    assert flipped["zero_shot_auc"] == 0.0
    one_class = retrieval.zero_shot_auc(probabilities[:, :1], np.ones((60, 1), int), findings[:1])
    assert np.isnan(one_class["zero_shot_auc/emphysema"]) and np.isnan(one_class["zero_shot_auc"])
