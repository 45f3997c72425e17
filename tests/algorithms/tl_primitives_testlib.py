"""Shared test helpers for the TL primitives: float64 finite-difference gradients."""

from __future__ import annotations

import jax
import numpy as np


def fd_grad(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
  """Central-difference gradient of the scalar f at x, in float64.

  Call inside `jax.enable_x64(True)`, so that f computes in float64 too.
  """
  x = np.asarray(x, np.float64)
  g = np.zeros_like(x)
  for i in np.ndindex(x.shape):
    e = np.zeros_like(x)
    e[i] = eps
    g[i] = (float(f(x + e)) - float(f(x - e))) / (2 * eps)
  return g


def check_grad(f, x: np.ndarray, *, rtol: float = 1e-6, atol: float = 1e-9,
               eps: float = 1e-6) -> None:
  """Asserts jax.grad(f)(x) equals the float64 central difference at x."""
  with jax.enable_x64(True):
    x = np.asarray(x, np.float64)
    analytic = np.asarray(jax.grad(f)(x))
    numeric = fd_grad(f, x, eps)
  np.testing.assert_allclose(analytic, numeric, rtol=rtol, atol=atol)
