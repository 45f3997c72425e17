"""Metrics against independent computations: loops, confusion matrices, pairwise AUC."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from etjax.train import metrics


def _pairwise_auc(scores, positive, weights):
  num = den = 0.0
  for i, j in itertools.product(range(len(scores)), repeat=2):
    if positive[i] and not positive[j]:
      w = weights[i] * weights[j]
      den += w
      num += w * (1.0 if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0.0)
  return num / den


def _f1_from_confusion(preds, labels, weights):
  classes = sorted(set(preds) | set(labels))
  f1s = []
  for c in classes:
    tp = sum(w for p, l, w in zip(preds, labels, weights) if p == c and l == c)
    predicted = sum(w for p, w in zip(preds, weights) if p == c)
    actual = sum(w for l, w in zip(labels, weights) if l == c)
    precision = tp / predicted if predicted else 0.0
    recall = tp / actual if actual else 0.0
    f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
  return sum(f1s) / len(f1s)


def test_binary_auc_known_value():
  assert metrics.binary_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
  assert metrics.binary_auc([1, 1, 1], [0, 1, 1]) == pytest.approx(0.5)
  assert np.isnan(metrics.binary_auc([1.0, 2.0], [1, 1]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_auc_with_ties_and_weights_matches_pairwise_count(seed):
  rng = np.random.default_rng(seed)
  scores = rng.integers(0, 6, size=40).astype(float)  # many ties
  positive = rng.random(40) < 0.4
  weights = rng.choice([0.0, 0.5, 1.0, 2.0], size=40)
  expected = _pairwise_auc(scores, positive, weights)
  assert metrics.binary_auc(scores, positive, weights) == pytest.approx(expected, rel=1e-12)


def test_multiclass_metrics_ignore_padding_and_match_loops():
  rng = np.random.default_rng(3)
  n, c = 60, 4
  logits = rng.normal(size=(n, c)).round(1)
  labels = rng.integers(0, c, size=n)
  weights = np.where(rng.random(n) < 0.2, 0.0, 1.0)
  # Padding rows carry garbage that must not count.
  logits[weights == 0] = 100.0
  labels[weights == 0] = 0
  keep = weights > 0
  preds = [int(np.argmax(row)) for row in logits[keep]]
  kept_labels = [int(l) for l in labels[keep]]

  got = metrics.classification_metrics(logits, labels, weights)
  assert got["num_examples"] == int(keep.sum())
  assert got["accuracy"] == pytest.approx(
      sum(p == l for p, l in zip(preds, kept_labels)) / len(preds), rel=1e-12)
  assert got["macro_f1"] == pytest.approx(
      _f1_from_confusion(preds, kept_labels, [1.0] * len(preds)), rel=1e-12)

  probs = np.exp(logits[keep]) / np.exp(logits[keep]).sum(-1, keepdims=True)
  per_class = [_pairwise_auc(probs[:, k], np.asarray(kept_labels) == k, np.ones(len(preds)))
               for k in range(c)]
  assert got["auc"] == pytest.approx(np.mean(per_class), rel=1e-12)


def test_binary_logits_and_sample_weights():
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(30, 2))
  labels = rng.integers(0, 2, size=30)
  weights = rng.choice([0.0, 1.0, 3.0], size=30)
  got = metrics.classification_metrics(logits, labels, weights)
  preds = np.argmax(logits, -1)
  assert got["accuracy"] == pytest.approx(
      np.sum(weights * (preds == labels)) / weights.sum(), rel=1e-12)
  assert got["macro_f1"] == pytest.approx(
      _f1_from_confusion(list(preds), list(labels), list(weights)), rel=1e-12)
  assert got["auc"] == pytest.approx(
      _pairwise_auc(logits[:, 1] - logits[:, 0], labels == 1, weights), rel=1e-12)


def test_shape_mismatch_is_a_clear_error():
  with pytest.raises(ValueError, match="disagree on the number of rows"):
    metrics.accuracy(np.zeros((3, 2)), np.zeros(4, int))
  with pytest.raises(ValueError, match="non-negative"):
    metrics.accuracy(np.zeros((2, 2)), np.zeros(2, int), np.array([1.0, -1.0]))
