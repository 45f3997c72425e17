"""Gradient accumulation: one optimizer step from M microbatches run one after another.

Memory for activations scales with the microbatch, not the batch. `accumulate_gradients`
wraps a gradient function so that it splits the batch (strided, see
etjax.models.microbatch), runs `lax.scan` over the microbatches summing gradients and
scalar values in float32, and returns their means; per-example outputs (value leaves
with a leading microbatch dimension, e.g. logits) are put back together in the batch's
own order. For a loss that is a mean over examples this equals the full-batch gradient;
a loss weighted per example (e.g. by `batch['weight']`) is reproduced exactly when it
normalises by a constant rather than by each microbatch's total weight.

`accumulate_step` does this for any TrainStep made by `gradient_step`, and exactly for
etjax's weighted-mean losses (sum of w_i * l_i over the batch divided by the sum of
w_i): each microbatch's gradient and metrics are scaled by its total weight W_m before
summing and the sums divided by the batch's W = sum W_m, so the result is the
full batch's sum_m grad(S_m) / W rather than a mean of per-microbatch means. The
`Trainer` applies it with `grad_accum_steps`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from etjax.algorithms.step import TrainStep, batch_weight, gradient_step
from etjax.models.microbatch import (check_divisible, merge_microbatches,
                                     split_microbatches)
from etjax.sharding import grad_comm

GradFn = Callable[..., tuple[Any, Any]]


def _is_none(x) -> bool:
  return x is None


def _wider(accum_dtype, dtype):
  return jnp.promote_types(accum_dtype, dtype)


def _zeros(shape, dtype):
  """Zeros for a scan carry of `shape` (a ShapeDtypeStruct). Inside a shard_map the
  sums are varying over the axes the microbatch's values vary over, and a scan carry
  must keep its type, so the zeros are cast to varying over the same axes."""
  zeros = jnp.zeros(shape.shape, dtype)
  varying = getattr(getattr(shape, "manual_axis_type", None), "varying", None)
  return jax.lax.pcast(zeros, tuple(sorted(varying)), to="varying") if varying else zeros


def accumulate_gradients(grad_fn: GradFn, num_microbatches: int, *,
                         accum_dtype: Any = jnp.float32) -> GradFn:
  """Returns grad_fn accumulated over `num_microbatches` microbatches.

  Args:
    grad_fn: (params, batch, rng) -> (value, grads), e.g. made with
      `jax.value_and_grad(loss_fn, has_aux=True)`; `value` is any pytree of arrays
      (a loss, or (loss, aux)), `grads` has the structure of `params` (logical boxes
      kept).
    num_microbatches: M; every batch leaf's leading dimension must divide by M.
    accum_dtype: the least dtype of the running sums (float32 so that bf16 gradients
      do not lose precision while summing; wider dtypes such as float64 are kept);
      results are cast back to grad_fn's dtypes.

  Returns:
    accumulated(params, batch, rng=None) -> (value, grads). grads are the mean over
    microbatches; so are the scalar leaves of value, while value leaves of rank >= 1
    (per-example outputs [B/M, ...] of one microbatch) come back as [B, ...] in the
    batch's example order. With an rng, microbatch i receives
    `jax.random.fold_in(rng, i)` so dropout masks differ between microbatches; without
    one, grad_fn is called as grad_fn(params, microbatch, None).
  """
  if num_microbatches < 1:
    raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")

  def accumulated(params, batch, rng: Optional[jax.Array] = None):
    if num_microbatches == 1:
      return grad_fn(params, batch, rng)
    for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]:
      check_divisible(leaf.shape[0], num_microbatches,
                      what=f"batch{jax.tree_util.keystr(path)}")
    micro = split_microbatches(batch, num_microbatches)
    first = jax.tree.map(lambda x: x[0], micro)
    value_shapes, grad_shapes = jax.eval_shape(grad_fn, params, first, rng)
    is_scalar = jax.tree.map(lambda s: s.ndim == 0, value_shapes)

    def summed(tree):  # scalars (and gradients) are summed, the rest collected
      return jax.tree.map(
          lambda s: _zeros(s, _wider(accum_dtype, s.dtype)) if s.ndim == 0 else None,
          tree)

    def body(sums, inputs):
      index, microbatch = inputs
      step_rng = None if rng is None else jax.random.fold_in(rng, index)
      value, grads = grad_fn(params, microbatch, step_rng)
      value_sums, grad_sums = sums
      value_sums = jax.tree.map(
          lambda s, v, scalar: s + v.astype(s.dtype) if scalar else None,
          value_sums, value, is_scalar, is_leaf=_is_none)
      grad_sums = jax.tree.map(lambda s, g: s + g.astype(s.dtype), grad_sums, grads)
      per_example = jax.tree.map(lambda v, scalar: None if scalar else v, value, is_scalar)
      return (value_sums, grad_sums), per_example

    zeros = (summed(value_shapes),
             jax.tree.map(lambda s: _zeros(s, _wider(accum_dtype, s.dtype)),
                          grad_shapes))
    (value_sums, grad_sums), per_example = jax.lax.scan(
        body, zeros, (jnp.arange(num_microbatches), micro))

    def mean(total, shape):
      return (total / num_microbatches).astype(shape.dtype)
    grads = jax.tree.map(mean, grad_sums, grad_shapes)
    value = jax.tree.map(
        lambda s, p, shape, scalar: mean(s, shape) if scalar else merge_microbatches(p),
        value_sums, per_example, value_shapes, is_scalar, is_leaf=_is_none)
    return value, grads

  return accumulated


def _scaled(tree, factor):
  return jax.tree.map(lambda x: (x * factor).astype(x.dtype), tree)


def _weighted(grad, weight_fn):
  """grad(state, batch, rng) -> ({'weight': W, 'metrics': W * metrics}, W * grads)."""
  def fn(state, batch, rng):
    grads, metrics = grad(state, batch, rng)
    weight = weight_fn(batch)
    return {"weight": weight, "metrics": _scaled(metrics, weight)}, _scaled(grads, weight)
  return fn


def _normalised(value, grads):
  """Divides weight-scaled sums (or means) by the (mean) total weight; 0 for none."""
  total = value["weight"]
  inverse = jnp.where(total > 0, 1.0 / jnp.where(total > 0, total, 1.0), 0.0)
  return _scaled(grads, inverse), _scaled(value["metrics"], inverse)


def _require_grad(step: TrainStep, what: str) -> None:
  if step.grad is None or step.apply is None:
    raise ValueError(f"{what} needs a TrainStep made by etjax.algorithms.step."
                     "gradient_step (with grad and apply); this one has only update")


def accumulate_step(step: TrainStep, num_microbatches: int, *,
                    weight_fn: Callable = batch_weight) -> TrainStep:
  """`step` with each update's gradient accumulated over `num_microbatches`.

  Exact for weighted-mean losses (see the module docstring): the gradient and metrics
  equal the unaccumulated step's on the whole batch, up to summation order. Dropout
  masks differ (microbatch i gets its rng folded with i).

  Args:
    step: a TrainStep made by `gradient_step`.
    num_microbatches: M; every batch leaf's leading dimension must divide by M.
    weight_fn: batch -> the total weight its loss divides by (default: sum of
      batch['weight'], else the number of examples).
  """
  if num_microbatches == 1:
    return step
  _require_grad(step, "gradient accumulation")
  accumulated = accumulate_gradients(_weighted(step.grad, weight_fn), num_microbatches)

  def grad(state, batch, rng):
    return _normalised(*accumulated(state, batch, rng))

  return gradient_step(step.init, grad, step.apply, step.predict)


def communicate_step(step: TrainStep, mesh, comm_dtype, *,
                     weight_fn: Callable = batch_weight) -> TrainStep:
  """`step` with its gradient all-reduced over the mesh's batch axes in `comm_dtype`
  (etjax.sharding.grad_comm). Each device's gradient and metrics are weighted by its
  shard's total weight, so weighted-mean losses come out as on the whole batch."""
  _require_grad(step, "gradient communication in a chosen dtype")
  reduced = grad_comm.data_parallel_state_grad(_weighted(step.grad, weight_fn), mesh,
                                               comm_dtype=comm_dtype)

  def grad(state, batch, rng):
    return _normalised(*reduced(state, batch, rng))

  return gradient_step(step.init, grad, step.apply, step.predict)


def with_gradient_options(step: TrainStep, *, accum_steps: int = 1,
                          comm_dtype: Any = None, mesh=None) -> TrainStep:
  """`step` with gradient accumulation over `accum_steps` microbatches and, when
  `comm_dtype` is given, the all-reduce of the (accumulated) gradient in that dtype
  over `mesh`. Each device accumulates its own shard's microbatches, then one
  all-reduce per update."""
  if accum_steps < 1:
    raise ValueError(f"grad_accum_steps must be >= 1, got {accum_steps}")
  step = accumulate_step(step, accum_steps)
  if comm_dtype is not None:
    if mesh is None:
      raise ValueError("grad_comm_dtype needs the mesh whose batch axes it reduces over")
    step = communicate_step(step, mesh, jnp.dtype(comm_dtype))
  return step
