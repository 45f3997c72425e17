"""Classification metrics in numpy: accuracy, macro-F1, AUC.

All take logits [N, C] (or scores [N] for a binary AUC), integer labels [N] and optional
weights [N]; rows with weight 0 are padding and ignored, other weights count as sample
weights.
"""

from __future__ import annotations

from typing import Optional

import numpy as np


def _prepare(logits, labels, weights):
  logits = np.asarray(logits, np.float64)
  labels = np.asarray(labels).astype(np.int64).reshape(-1)
  weights = (np.ones(labels.shape, np.float64) if weights is None
             else np.asarray(weights, np.float64).reshape(-1))
  if logits.shape[0] != labels.shape[0] or weights.shape[0] != labels.shape[0]:
    raise ValueError(f"metrics: logits {logits.shape}, labels {labels.shape} and weights "
                     f"{weights.shape} disagree on the number of rows")
  if np.any(weights < 0):
    raise ValueError("metrics: weights must be non-negative")
  keep = weights > 0
  return logits[keep], labels[keep], weights[keep]


def _predictions(logits: np.ndarray) -> np.ndarray:
  if logits.ndim == 1:
    return (logits > 0).astype(np.int64)
  return np.argmax(logits, axis=-1)


def accuracy(logits, labels, weights=None) -> float:
  """Weighted fraction of rows whose argmax equals the label (nan with no rows).

  `logits` [N, C]; [N] is read as binary scores (positive means class 1).
  """
  logits, labels, weights = _prepare(logits, labels, weights)
  if weights.sum() == 0:
    return float("nan")
  return float(np.sum(weights * (_predictions(logits) == labels)) / weights.sum())


def macro_f1(logits, labels, weights=None) -> float:
  """Unweighted mean over classes of the per-class F1 (weighted counts).

  Classes are those present among the labels or the predictions (as scikit-learn's
  `f1_score(average='macro')`); a class with no true positives has F1 0.
  """
  logits, labels, weights = _prepare(logits, labels, weights)
  preds = _predictions(logits)
  classes = np.union1d(labels, preds)
  if classes.size == 0:
    return float("nan")
  f1s = []
  for c in classes:
    tp = np.sum(weights * ((preds == c) & (labels == c)))
    fp = np.sum(weights * ((preds == c) & (labels != c)))
    fn = np.sum(weights * ((preds != c) & (labels == c)))
    f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
  return float(np.mean(f1s))


def binary_auc(scores, positive, weights=None) -> float:
  """Area under the ROC curve: the weighted probability that a positive row scores
  above a negative one, ties counting one half. O(N log N) by ranks.

  Args:
    scores: [N] higher means more positive.
    positive: [N] bool (or 0/1).
    weights: [N] optional non-negative sample weights.

  Returns:
    The AUC, or nan when there are no positives or no negatives.
  """
  scores = np.asarray(scores, np.float64).reshape(-1)
  positive = np.asarray(positive).astype(bool).reshape(-1)
  weights = (np.ones(scores.shape) if weights is None
             else np.asarray(weights, np.float64).reshape(-1))
  w_pos, w_neg = weights * positive, weights * ~positive
  total_pos, total_neg = w_pos.sum(), w_neg.sum()
  if total_pos == 0 or total_neg == 0:
    return float("nan")
  order = np.argsort(scores, kind="stable")
  s, wp, wn = scores[order], w_pos[order], w_neg[order]
  # Group equal scores: a positive beats every negative in earlier groups and ties
  # with the negatives of its own group.
  starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
  group_pos = np.add.reduceat(wp, starts)
  group_neg = np.add.reduceat(wn, starts)
  neg_below = np.cumsum(group_neg) - group_neg
  wins = np.sum(group_pos * (neg_below + 0.5 * group_neg))
  return float(wins / (total_pos * total_neg))


def _softmax(logits: np.ndarray) -> np.ndarray:
  z = logits - logits.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def auc(logits, labels, weights=None) -> float:
  """ROC AUC. Binary (logits [N] scores or [N, 2]): the AUC of class 1. Multi-class
  ([N, C], C > 2): one-vs-rest on softmax probabilities, averaged over the classes
  that have both positive and negative rows. nan where undefined."""
  logits, labels, weights = _prepare(logits, labels, weights)
  if logits.ndim == 1:
    return binary_auc(logits, labels == 1, weights)
  if logits.shape[-1] == 2:
    return binary_auc(logits[:, 1] - logits[:, 0], labels == 1, weights)
  probs = _softmax(logits)
  per_class = [binary_auc(probs[:, c], labels == c, weights)
               for c in range(logits.shape[-1])]
  defined = [a for a in per_class if not np.isnan(a)]
  return float(np.mean(defined)) if defined else float("nan")


def classification_metrics(logits, labels, weights: Optional[np.ndarray] = None
                           ) -> dict[str, float]:
  """{'accuracy', 'macro_f1', 'auc', 'num_examples'} of collected predictions."""
  _, kept_labels, _ = _prepare(logits, labels, weights)
  return {"accuracy": accuracy(logits, labels, weights),
          "macro_f1": macro_f1(logits, labels, weights),
          "auc": auc(logits, labels, weights),
          "num_examples": int(kept_labels.size)}
