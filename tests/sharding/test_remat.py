"""Remat policies by name: gradients unchanged, memory-relevant saving differs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax._src.ad_checkpoint import saved_residuals  # no public alias in jax 0.10
import numpy as np
import pytest

from etjax.models import remat


def test_unknown_name_lists_known_ones():
  with pytest.raises(ValueError) as err:
    remat.remat_policy("dotz")
  msg = str(err.value)
  assert "unknown remat policy 'dotz'" in msg
  for name in ("none", "full", "save_nothing", "dots", "dots_with_no_batch_dims",
               "everything"):
    assert name in msg


def _f(w, x):
  return jnp.sum(jnp.tanh(jnp.tanh(x @ w) @ w))


@pytest.mark.parametrize("name", list(remat.REMAT_POLICIES))
def test_gradients_unchanged(name):
  # Recomputing is the same arithmetic: float64 so the tolerance is CPU-independent.
  with jax.enable_x64(True):
    w = jax.random.normal(jax.random.PRNGKey(0), (6, 6))
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 6))
    want = jax.grad(_f)(w, x)
    got = jax.grad(remat.remat_function(_f, name))(w, x)
  assert got.dtype == np.float64
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


def test_policies_save_what_they_say():
  w = jnp.ones((6, 6))
  x = jnp.ones((3, 6))

  def saved(name):
    fn = remat.remat_function(_f, name)
    return [str(r) for r in saved_residuals(fn, w, x)]
  # Inputs are always residuals; 'full' saves nothing else, 'dots' saves the matmuls.
  assert len(saved("full")) < len(saved("dots")) <= len(saved("everything"))
  assert len(saved("full")) == 2
