"""Recipes: a training method as a sequence of stages, each a TrainStep.

E.g. MetaFT's meta-learner then fine-tuning on the target, TinyBERT's general then task
distillation, MetaKD's meta-teacher then student, AdaBERT's search then retraining.
Stage k + 1 starts from stage k's parameters (`carry_params`: every parameter of the
new state whose path and shape the old one has; the rest, e.g. a new head, stays
fresh). `etjax.train.recipe.run_recipe` runs the stages with the one Trainer, each in
its own sub-workdir, so a run stopped in any stage resumes in that stage.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, NamedTuple, Optional

import flax.linen as nn
import jax
import numpy as np

from etjax.algorithms.step import TrainState, TrainStep


class Stage(NamedTuple):
  """One stage of a recipe.

  Attributes:
    name: its sub-workdir under the recipe's workdir (a plain file name).
    step: the TrainStep it trains.
    num_steps: its number of updates.
    train_data: () -> a fresh train iterator (with get_state/set_state for exact
      resumption), called once per run of the stage.
    eval_data: evaluation batches for the Trainer, or None.
    carry: (previous stage's final state, this stage's fresh state) -> the state this
      stage starts from; default `carry_params`.
  """
  name: str
  step: TrainStep
  num_steps: int
  train_data: Callable[[], Iterable]
  eval_data: Any = None
  carry: Optional[Callable[[TrainState, TrainState], TrainState]] = None


def _is_box(x) -> bool:
  return isinstance(x, nn.meta.AxisMetadata)


def _leaves_by_path(tree) -> dict:
  flat = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(tree))[0]
  return {jax.tree_util.keystr(path): leaf for path, leaf in flat}


def carry_params(previous: TrainState, fresh: TrainState) -> TrainState:
  """`fresh` with each parameter that `previous` has at the same path and shape taken
  from `previous` (cast to the fresh dtype); optimizer state, step and rng stay fresh.

  Raises:
    ValueError: when no parameter carries over (the stages share nothing).
  """
  old = _leaves_by_path(previous.params)
  carried = []

  def take(path, leaf):
    value = leaf.unbox() if _is_box(leaf) else leaf
    source = old.get(jax.tree_util.keystr(path))
    if source is None or np.shape(source) != np.shape(value):
      return leaf
    carried.append(path)
    # A copy: the next stage's updates donate their state, which must not delete the
    # previous stage's final parameters.
    array = jax.numpy.array(source, value.dtype, copy=True)
    return leaf.replace_boxed(array) if _is_box(leaf) else array
  params = jax.tree_util.tree_map_with_path(take, fresh.params, is_leaf=_is_box)
  if not carried:
    raise ValueError("carry_params: no parameter of the previous stage has a path and "
                     "shape of this stage's parameters")
  return fresh.replace(params=params)
