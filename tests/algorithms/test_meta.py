"""Meta-gradients: closed form on a quadratic, finite differences on a small model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from etjax.algorithms import meta
from tl_primitives_testlib import check_grad


def spd(rng, n):
  a = rng.normal(size=(n, n))
  return a @ a.T / n + np.eye(n)


def quadratic(params, batch):
  theta = params["theta"]
  return 0.5 * theta @ batch["A"] @ theta - batch["b"] @ theta


@pytest.mark.parametrize("first_order", [False, True])
def test_quadratic_meta_gradient_closed_form(first_order):
  rng = np.random.default_rng(0)
  n, lr, steps = 4, 0.1, 3
  a, bvec, qa, qb = spd(rng, n), rng.normal(size=n), spd(rng, n), rng.normal(size=n)
  theta0 = rng.normal(size=n)
  # theta_K = M^K theta0 + sum_k M^k lr b with M = I - lr A; dL/dtheta0 = (M^K)^T grad.
  m = np.eye(n) - lr * a
  theta = theta0.copy()
  for _ in range(steps):
    theta = m @ theta + lr * bvec
  outer_grad = qa @ theta - qb
  want_loss = 0.5 * theta @ qa @ theta - qb @ theta
  want = outer_grad if first_order else np.linalg.matrix_power(m, steps).T @ outer_grad
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  loss, grads = meta.meta_gradient(
      quadratic, {"theta": f32(theta0)}, {"A": f32(a), "b": f32(bvec)},
      {"A": f32(qa), "b": f32(qb)}, inner_lr=lr, inner_steps=steps,
      first_order=first_order)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(grads["theta"], want, rtol=1e-5, atol=1e-6)
  # optax.sgd is the same inner loop as inner_lr.
  _, grads_sgd = meta.meta_gradient(
      quadratic, {"theta": f32(theta0)}, {"A": f32(a), "b": f32(bvec)},
      {"A": f32(qa), "b": f32(qb)}, inner_optimizer=optax.sgd(lr), inner_steps=steps,
      first_order=first_order)
  np.testing.assert_allclose(grads_sgd["theta"], grads["theta"], rtol=1e-5, atol=1e-7)


def mlp_loss(params, batch):
  h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
  logits = h @ params["w2"]
  logp = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(logp, batch["y"][:, None], axis=1))


def small_problem(seed=0):
  rng = np.random.default_rng(seed)
  params = {"w1": rng.normal(size=(3, 4)), "b1": rng.normal(size=4) * 0.1,
            "w2": rng.normal(size=(4, 2))}
  batches = [{"x": rng.normal(size=(6, 3)), "y": rng.integers(0, 2, size=6)}
             for _ in range(3)]
  return params, batches


@pytest.mark.parametrize("inner", [
    dict(inner_lr=0.3),
    dict(inner_optimizer=optax.sgd(0.2, momentum=0.9)),
    dict(inner_optimizer=optax.adam(0.05)),
])
def test_second_order_matches_finite_differences(inner):
  params, (s1, s2, query) = small_problem()
  flat, unravel = ravel_pytree(params)

  def outer(flat_params):
    loss, _ = meta.meta_gradient(mlp_loss, unravel(flat_params), [s1, s2], query,
                                 inner_steps=2, **inner)
    return loss

  check_grad(jax.jit(outer), flat, rtol=1e-6, atol=1e-9)
  with jax.enable_x64(True):
    _, grads = meta.meta_gradient(mlp_loss, unravel(flat), [s1, s2], query,
                                  inner_steps=2, **inner)
    assert np.allclose(ravel_pytree(grads)[0], jax.grad(outer)(flat), rtol=1e-12)


def test_first_order_is_query_gradient_at_adapted_params():
  params, (s1, s2, query) = small_problem(1)
  with jax.enable_x64(True):
    adapted = meta.inner_adapt(mlp_loss, params, s1, inner_lr=0.3, inner_steps=2)
    # Reusing one support batch equals passing it once per step.
    again = meta.inner_adapt(mlp_loss, params, [s1, s1], inner_lr=0.3, inner_steps=2)
    np.testing.assert_allclose(ravel_pytree(adapted)[0], ravel_pytree(again)[0], rtol=0)
    manual = params
    for _ in range(2):
      g = jax.grad(mlp_loss)(manual, s1)
      manual = jax.tree.map(lambda p, gi: p - 0.3 * gi, manual, g)
    np.testing.assert_allclose(ravel_pytree(adapted)[0], ravel_pytree(manual)[0],
                               rtol=1e-12)
    loss_fo, g_fo = meta.meta_gradient(mlp_loss, params, s1, query, inner_lr=0.3,
                                       inner_steps=2, first_order=True)
    loss_so, g_so = meta.meta_gradient(mlp_loss, params, s1, query, inner_lr=0.3,
                                       inner_steps=2)
    want = jax.grad(mlp_loss)(adapted, query)
    np.testing.assert_allclose(ravel_pytree(g_fo)[0], ravel_pytree(want)[0], rtol=1e-12)
    np.testing.assert_allclose(loss_fo, loss_so, rtol=1e-12)
    # The Hessian terms matter here: the two gradients differ.
    assert np.abs(ravel_pytree(g_fo)[0] - ravel_pytree(g_so)[0]).max() > 1e-3
    # First order with an optax optimizer: the same, through the optimizer's updates.
    adapted_adam = meta.inner_adapt(mlp_loss, params, s1,
                                    inner_optimizer=optax.adam(0.05), inner_steps=2)
    _, g_adam = meta.meta_gradient(mlp_loss, params, s1, query,
                                   inner_optimizer=optax.adam(0.05), inner_steps=2,
                                   first_order=True)
    np.testing.assert_allclose(ravel_pytree(g_adam)[0],
                               ravel_pytree(jax.grad(mlp_loss)(adapted_adam, query))[0],
                               rtol=1e-12)


def test_has_aux_zero_steps_and_errors():
  params, (s1, _, query) = small_problem(2)

  def loss_with_aux(p, batch):
    loss = mlp_loss(p, batch)
    return loss, {"loss_copy": loss}

  (loss, aux), grads = meta.meta_gradient(loss_with_aux, params, s1, query,
                                          inner_lr=0.1, inner_steps=0, has_aux=True)
  np.testing.assert_allclose(aux["loss_copy"], loss)
  np.testing.assert_allclose(loss, mlp_loss(params, query), rtol=1e-6)
  np.testing.assert_allclose(ravel_pytree(grads)[0],
                             ravel_pytree(jax.grad(mlp_loss)(params, query))[0], rtol=1e-6)
  with pytest.raises(ValueError, match="exactly one of inner_lr"):
    meta.meta_gradient(mlp_loss, params, s1, query)
  with pytest.raises(ValueError, match="exactly one of inner_lr"):
    meta.meta_gradient(mlp_loss, params, s1, query, inner_lr=0.1,
                       inner_optimizer=optax.sgd(0.1))
  with pytest.raises(ValueError, match="inner_steps must be an int >= 0"):
    meta.meta_gradient(mlp_loss, params, s1, query, inner_lr=0.1, inner_steps=-1)
  with pytest.raises(ValueError, match="2 support batches given for inner_steps=3"):
    meta.meta_gradient(mlp_loss, params, [s1, s1], query, inner_lr=0.1, inner_steps=3)


def test_boxed_flax_params_keep_their_boxes():
  import flax.linen as nn

  class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(2, kernel_init=nn.with_logical_partitioning(
          nn.initializers.lecun_normal(), ("embed", "classes")))(x)

  params, (s1, _, query) = small_problem(3)
  module = Tiny()
  boxed = module.init(jax.random.key(0), jnp.ones((1, 3)))["params"]

  def loss_fn(p, batch):
    logits = module.apply({"params": p}, jnp.asarray(batch["x"], jnp.float32))
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits),
                                         batch["y"][:, None], axis=1))

  loss, grads = meta.meta_gradient(loss_fn, boxed, s1, query,
                                   inner_optimizer=optax.sgd(0.1), inner_steps=2)
  assert isinstance(grads["Dense_0"]["kernel"], nn.LogicallyPartitioned)
  assert grads["Dense_0"]["kernel"].names == ("embed", "classes")
  plain = nn.meta.unbox(boxed)
  loss_plain, grads_plain = meta.meta_gradient(loss_fn, plain, s1, query, inner_lr=0.1,
                                               inner_steps=2)
  np.testing.assert_allclose(loss, loss_plain, rtol=1e-6)
  np.testing.assert_allclose(grads["Dense_0"]["kernel"].value,
                             grads_plain["Dense_0"]["kernel"], rtol=1e-5, atol=1e-7)
