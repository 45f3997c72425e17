"""Orthogonality loss, matrix-normal regularizer and closed-form Omega vs numpy/scipy."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import scipy.linalg

from etjax.algorithms import feature_losses as fl
from tl_primitives_testlib import check_grad


@pytest.fixture
def rng():
  return np.random.default_rng(0)


def test_difference_loss_matches_numpy(rng):
  s = rng.normal(size=(5, 3)).astype(np.float32)
  p = rng.normal(size=(5, 4)).astype(np.float32)
  mask = np.array([1, 1, 0, 1, 1], np.float32)
  raw = (s.astype(np.float64).T @ p) ** 2
  np.testing.assert_allclose(fl.difference_loss(s, p, normalize=False), raw.sum(),
                             rtol=1e-5)
  sn = s / np.linalg.norm(s, axis=1, keepdims=True)
  pn = p / np.linalg.norm(p, axis=1, keepdims=True)
  keep = mask.astype(bool)
  want = ((sn[keep].astype(np.float64).T @ pn[keep]) ** 2).sum()
  np.testing.assert_allclose(fl.difference_loss(s, p, mask_b=mask), want, rtol=1e-5)
  # Zero when every column of S is orthogonal (over the batch) to every column of P.
  rows = np.arange(5)[:, None] < 3
  assert float(fl.difference_loss(np.where(rows, s, 0), np.where(rows, 0, p),
                                  normalize=False)) == 0.0
  with pytest.raises(ValueError, match="same batch"):
    fl.difference_loss(s, p[:4])
  check_grad(lambda x: fl.difference_loss(x, p.astype(np.float64), mask_b=mask),
             s.astype(np.float64))


def test_matrix_normal_regularizer_matches_numpy_and_fd(rng):
  w = rng.normal(size=(6, 3))
  a = rng.normal(size=(3, 3))
  omega = a @ a.T + np.eye(3)
  want = np.trace(w @ np.linalg.inv(omega) @ w.T)
  np.testing.assert_allclose(fl.matrix_normal_regularizer(w.astype(np.float32),
                                                          omega.astype(np.float32)),
                             want, rtol=1e-5)
  check_grad(lambda x: fl.matrix_normal_regularizer(x, omega), w)
  # Analytic gradient 2 W Omega^-1 (Omega symmetric).
  with jax.enable_x64(True):
    g = jax.grad(fl.matrix_normal_regularizer)(w, omega)
  np.testing.assert_allclose(g, 2 * w @ np.linalg.inv(omega), rtol=1e-10)
  with pytest.raises(ValueError, match="expected W \\[d, K\\] and Omega \\[K, K\\]"):
    fl.matrix_normal_regularizer(w, omega[:2, :2])


def test_omega_closed_form_matches_scipy_and_minimizes(rng):
  w = rng.normal(size=(8, 3))
  root = np.real(scipy.linalg.sqrtm(w.T @ w))
  want = root / np.trace(root)
  omega = np.asarray(fl.omega_closed_form(w.astype(np.float32), eps=0.0), np.float64)
  np.testing.assert_allclose(omega, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.trace(omega), 1.0, rtol=1e-6)
  # The minimum over {Omega > 0, tr Omega = 1} is (tr (W^T W)^(1/2))^2 ...
  with jax.enable_x64(True):
    best = float(fl.matrix_normal_regularizer(w, fl.omega_closed_form(w, eps=0.0)))
    np.testing.assert_allclose(best, np.trace(root) ** 2, rtol=1e-10)
    # ... and every other feasible Omega does worse.
    for _ in range(20):
      a = rng.normal(size=(3, 3))
      other = a @ a.T + 0.01 * np.eye(3)
      other /= np.trace(other)
      assert float(fl.matrix_normal_regularizer(w, other)) >= best


def test_omega_is_safe_when_rank_deficient_and_recovers_relationships(rng):
  # Domains 0 and 1 share their weights, domain 2 is orthogonal to both: W^T W is
  # singular, the ridge keeps Omega invertible, and the relationship shows.
  base = rng.normal(size=6)
  other = rng.normal(size=6)
  other -= other @ base / (base @ base) * base
  w = np.stack([base, base, other], axis=1).astype(np.float32)
  omega = fl.omega_closed_form(w, eps=1e-6)
  assert np.all(np.isfinite(omega))
  assert np.all(np.linalg.eigvalsh(np.asarray(omega, np.float64)) > 0)
  corr = np.asarray(fl.omega_correlation(omega))
  np.testing.assert_allclose(np.diag(corr), 1.0, rtol=1e-6)
  assert corr[0, 1] > 0.99 and abs(corr[0, 2]) < 1e-2 and abs(corr[1, 2]) < 1e-2
  assert np.isfinite(float(fl.matrix_normal_regularizer(w, omega)))
  # Omega is a constant for jax.grad.
  g = jax.grad(lambda x: fl.omega_closed_form(x).sum())(w)
  assert np.all(g == 0)
  # psd_sqrt against scipy, including a slightly indefinite round-off input.
  m = w.T.astype(np.float64) @ w
  m[2, 2] -= 1e-9
  r = np.asarray(fl.psd_sqrt(m.astype(np.float32)), np.float64)
  np.testing.assert_allclose(r @ r, np.clip(m, None, None), atol=1e-4 * np.abs(m).max())
  with pytest.raises(ValueError, match="eps must be >= 0"):
    fl.omega_closed_form(w, eps=-1.0)
