"""Dropout masks drawn with Philox-4x32 (etjax.models.dropout)."""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from etjax.models import dropout as dropout_lib


def test_keep_fraction_and_scaling_match_the_rate():
  rate, shape = 0.1, (64, 128, 128)                    # 1,048,576 draws
  x = jnp.ones(shape, jnp.float32) * 3.0
  y = np.asarray(dropout_lib.dropout(x, rate, jax.random.PRNGKey(0)))
  kept = y != 0
  n = kept.size
  # Binomial(n, 0.9): the kept fraction lies within 5 standard deviations of 0.9.
  assert abs(kept.mean() - 0.9) < 5 * np.sqrt(0.9 * 0.1 / n)
  np.testing.assert_allclose(y[kept], 3.0 / 0.9, rtol=1e-6)
  assert abs(y.mean() - 3.0) < 5 * 3.0 / 0.9 * np.sqrt(0.9 * 0.1 / n)


def test_mask_bits_are_independent_across_positions_and_keys():
  shape = (512, 512)
  a = np.asarray(dropout_lib.keep_mask(jax.random.PRNGKey(1), 0.5, shape), np.float64)
  b = np.asarray(dropout_lib.keep_mask(jax.random.PRNGKey(2), 0.5, shape), np.float64)
  bound = 5 / np.sqrt(a.size)                          # 5 sigma of a null correlation
  neighbours = np.corrcoef(a[:, :-1].ravel(), a[:, 1:].ravel())[0, 1]
  rows = np.corrcoef(a[:-1].ravel(), a[1:].ravel())[0, 1]
  keys = np.corrcoef(a.ravel(), b.ravel())[0, 1]
  assert max(abs(neighbours), abs(rows), abs(keys)) < bound
  # Each row and column keeps about half (chi-square over 512 rows, 512 dof).
  counts = a.sum(1)
  chi2 = ((counts - 256) ** 2 / 128).sum()
  assert chi2 < 512 + 5 * np.sqrt(2 * 512)


def test_same_key_same_mask_and_typed_keys_work():
  raw = jax.random.PRNGKey(7)
  m1 = dropout_lib.keep_mask(raw, 0.8, (1000,))
  np.testing.assert_array_equal(m1, dropout_lib.keep_mask(raw, 0.8, (1000,)))
  typed = jax.random.wrap_key_data(raw)                # threefry typed key, same words
  np.testing.assert_array_equal(m1, dropout_lib.keep_mask(typed, 0.8, (1000,)))
  rbg = jax.random.key(7, impl="rbg")
  assert dropout_lib.keep_mask(rbg, 0.8, (1000,)).shape == (1000,)


def test_identity_cases_and_bad_rate():
  x = jnp.arange(6.0).reshape(2, 3)
  assert dropout_lib.dropout(x, 0.0, jax.random.PRNGKey(0)) is x
  assert dropout_lib.dropout(x, 0.5, None) is x
  with pytest.raises(ValueError, match="dropout rate"):
    dropout_lib.dropout(x, 1.0, jax.random.PRNGKey(0))


def test_module_uses_the_dropout_rng_and_keeps_dtype():
  x = jnp.ones((4, 256), jnp.bfloat16)
  module = dropout_lib.Dropout(0.25)
  assert module.apply({}, x, deterministic=True) is x
  y = module.apply({}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(3)})
  assert y.dtype == jnp.bfloat16
  z = module.apply({}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(4)})
  assert not np.array_equal(np.asarray(y), np.asarray(z))
  with pytest.raises(flax.errors.InvalidRngError):     # no 'dropout' rng given
    module.apply({}, x, deterministic=False)
  scaled = float(jnp.asarray(1 / 0.75, jnp.bfloat16))
  assert set(np.unique(np.asarray(y, np.float32)).tolist()) <= {0.0, scaled}


def test_sharded_masks_compile_and_equal_the_unsharded_ones():
  # Philox's multiply-high fails XLA's SPMD partitioner on CPU; the generator used here
  # must compile with a batch sharded over 8 devices and give the same mask.
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((8,), ("data",))
  x = jnp.arange(8 * 64, dtype=jnp.float32).reshape(8, 64) + 1.0
  sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
  drop = jax.jit(lambda a, key: dropout_lib.dropout(a, 0.3, key))
  key = jax.random.PRNGKey(11)
  np.testing.assert_array_equal(drop(sharded, key), drop(x, key))
