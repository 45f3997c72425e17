"""Losses of the shared/private feature-based TL models.

- `difference_loss`: the orthogonality constraint between shared and private features
  (Bousmalis et al. 2016; Liu et al. 2017's adversarial multi-task learning):
      L_diff = || S^T P ||_F^2
  over the batch's rows s_b, p_b, each L2-normalized first by default (as the DSN code
  does) so the loss measures correlation rather than scale.
- DRSS's matrix-normal prior on the domain-specific output weights W = [w_1 .. w_K]
  (columns are domains), with domain covariance Omega (Zhang & Yeung 2010; Zhao et al.):
      R(W, Omega) = tr(W Omega^-1 W^T),
  minimized over {Omega >= 0, tr Omega = 1} in closed form by
      Omega* = (W^T W)^(1/2) / tr((W^T W)^(1/2)),
  where R(W, Omega*) = (tr (W^T W)^(1/2))^2. Training alternates gradient steps on W
  (Omega fixed) with this closed-form update of Omega.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array


def _float(x) -> Array:
  # float32 at least; float64 stays float64 (finite-difference checks run in it).
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _normalize_rows(x_bd: Array, eps: float) -> Array:
  return x_bd / jnp.sqrt(jnp.maximum(jnp.sum(x_bd * x_bd, -1, keepdims=True), eps * eps))


def difference_loss(shared_bd: Array, private_bd: Array, *,
                    mask_b: Optional[Array] = None, normalize: bool = True,
                    eps: float = 1e-8) -> Array:
  """The orthogonality loss || S^T P ||_F^2 between shared and private features.

  Args:
    shared_bd: [b, d] shared features S.
    private_bd: [b, e] private features P (widths may differ).
    mask_b: optional [b]; rows with 0 are left out (padding examples).
    normalize: L2-normalize each row of S and P first.
    eps: floor of the row norms.

  Returns:
    [] the squared Frobenius norm of the [d, e] correlation S^T P.
  """
  s, p = _float(shared_bd), _float(private_bd)
  if s.ndim != 2 or p.ndim != 2 or s.shape[0] != p.shape[0]:
    raise ValueError(f"difference_loss: expected [batch, width] features with the same "
                     f"batch, got shared {s.shape} and private {p.shape}")
  if normalize:
    s, p = _normalize_rows(s, eps), _normalize_rows(p, eps)
  if mask_b is not None:
    keep_b1 = (jnp.asarray(mask_b) != 0)[:, None]
    s, p = jnp.where(keep_b1, s, 0), jnp.where(keep_b1, p, 0)
  corr_de = jnp.einsum("bd,be->de", s, p)
  return jnp.sum(corr_de * corr_de)


def matrix_normal_regularizer(w_dk: Array, omega_kk: Array) -> Array:
  """tr(W Omega^-1 W^T) for domain-specific weights W (one column per domain).

  Omega^-1 W^T is computed by a linear solve, never an explicit inverse.

  Args:
    w_dk: [d, K] weights, column k for domain k.
    omega_kk: [K, K] symmetric positive-definite domain covariance.

  Returns:
    [] the regularizer.
  """
  w = jnp.asarray(w_dk)
  k = w.shape[-1]
  if w.ndim != 2 or omega_kk.shape != (k, k):
    raise ValueError(f"matrix_normal_regularizer: expected W [d, K] and Omega [K, K], "
                     f"got W {w.shape} and Omega {omega_kk.shape}")
  omega_inv_wt_kd = jnp.linalg.solve(omega_kk, w.T)
  return jnp.sum(w * omega_inv_wt_kd.T)


def psd_sqrt(m_kk: Array) -> Array:
  """Square root of a symmetric positive semi-definite matrix via eigh.

  The input is symmetrized and negative eigenvalues (round-off) are clipped to 0, so
  the result is real and symmetric for any nearly-PSD input.

  Returns:
    [K, K] the PSD square root.
  """
  m = 0.5 * (m_kk + m_kk.T)
  evals, evecs = jnp.linalg.eigh(m)
  return (evecs * jnp.sqrt(jnp.maximum(evals, 0.0))) @ evecs.T


def omega_closed_form(w_dk: Array, *, eps: float = 1e-6) -> Array:
  """DRSS's closed-form domain covariance (W^T W + eps I)^(1/2) / tr(same).

  eps > 0 keeps Omega invertible when W^T W is rank-deficient (d < K, or two identical
  domains). The result is a constant of the alternating scheme (stop_gradient), which
  also keeps eigh's unstable gradient at repeated eigenvalues out of any jax.grad.

  Args:
    w_dk: [d, K] domain-specific weights.
    eps: ridge added to W^T W, >= 0.

  Returns:
    [K, K] Omega, symmetric positive semi-definite with trace 1.
  """
  if eps < 0:
    raise ValueError(f"omega_closed_form: eps must be >= 0, got {eps}")
  w = jax.lax.stop_gradient(_float(w_dk))
  if w.ndim != 2:
    raise ValueError(f"omega_closed_form: expected W [d, K], got {w.shape}")
  k = w.shape[1]
  root = psd_sqrt(w.T @ w + eps * jnp.eye(k, dtype=w.dtype))
  return root / jnp.trace(root)


def omega_correlation(omega_kk: Array) -> Array:
  """The domain-relationship matrix to report: Omega_ij / sqrt(Omega_ii Omega_jj).

  Returns:
    [K, K] correlations with a unit diagonal.
  """
  d = jnp.sqrt(jnp.diag(omega_kk))
  return omega_kk / (d[:, None] * d[None, :])
