"""Gradient accumulation: one optimizer step from M microbatches run one after another.

Memory for activations scales with the microbatch, not the batch. `accumulate_gradients`
wraps a gradient function so that it splits the batch (strided, see
etjax.sharding.microbatch), runs `lax.scan` over the microbatches summing gradients and
values in float32, and returns their means. For a loss that is a mean over examples
this equals the full-batch gradient; a loss weighted per example (e.g. by
`batch['weight']`) is reproduced exactly when it normalises by a constant rather than
by each microbatch's total weight.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from etjax.sharding.microbatch import check_divisible, split_microbatches

GradFn = Callable[..., tuple[Any, Any]]


def accumulate_gradients(grad_fn: GradFn, num_microbatches: int, *,
                         accum_dtype: Any = jnp.float32) -> GradFn:
  """Returns grad_fn averaged over `num_microbatches` microbatches.

  Args:
    grad_fn: (params, batch, rng) -> (value, grads), e.g. made with
      `jax.value_and_grad(loss_fn, has_aux=True)`; `value` is any pytree of arrays
      (a loss, or (loss, metrics)), `grads` has the structure of `params` (logical
      boxes kept).
    num_microbatches: M; every batch leaf's leading dimension must divide by M.
    accum_dtype: dtype of the running sums (float32 so that bf16 gradients do not lose
      precision while summing); results are cast back to grad_fn's dtypes.

  Returns:
    accumulated(params, batch, rng=None) -> (value, grads): the means over microbatches
    of what grad_fn returns. With an rng, microbatch i receives
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
    out_shapes = jax.eval_shape(grad_fn, params, first, rng)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, accum_dtype), out_shapes)

    def body(sums, inputs):
      index, microbatch = inputs
      step_rng = None if rng is None else jax.random.fold_in(rng, index)
      out = grad_fn(params, microbatch, step_rng)
      return jax.tree.map(lambda s, o: s + o.astype(accum_dtype), sums, out), None

    sums, _ = jax.lax.scan(body, zeros, (jnp.arange(num_microbatches), micro))
    return jax.tree.map(lambda s, shape: (s / num_microbatches).astype(shape.dtype),
                        sums, out_shapes)

  return accumulated
