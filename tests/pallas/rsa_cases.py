"""Shared inputs and comparison helpers for the RSA tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from etjax.pallas.rsa import make_layout, reference_rsa, rsa_attention


def rel_err(got, want) -> float:
  """max |got - want| / max |want|, in float64."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def make_inputs(seed, b, length, h, d, *, dtype=jnp.float32, mask=False,
                bias=None, empty_row=False):
  """Random q, k, v [b, length, h, d], cotangent, optional mask [b, length] and
  bias [bias, h, length, length] (bias = 1 or b)."""
  rng = np.random.default_rng(seed)
  q, k, v, g = (jnp.asarray(rng.standard_normal((b, length, h, d)), dtype)
                for _ in range(4))
  m = None
  if mask:
    m = rng.random((b, length)) > 0.3
    m[:, 0] = True
    if empty_row:
      m[0] = False                      # batch row 0 may attend nothing at all
    m = jnp.asarray(m)
  bi = None
  if bias:
    bi = jnp.asarray(rng.standard_normal((bias, h, length, length)), dtype)
  return q, k, v, g, m, bi


def outputs_and_grads(fn, q, k, v, g, bias, **kw):
  """Returns (out, dq, dk, dv[, dbias]) of <fn(q, k, v, bias=bias), g>."""
  def loss(q, k, v, bias):
    out = fn(q, k, v, bias=bias, **kw)
    return jnp.sum(out.astype(jnp.float32) * g.astype(jnp.float32)), out

  argnums = (0, 1, 2, 3) if bias is not None else (0, 1, 2)
  (_, out), grads = jax.value_and_grad(loss, argnums=argnums, has_aux=True)(
      q, k, v, bias)
  return (out,) + tuple(grads)


def check_case(backend, *, b, length, h, d, bs, k, causal, mask, bias, dtype,
               seed=0, scale=None, empty_row=False):
  """Asserts outputs and gradients of `backend` match reference_rsa."""
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  q, kk, v, g, m, bi = make_inputs(seed, b, length, h, d, dtype=dtype, mask=mask,
                                   bias=bias, empty_row=empty_row)
  layout = make_layout(h, length, bs, k, seed=seed + 1, causal=causal)
  common = dict(block_size=bs, mask=m, causal=causal, scale=scale)
  up = lambda x: None if x is None else x.astype(jnp.float32)
  want = outputs_and_grads(
      lambda q, k, v, bias, **kw: reference_rsa(q, k, v, layout, bias=bias, **kw),
      up(q), up(kk), up(v), g, up(bi), **common)
  got = outputs_and_grads(
      lambda q, k, v, bias, **kw: rsa_attention(q, k, v, layout, bias=bias,
                                                backend=backend, **kw),
      q, kk, v, g, bi, **common)
  names = ("out", "dq", "dk", "dv", "dbias")
  for name, x, y in zip(names, got, want):
    assert x.dtype == dtype, (name, x.dtype)
    assert np.all(np.isfinite(np.asarray(x, np.float32))), name
    err = rel_err(x, y)
    assert err <= tol, f"{backend} {name}: rel err {err:.2e} > {tol}"
  return got
