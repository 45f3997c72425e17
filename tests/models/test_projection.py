"""Dense products with written-out gradients (etjax.models.projection), and the layer
scan's unrolling option."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals

import etjax.models as models
from etjax.models.projection import project
from etjax.models.remat import remat_policy


def _operands(x_shape, k_shape, dtype, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(x_shape).astype(np.float32)
  k = rng.standard_normal(k_shape).astype(np.float32)
  return jnp.asarray(x, dtype), jnp.asarray(k, dtype)


@pytest.mark.parametrize("x_shape,k_shape,n_in", [
    ((3, 5, 8), (8, 6), 1),                 # [batch, length, embed] -> [.., mlp]
    ((3, 5, 8), (8, 2, 4), 1),              # embed -> (heads, kv)
    ((3, 5, 2, 4), (2, 4, 8), 2),           # (heads, kv) -> embed
])
def test_float32_values_and_gradients_equal_plain_autodiff(x_shape, k_shape, n_in):
  x, k = _operands(x_shape, k_shape, jnp.float32)
  r = jnp.asarray(np.random.default_rng(1).standard_normal(
      x_shape[:x.ndim - n_in] + k_shape[n_in:]), jnp.float32)
  dims = ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ()))
  plain = lambda a, b: (jax.lax.dot_general(a, b, dims) * r).sum()
  ours = lambda a, b: (project(a, b, n_in) * r).sum()
  np.testing.assert_allclose(ours(x, k), plain(x, k), rtol=1e-5)
  for got, want in zip(jax.grad(ours, (0, 1))(x, k), jax.grad(plain, (0, 1))(x, k)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bfloat16_gradients_match_float64_and_keep_the_dtype():
  x, k = _operands((4, 16, 32), (32, 24), jnp.bfloat16)
  g = jnp.asarray(np.random.default_rng(2).standard_normal((4, 16, 24)), jnp.bfloat16)
  # As in Dense: the result is rounded to bfloat16, so its cotangent is a bf16 value.
  loss = lambda a, b: (project(a, b).astype(jnp.bfloat16).astype(jnp.float32)
                       * g.astype(jnp.float32)).sum()
  dx, dk = jax.grad(loss, (0, 1))(x, k)
  assert dx.dtype == jnp.bfloat16 and dk.dtype == jnp.bfloat16
  x64, k64, g64 = (np.asarray(a, np.float64) for a in (x, k, g))
  want_dx = np.einsum("blo,io->bli", g64, k64)
  want_dk = np.einsum("bli,blo->io", x64, g64)
  for got, want in ((dx, want_dx), (dk, want_dk)):
    got = np.asarray(got, np.float64)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2
  out = project(x, k)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, np.einsum("bli,io->blo", x64, k64), rtol=2e-2, atol=2e-2)


def test_bad_operands_are_named():
  x, k = _operands((2, 8), (8, 3), jnp.float32)
  with pytest.raises(ValueError, match="kernel is bfloat16"):
    project(x, k.astype(jnp.bfloat16))
  with pytest.raises(ValueError, match="contracted dims"):
    project(x, jnp.ones((7, 3)))


def test_dots_remat_policies_keep_the_projections():
  x, k1 = _operands((4, 8), (8, 16), jnp.float32)
  k2 = jnp.ones((16, 8), jnp.float32)
  f = lambda a, b, c: project(jnp.tanh(project(a, b)), c).sum()
  def saved(policy):
    fn = jax.checkpoint(f, policy=remat_policy(policy))
    return [aval.shape for aval, _ in saved_residuals(fn, x, k1, k2)]
  assert (4, 16) in saved("dots") and (4, 16) in saved("dots_with_no_batch_dims")
  assert (4, 16) not in saved("full")


def test_unrolled_layer_scan_equals_the_loop():
  config = models.get_config("bert-tiny", num_layers=3, vocab_size=60)
  ids = jnp.asarray(np.random.default_rng(3).integers(0, 60, (2, 9)), jnp.int32)
  looped = models.module_for(config)
  unrolled = models.module_for(config.replace(scan_unroll=3))
  params = looped.init(jax.random.PRNGKey(0), ids)["params"]
  assert (jax.tree.structure(params)
          == jax.tree.structure(unrolled.init(jax.random.PRNGKey(0), ids)["params"]))
  def loss(module, p):
    out = module.apply({"params": p}, ids, deterministic=False,
                       rngs={"dropout": jax.random.PRNGKey(5)})
    return (out.last_hidden_state ** 2).mean()
  np.testing.assert_allclose(loss(unrolled, params), loss(looped, params), rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               nn.meta.unbox(jax.grad(lambda p: loss(unrolled, p))(params)),
               nn.meta.unbox(jax.grad(lambda p: loss(looped, p))(params)))
  with pytest.raises(ValueError, match="scan_unroll"):
    config.replace(scan_unroll=0)
