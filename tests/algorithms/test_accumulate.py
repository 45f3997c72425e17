"""Gradient accumulation equals the full-batch gradient."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from etjax.algorithms.accumulate import accumulate_gradients
from etjax.models.microbatch import merge_microbatches, split_microbatches


class _Mlp(nn.Module):

  @nn.compact
  def __call__(self, x_bd):
    h = nn.with_logical_partitioning(nn.initializers.normal(0.5), ("embed", "mlp"))
    w_df = self.param("w", h, (x_bd.shape[-1], 16))
    return jnp.tanh(x_bd @ w_df) @ self.param("v", nn.initializers.normal(0.5), (16, 3))


def _loss(params, batch, rng):
  del rng
  logits_bc = _Mlp().apply({"params": params}, batch["x"])
  logp_bc = jax.nn.log_softmax(logits_bc)
  nll_b = -jnp.take_along_axis(logp_bc, batch["labels"][:, None], axis=1)[:, 0]
  accuracy = jnp.mean(jnp.argmax(logits_bc, -1) == batch["labels"])
  return jnp.mean(nll_b), {"accuracy": accuracy, "mean_logit": jnp.mean(logits_bc),
                          "logits_bc": logits_bc}


def _setup(batch_size=24):
  kx, ky, kp = jax.random.split(jax.random.PRNGKey(0), 3)
  batch = {"x": jax.random.normal(kx, (batch_size, 5)),
           "labels": jax.random.randint(ky, (batch_size,), 0, 3)}
  params = _Mlp().init(kp, batch["x"])["params"]
  return params, batch


@pytest.mark.parametrize("num_microbatches", [1, 2, 3, 8])
def test_equals_full_batch_gradient(num_microbatches):
  params, batch = _setup()
  grad_fn = jax.value_and_grad(_loss, has_aux=True)
  (loss, metrics), grads = grad_fn(params, batch, None)
  acc = jax.jit(accumulate_gradients(grad_fn, num_microbatches))
  (loss_m, metrics_m), grads_m = acc(params, batch)
  assert isinstance(grads_m["w"], nn.LogicallyPartitioned)  # boxes survive
  np.testing.assert_allclose(loss_m, loss, rtol=1e-5)
  for name in metrics:  # scalars averaged, per-example logits back in batch order
    np.testing.assert_allclose(metrics_m[name], metrics[name], rtol=1e-5, atol=1e-7)
  assert metrics_m["logits_bc"].shape == (24, 3)
  for g_m, g in zip(jax.tree.leaves(grads_m), jax.tree.leaves(grads)):
    np.testing.assert_allclose(g_m, g, rtol=1e-5, atol=1e-7)


def test_rng_is_folded_per_microbatch():
  seen = []

  def grad_fn(params, batch, rng):
    seen.append(rng)
    return jax.random.uniform(rng), params
  acc = accumulate_gradients(grad_fn, 4)
  value, _ = acc(jnp.zeros(()), {"x": jnp.zeros((8, 1))}, jax.random.PRNGKey(3))
  want = np.mean([jax.random.uniform(jax.random.fold_in(jax.random.PRNGKey(3), i))
                  for i in range(4)])
  np.testing.assert_allclose(value, want, rtol=1e-6)


def test_split_is_strided_and_merge_inverts_it():
  x = jnp.arange(12).reshape(6, 2)
  micro = split_microbatches({"x": x}, 3)["x"]
  np.testing.assert_array_equal(micro[1], x[np.array([1, 4])])
  np.testing.assert_array_equal(merge_microbatches(micro), x)


def test_indivisible_batch_names_the_leaf():
  params, batch = _setup(batch_size=10)
  acc = accumulate_gradients(jax.value_and_grad(_loss, has_aux=True), 4)
  with pytest.raises(ValueError, match=r"batch\['labels'\] of 10 examples does not "
                     r"split into 4 equal microbatches"):
    acc(params, batch)
