"""Gradient accumulation: one optimizer step from M microbatches run one after another.

Memory for activations scales with the microbatch, not the batch. `accumulate_gradients`
wraps a gradient function so that it splits the batch (strided, see
etjax.models.microbatch), runs `lax.scan` over the microbatches summing gradients and
scalar values in float32, and returns their means; per-example outputs (value leaves
with a leading microbatch dimension, e.g. logits) are put back together in the batch's
own order. For a loss that is a mean over examples this equals the full-batch gradient;
a loss weighted per example (e.g. by `batch['weight']`) is reproduced exactly when it
normalises by a constant rather than by each microbatch's total weight.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from etjax.models.microbatch import (check_divisible, merge_microbatches,
                                       split_microbatches)

GradFn = Callable[..., tuple[Any, Any]]


def _is_none(x) -> bool:
  return x is None


def accumulate_gradients(grad_fn: GradFn, num_microbatches: int, *,
                         accum_dtype: Any = jnp.float32) -> GradFn:
  """Returns grad_fn accumulated over `num_microbatches` microbatches.

  Args:
    grad_fn: (params, batch, rng) -> (value, grads), e.g. made with
      `jax.value_and_grad(loss_fn, has_aux=True)`; `value` is any pytree of arrays
      (a loss, or (loss, aux)), `grads` has the structure of `params` (logical boxes
      kept).
    num_microbatches: M; every batch leaf's leading dimension must divide by M.
    accum_dtype: dtype of the running sums (float32 so that bf16 gradients do not lose
      precision while summing); results are cast back to grad_fn's dtypes.

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
      return jax.tree.map(lambda s: jnp.zeros((), accum_dtype) if s.ndim == 0 else None,
                          tree)

    def body(sums, inputs):
      index, microbatch = inputs
      step_rng = None if rng is None else jax.random.fold_in(rng, index)
      value, grads = grad_fn(params, microbatch, step_rng)
      value_sums, grad_sums = sums
      value_sums = jax.tree.map(
          lambda s, v, scalar: s + v.astype(accum_dtype) if scalar else None,
          value_sums, value, is_scalar, is_leaf=_is_none)
      grad_sums = jax.tree.map(lambda s, g: s + g.astype(accum_dtype), grad_sums, grads)
      per_example = jax.tree.map(lambda v, scalar: None if scalar else v, value, is_scalar)
      return (value_sums, grad_sums), per_example

    zeros = (summed(value_shapes),
             jax.tree.map(lambda s: jnp.zeros(s.shape, accum_dtype), grad_shapes))
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
