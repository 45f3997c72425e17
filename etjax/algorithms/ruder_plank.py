"""Ruder & Plank (2017) data selection on encoded data, end to end.

etjax.algorithms.selection holds the pieces (similarity and diversity features over
term distributions, scores w . phi, top-n, optuna's Bayesian optimization). This
module applies them to encoded datasets (dicts of arrays as from
etjax.data.encode_examples): term counts from token ids, an `evaluate` that trains a
fresh TL model on the target data plus the selected source examples and returns the
target development metric, and `ruder_plank` tying them together.

    search = ruder_plank(source, target_train, target_dev, step=finetune(model, tx),
                         vocab_size=V, num_selected=500, num_trials=20,
                         train_steps=200, batch_size=32)
    search.selected    # indices of the chosen source examples
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import jax
import numpy as np

from etjax.algorithms import selection
from etjax.algorithms.step import TrainStep

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


def _batches(data: Arrays, size: int, rng: np.random.Generator):
  n = len(data["labels"])
  while True:
    order = rng.permutation(n)
    for start in range(0, n - size + 1, size):
      yield {k: np.asarray(v)[order[start:start + size]] for k, v in data.items()}


def train_and_evaluate(step: TrainStep, train: Arrays, dev: Arrays, *, steps: int,
                       batch_size: int, seed: int = 0, metric: str = "accuracy") -> float:
  """Trains a fresh state of `step` on `train` and scores it on `dev`.

  Args:
    step: the TrainStep (single-part batches, e.g. finetune or fully_shared).
    train: encoded training data (batch_size <= its rows).
    dev: encoded development data.
    steps: optimizer steps.
    batch_size: rows per step.
    seed: initialization and shuffling seed.
    metric: 'accuracy' or 'neg_loss' (minus the mean cross-entropy).

  Returns:
    The dev metric (float; higher is better).
  """
  if metric not in ("accuracy", "neg_loss"):
    raise ValueError(f"metric must be 'accuracy' or 'neg_loss', got {metric!r}")
  n = len(train["labels"])
  if not 0 < batch_size <= n:
    raise ValueError(f"batch_size must be in 1..{n} (the training rows), got "
                     f"{batch_size}")
  batches = _batches(train, batch_size, np.random.default_rng(seed))
  state = step.init(jax.random.PRNGKey(seed), next(batches))
  # One compile per call: this is the outer loop of a selection algorithm.
  update, predict = jax.jit(step.update), jax.jit(step.predict)
  for _ in range(steps):
    state, _ = update(state, next(batches))
  logits = np.asarray(predict(state, {k: np.asarray(v) for k, v in dev.items()})
                      ["logits"], np.float64)
  labels = np.asarray(dev["labels"])
  weights = np.asarray(dev.get("weight", np.ones(len(labels))), np.float64)
  if metric == "accuracy":
    return float(np.sum(weights * (logits.argmax(-1) == labels)) / weights.sum())
  shifted = logits - logits.max(-1, keepdims=True)
  logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  return float(np.sum(weights * logp[np.arange(len(labels)), labels]) / weights.sum())


def ruder_plank(source: Arrays, target_train: Arrays, target_dev: Arrays, *,
                step: TrainStep, vocab_size: int, num_selected: int,
                num_trials: int, train_steps: int, batch_size: int, seed: int = 0,
                metric: str = "accuracy", smoothing: float = 0.0,
                ignore_ids: Sequence[int] = DEFAULT_IGNORE_IDS,
                sampler=None) -> selection.WeightSearch:
  """Selects `num_selected` source examples by Bayesian-optimized feature weights.

  Each trial proposes weights, takes the top-n source examples by w . phi, trains a
  fresh state of `step` on target_train plus those examples and scores it on
  target_dev.

  Args:
    source, target_train, target_dev: encoded data (same keys and lengths).
    step: the TL model's TrainStep (pure, so every trial reuses it and its compile).
    vocab_size: for the term distributions.
    num_selected: n.
    num_trials: Bayesian-optimization evaluations.
    train_steps, batch_size: training of each trial's model.
    seed: of the optimizer's sampler and of each trial's training.
    metric: dev metric to maximize ('accuracy' or 'neg_loss').
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
    train = {k: np.concatenate([np.asarray(target_train[k]), np.asarray(v)[indices]])
             for k, v in source.items()}
    return train_and_evaluate(step, train, target_dev, steps=train_steps,
                              batch_size=batch_size, seed=seed, metric=metric)

  return selection.optimize_selection_weights(
      features, evaluate, num_selected=num_selected, num_trials=num_trials, seed=seed,
      sampler=sampler)
