"""Ruder & Plank (2017) data selection on encoded data.

etjax.algorithms.selection holds the pieces (similarity and diversity features over
term distributions, scores w . phi, top-n, optuna's Bayesian optimization). This
module applies them to encoded datasets (dicts of arrays as from
etjax.data.encode_examples): term counts from token ids, the development metric of a
trial's model, and `ruder_plank`, the search over feature weights. A trial trains a
fresh TL model on the target data plus the selected source examples; that training is
the caller's `train_and_score` (algorithms never import the Trainer):
etjax.train.ruder_plank.search builds it with the one Trainer.

    search = ruder_plank(source, target_train, train_and_score=score, vocab_size=V,
                         num_selected=500, num_trials=20)
    search.selected    # indices of the chosen source examples
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from etjax.algorithms import selection

Arrays = Mapping[str, np.ndarray]
# [PAD], [UNK], [CLS], [SEP], [MASK] of etjax.data.build_wordpiece_tokenizer.
DEFAULT_IGNORE_IDS = (0, 1, 2, 3, 4)


def term_counts(input_ids: np.ndarray, vocab_size: int, *,
                attention_mask: Optional[np.ndarray] = None,
                ignore_ids: Sequence[int] = DEFAULT_IGNORE_IDS) -> np.ndarray:
  """Bag-of-terms counts of each row of token ids.

  Args:
    input_ids: int [N, L].
    vocab_size: V; every id must be in [0, V).
    attention_mask: optional [N, L]; 0 positions are not counted.
    ignore_ids: ids never counted (padding and special tokens).

  Returns:
    float32 [N, V] counts.
  """
  ids = np.asarray(input_ids)
  if ids.ndim != 2:
    raise ValueError(f"term_counts: input_ids must be [N, L], got shape {ids.shape}")
  if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
    raise ValueError(f"term_counts: ids span [{ids.min()}, {ids.max()}], outside the "
                     f"vocabulary [0, {vocab_size})")
  keep = np.ones(ids.shape, bool) if attention_mask is None else (
      np.asarray(attention_mask) != 0)
  keep &= ~np.isin(ids, np.asarray(ignore_ids, ids.dtype))
  rows = np.broadcast_to(np.arange(ids.shape[0])[:, None], ids.shape)
  counts = np.zeros((ids.shape[0], vocab_size), np.float32)
  np.add.at(counts, (rows[keep], ids[keep]), 1.0)
  return counts


METRICS = ("accuracy", "neg_loss")


def check_metric(metric: str) -> None:
  if metric not in METRICS:
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def dev_metric(logits: np.ndarray, labels: np.ndarray, *, metric: str = "accuracy",
               weights: Optional[np.ndarray] = None) -> float:
  """The development metric of a trial's model (higher is better).

  Args:
    logits: [N, C] of the dev rows.
    labels: int [N].
    metric: 'accuracy' or 'neg_loss' (minus the mean cross-entropy).
    weights: optional [N] row weights (default 1).

  Returns:
    The weighted mean of the metric over the rows.
  """
  check_metric(metric)
  logits = np.asarray(logits, np.float64)
  labels = np.asarray(labels)
  weights = (np.ones(len(labels)) if weights is None
             else np.asarray(weights, np.float64))
  if metric == "accuracy":
    return float(np.sum(weights * (logits.argmax(-1) == labels)) / weights.sum())
  shifted = logits - logits.max(-1, keepdims=True)
  logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  return float(np.sum(weights * logp[np.arange(len(labels)), labels]) / weights.sum())


def ruder_plank(source: Arrays, target_train: Arrays, *,
                train_and_score: Callable[[Arrays], float], vocab_size: int,
                num_selected: int, num_trials: int, seed: int = 0,
                smoothing: float = 0.0,
                ignore_ids: Sequence[int] = DEFAULT_IGNORE_IDS,
                sampler=None) -> selection.WeightSearch:
  """Selects `num_selected` source examples by Bayesian-optimized feature weights.

  Each trial proposes weights, takes the top-n source examples by w . phi and scores
  target_train plus those examples with `train_and_score`.

  Args:
    source, target_train: encoded data (same keys).
    train_and_score: encoded training data -> the target dev metric (higher is
      better) of a fresh TL model trained on it; built by the caller, e.g.
      etjax.train.ruder_plank.trial_scorer (the Trainer lives above this layer).
    vocab_size: for the term distributions.
    num_selected: n.
    num_trials: Bayesian-optimization evaluations.
    seed: of the optimizer's TPE sampler.
    smoothing: pseudo-count of the term distributions.
    ignore_ids: token ids left out of the term counts.
    sampler: an optuna sampler instead of seeded TPE.

  Returns:
    selection.WeightSearch(weights, value, selected, study).
  """
  if set(source) != set(target_train):
    raise ValueError(f"source has keys {sorted(source)}, target_train "
                     f"{sorted(target_train)}; they must match to be trained together")
  src_counts = term_counts(source["input_ids"], vocab_size,
                           attention_mask=source.get("attention_mask"),
                           ignore_ids=ignore_ids)
  tgt_counts = term_counts(target_train["input_ids"], vocab_size,
                           attention_mask=target_train.get("attention_mask"),
                           ignore_ids=ignore_ids).sum(0)
  features = np.asarray(selection.selection_features(src_counts, tgt_counts,
                                                     smoothing=smoothing))

  def evaluate(indices: np.ndarray) -> float:
    return train_and_score({k: np.concatenate([np.asarray(target_train[k]),
                                               np.asarray(v)[indices]])
                            for k, v in source.items()})

  return selection.optimize_selection_weights(
      features, evaluate, num_selected=num_selected, num_trials=num_trials, seed=seed,
      sampler=sampler)
