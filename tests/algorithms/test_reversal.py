"""Gradient reversal: forward identity, backward negated and scaled."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from etjax.algorithms.reversal import gradient_reversal, grl_schedule


def test_forward_is_identity_for_pytrees_and_dtypes():
  x = {"a": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(4, jnp.bfloat16)}
  y = gradient_reversal(x, 0.5)
  np.testing.assert_array_equal(y["a"], x["a"])
  assert y["b"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(y["b"], x["b"])


def test_backward_negates_and_scales():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 4)).astype(np.float32)
  c = rng.normal(size=(3, 4)).astype(np.float32)
  loss = lambda x, s: jnp.sum(c * jnp.sin(gradient_reversal(x, s)))
  for scale in (0.0, 1.0, 0.37):
    g = jax.grad(loss)(x, scale)
    np.testing.assert_allclose(g, -scale * c * np.cos(x), rtol=1e-6, atol=1e-7)
  # The scale may be traced (scheduled) and gets no gradient itself.
  g_scale = jax.grad(loss, argnums=1)(x, jnp.float32(0.5))
  assert float(g_scale) == 0.0
  g_jit = jax.jit(jax.grad(loss))(x, jnp.float32(2.0))
  np.testing.assert_allclose(g_jit, -2.0 * c * np.cos(x), rtol=1e-6, atol=1e-6)
  # bf16 cotangents stay bf16.
  gb = jax.grad(lambda x: jnp.sum(gradient_reversal(x, 2.0)).astype(jnp.float32))(
      jnp.ones(3, jnp.bfloat16))
  assert gb.dtype == jnp.bfloat16
  np.testing.assert_array_equal(gb.astype(np.float32), [-2.0, -2.0, -2.0])


def test_schedule():
  p = np.array([0.0, 0.1, 0.5, 1.0])
  np.testing.assert_allclose(grl_schedule(p), 2 / (1 + np.exp(-10 * p)) - 1, rtol=1e-6)
