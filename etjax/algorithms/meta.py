"""Meta-gradients: differentiate an outer loss through inner optimizer updates.

For parameters theta_0, a support batch S and a query batch Q, the inner loop takes
K optimizer steps on the support loss and the outer loss is the query loss at the
adapted parameters:

    theta_{k+1} = theta_k + u_k,   u_k = -alpha * grad L(theta_k; S)   (plain SGD)
                                   u_k = optax update of grad L(theta_k; S)  (any optax)
    L_outer(theta_0) = L(theta_K; Q)

`meta_gradient` returns L_outer and d L_outer / d theta_0.

Second order (default, MAML): the derivative flows through every u_k, so for SGD it
contains the Hessian terms prod_k (I - alpha H_k)^T grad L(theta_K; Q).

First order (`first_order=True`, FOMAML): the inner updates (and the inner optimizer
state) are wrapped in stop_gradient, so d theta_K / d theta_0 = I and the result is
simply grad L(theta_K; Q) evaluated at the adapted parameters. It needs no second
derivatives and no memory for the inner graph, at the price of a biased gradient.

The same `inner_adapt` serves both the meta-gradient and plain adaptation (for
example, evaluating how fast a meta-learner fine-tunes on a new domain).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import jax
import optax

PyTree = Any
Batch = Any
LossFn = Callable[[PyTree, Batch], Any]


def _validate(inner_lr, inner_optimizer, inner_steps) -> None:
  if (inner_lr is None) == (inner_optimizer is None):
    raise ValueError("meta: give exactly one of inner_lr (plain SGD) or inner_optimizer "
                     f"(an optax GradientTransformation); got inner_lr={inner_lr!r}, "
                     f"inner_optimizer={inner_optimizer!r}")
  if not isinstance(inner_steps, int) or isinstance(inner_steps, bool) or inner_steps < 0:
    raise ValueError(f"meta: inner_steps must be an int >= 0, got {inner_steps!r}")


def _support_batches(support: Union[Batch, Sequence[Batch]], inner_steps: int) -> list:
  # A list or tuple gives one batch per inner step; anything else (a dict batch, an
  # array) is reused at every step.
  if isinstance(support, (list, tuple)):
    if len(support) != inner_steps:
      raise ValueError(f"meta: {len(support)} support batches given for "
                       f"inner_steps={inner_steps}; give one per step or a single batch")
    return list(support)
  return [support] * inner_steps


def inner_adapt(loss_fn: LossFn, params: PyTree, support: Union[Batch, Sequence[Batch]],
                *, inner_lr: Optional[Any] = None,
                inner_optimizer: Optional[optax.GradientTransformation] = None,
                inner_steps: int = 1, first_order: bool = False,
                has_aux: bool = False) -> PyTree:
  """Runs the inner loop and returns theta_K, a pytree shaped like `params`.

  Args:
    loss_fn: (params, batch) -> scalar loss, or (loss, aux) when has_aux.
    params: theta_0.
    support: one batch reused at every step, or a list/tuple of `inner_steps` batches.
    inner_lr: SGD step size alpha (a float or a traced scalar); exclusive with
      inner_optimizer.
    inner_optimizer: an optax transformation, initialized fresh from theta_0.
    inner_steps: K >= 0.
    first_order: stop gradients through the inner updates (see the module doc).
    has_aux: whether loss_fn returns (loss, aux); aux is ignored here.
  """
  _validate(inner_lr, inner_optimizer, inner_steps)
  batches = _support_batches(support, inner_steps)

  def scalar_loss(p, batch):
    out = loss_fn(p, batch)
    return out[0] if has_aux else out

  opt_state = None if inner_optimizer is None else inner_optimizer.init(params)
  for batch in batches:
    grads = jax.grad(scalar_loss)(params, batch)
    if inner_optimizer is None:
      updates = jax.tree.map(lambda g: -inner_lr * g, grads)
    else:
      updates, opt_state = inner_optimizer.update(grads, opt_state, params)
      if first_order:
        opt_state = jax.lax.stop_gradient(opt_state)
    if first_order:
      updates = jax.lax.stop_gradient(updates)
    params = optax.apply_updates(params, updates)
  return params


def meta_gradient(loss_fn: LossFn, params: PyTree,
                  support: Union[Batch, Sequence[Batch]], query: Batch, *,
                  inner_lr: Optional[Any] = None,
                  inner_optimizer: Optional[optax.GradientTransformation] = None,
                  inner_steps: int = 1, first_order: bool = False,
                  has_aux: bool = False) -> tuple[Any, PyTree]:
  """The outer loss after inner adaptation and its gradient w.r.t. the initial params.

  Args:
    loss_fn, params, support, inner_lr, inner_optimizer, inner_steps, first_order,
      has_aux: as in `inner_adapt`.
    query: the batch of the outer loss.

  Returns:
    (outer_loss [], grads shaped like params); with has_aux, ((outer_loss, aux), grads)
    where aux is the query loss's aux output.
  """
  def outer(p):
    adapted = inner_adapt(loss_fn, p, support, inner_lr=inner_lr,
                          inner_optimizer=inner_optimizer, inner_steps=inner_steps,
                          first_order=first_order, has_aux=has_aux)
    return loss_fn(adapted, query)

  return jax.value_and_grad(outer, has_aux=has_aux)(params)
