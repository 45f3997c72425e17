"""The step contract: every way of training is a `TrainStep`, a pair of pure functions.

    TrainStep.init(rng, example_batch) -> TrainState
    TrainStep.update(state, batch)     -> (state, metrics)

as optax does for optimizers. `TrainState` is a pytree of named, typed fields. Parameters
keep their logical-axis metadata (`flax.linen.LogicallyPartitioned` boxes, as produced by
`nn.with_logical_partitioning`) inside the state, so the trainer can derive shardings
from `jax.eval_shape(step.init, ...)` alone; Linen's `apply` unboxes them by itself, and
`unbox` below gives plain arrays where an algorithm needs them.

Algorithms that need more state (a frozen teacher, a selector policy, a domain
discriminator, meta-learner statistics) subclass `TrainState` with more fields:

    @flax.struct.dataclass
    class DistillState(TrainState):
      teacher_params: Any

The trainer never looks inside beyond `step`; it jits `update` once at the edge.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

Batch = Mapping[str, jax.Array]
Metrics = Mapping[str, jax.Array]
PyTree = Any
GradFn = Callable[[Any, Batch, jax.Array], tuple[PyTree, Metrics]]
ApplyFn = Callable[[Any, PyTree, jax.Array], tuple[Any, Metrics]]


@flax.struct.dataclass
class TrainState:
  """What one training run carries from step to step.

  Attributes:
    step: int32 [] number of updates applied so far.
    params: trainable parameters (a pytree, logical-axis boxes kept).
    opt_state: the optax state of `params`.
    rng: a PRNG key [2] (uint32) split once per step for dropout and sampling.
  """
  step: jax.Array
  params: PyTree
  opt_state: PyTree
  rng: jax.Array


class TrainStep(NamedTuple):
  """A training method as two pure functions, plus how it predicts.

  Attributes:
    init: (rng, example_batch) -> TrainState. Builds parameters from the shapes of
      `example_batch`; must be traceable under `jax.eval_shape`.
    update: (state, batch) -> (state, metrics). One optimizer step; `metrics` is a
      flat dict of scalars (at least 'loss').
    predict: (state, batch) -> dict of arrays, at least 'logits' [batch, classes] for
      classifiers. Used by evaluation and `etjax predict`; None when the step cannot
      predict on its own.
    grad, apply: the two halves of `update` for a step made by `gradient_step`
      (None otherwise): grad(state, batch, rng) -> (grads like state.params, scalar
      metrics) and apply(state, grads, rng) -> (state, more metrics). Gradient
      accumulation and low-precision gradient communication transform `grad` and
      keep `apply`.
  """
  init: Callable[[jax.Array, Batch], TrainState]
  update: Callable[[TrainState, Batch], tuple[TrainState, Metrics]]
  predict: Optional[Callable[[TrainState, Batch], dict]] = None
  grad: Optional[GradFn] = None
  apply: Optional[ApplyFn] = None


def unbox(tree: PyTree) -> PyTree:
  """Returns `tree` with logical-partitioning boxes replaced by their values."""
  return nn.meta.unbox(tree)


def next_rng(state: TrainState) -> tuple[jax.Array, jax.Array]:
  """Splits the state's key: returns (key for this step, key to store back)."""
  new_rng, step_rng = jax.random.split(state.rng)
  return step_rng, new_rng


def apply_gradients(state: TrainState, grads: PyTree, tx, *, rng: jax.Array,
                    **changes) -> TrainState:
  """Applies `tx` to `grads` and returns the advanced state.

  Args:
    state: the current state.
    grads: gradients with the structure of `state.params` (boxes kept).
    tx: the optax GradientTransformation that made `state.opt_state`.
    rng: the key to store for the next step.
    **changes: other fields to replace (for subclasses).
  """
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = _apply_updates(state.params, updates)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                       rng=rng, **changes)


def _apply_updates(params: PyTree, updates: PyTree) -> PyTree:
  # optax.apply_updates maps over leaves; boxes are pytree nodes, so the metadata
  # survives. Cast back so a bf16 update never widens or narrows a parameter.
  return jax.tree.map(lambda p, u: (p + u).astype(jnp.asarray(p).dtype), params, updates)


def gradient_step(init: Callable[[jax.Array, Batch], TrainState], grad: GradFn,
                  apply: ApplyFn, predict: Optional[Callable] = None) -> TrainStep:
  """The TrainStep whose update is `apply(state, grad(state, batch, rng))`.

  The rng is split once per step (`next_rng`): `grad` gets the step's key, `apply`
  the one to store. Metrics: those of `grad`, 'grad_norm' (of the gradients `apply`
  receives, i.e. after any accumulation or all-reduce), and those of `apply`.
  """
  def update(state, batch):
    step_rng, rng = next_rng(state)
    grads, metrics = grad(state, batch, step_rng)
    state, applied = apply(state, grads, rng)
    return state, {**metrics, "grad_norm": optax.tree.norm(grads), **applied}

  return TrainStep(init=init, update=update, predict=predict, grad=grad, apply=apply)


def batch_weight(batch: Batch) -> jax.Array:
  """The total weight a weighted-mean loss divides by: sum of batch['weight'], or the
  number of examples (leading dimension of the first leaf) without one. float32 []
  (float64 under x64)."""
  if "weight" in batch:
    return jnp.sum(jnp.asarray(batch["weight"], jnp.result_type(float)))
  first = jax.tree.leaves(batch)[0]
  return jnp.asarray(first.shape[0], jnp.result_type(float))
