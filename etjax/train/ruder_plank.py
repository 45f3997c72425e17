"""Ruder & Plank's data selection with each trial trained by the one Trainer.

etjax.algorithms.ruder_plank holds the algorithm (term features, the Bayesian search
over their weights); this module supplies its trials: a fresh state of the TL model's
TrainStep trained with `fit_arrays` on the target data plus the selected source
examples, scored on the target dev data.

    search = ruder_plank.search(source, target_train, target_dev,
                                step=finetune(model, tx), vocab_size=V,
                                num_selected=500, num_trials=20, train_steps=200,
                                batch_size=32)
    search.selected    # indices of the chosen source examples

gin/algorithms/ruder_plank.gin holds the method's defaults (`search`'s arguments).
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import numpy as np

from etjax.algorithms import ruder_plank as rp
from etjax.algorithms import selection
from etjax.algorithms.step import TrainStep
from etjax.train import fit as fit_lib

Arrays = Mapping[str, np.ndarray]


def trial_scorer(step: TrainStep, dev: Arrays, *, train_steps: int, batch_size: int,
                 seed: int = 0, metric: str = "accuracy"
                 ) -> Callable[[Arrays], float]:
  """train data -> dev metric of a fresh state of `step` trained on it.

  Args:
    step: the TL model's TrainStep (plain batches, e.g. finetune or fully_shared); a
      pure function, so every trial reuses its compilation.
    dev: encoded development data (its 'weight' column, if any, weighs the rows).
    train_steps, batch_size: each trial's training (batch_size <= its rows).
    seed: initialization and shuffling seed, the same for every trial.
    metric: 'accuracy' or 'neg_loss' (see etjax.algorithms.ruder_plank.dev_metric).
  """
  rp.check_metric(metric)
  dev = {k: np.asarray(v) for k, v in dev.items()}
  # One compilation of predict for all trials (each trial's Trainer would compile
  # its own); the dev set is small, one batch.
  predict = jax.jit(step.predict)

  def train_and_score(train: Arrays) -> float:
    _, result = fit_lib.fit_arrays(step, train, num_steps=train_steps,
                                   batch_size=batch_size, seed=seed)
    return rp.dev_metric(predict(result.state, dev)["logits"], dev["labels"],
                         metric=metric, weights=dev.get("weight"))

  return train_and_score


def search(source: Arrays, target_train: Arrays, target_dev: Arrays, *,
           step: TrainStep, vocab_size: int, num_selected: int, num_trials: int,
           train_steps: int, batch_size: int, seed: int = 0,
           metric: str = "accuracy", **search_kwargs) -> selection.WeightSearch:
  """Ruder & Plank: `num_selected` source examples by Bayesian-optimized weights.

  Args:
    source, target_train, target_dev: encoded data (source and target_train with the
      same keys).
    step, train_steps, batch_size, seed, metric: each trial's training and dev metric
      (`trial_scorer`); seed also seeds the search's sampler.
    vocab_size, num_selected, num_trials: as etjax.algorithms.ruder_plank.ruder_plank.
    **search_kwargs: its other arguments (smoothing, ignore_ids, sampler).

  Returns:
    selection.WeightSearch(weights, value, selected, study).
  """
  score = trial_scorer(step, target_dev, train_steps=train_steps,
                       batch_size=batch_size, seed=seed, metric=metric)
  return rp.ruder_plank(source, target_train, train_and_score=score,
                        vocab_size=vocab_size, num_selected=num_selected,
                        num_trials=num_trials, seed=seed, **search_kwargs)
