"""Distillation losses against numpy references, gradients by finite differences."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from etjax.algorithms import distill_losses as dl
from tl_primitives_testlib import check_grad

RTOL = 1e-5


def np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_mean(per, mask, w):
  """sum w m l / sum w m with explicit broadcasting, float64."""
  per = np.asarray(per, np.float64)
  m = np.broadcast_to(np.ones(()) if mask is None else mask, per.shape).astype(np.float64)
  w = np.ones(per.shape[0]) if w is None else np.asarray(w, np.float64)
  m = m * w.reshape((-1,) + (1,) * (per.ndim - 1))
  return float((np.where(m != 0, per, 0) * m).sum() / m.sum())


@pytest.fixture
def rng():
  return np.random.default_rng(0)


def test_masked_weighted_mean_ignores_masked_nan_and_weights(rng):
  v = rng.normal(size=(3, 4)).astype(np.float32)
  v[1, 2] = np.nan
  mask = np.ones((3, 4), np.float32)
  mask[1, 2] = 0
  w = np.array([0.5, 2.0, 1.0], np.float32)
  got = dl.masked_weighted_mean(v, mask, w)
  np.testing.assert_allclose(got, np_mean(np.nan_to_num(v), mask, w), rtol=RTOL)
  assert float(dl.masked_weighted_mean(v, mask, np.zeros(3, np.float32))) == 0.0
  with pytest.raises(ValueError, match="weight_b must have shape"):
    dl.masked_weighted_mean(v, mask, np.ones(4))
  with pytest.raises(ValueError, match="does not broadcast"):
    dl.masked_weighted_mean(v, np.ones((2, 4)))


def test_kd_loss_matches_numpy(rng):
  b, l, c, temp, alpha = 3, 4, 5, 2.5, 0.7
  s = rng.normal(size=(b, l, c)).astype(np.float32)
  t = 3 * rng.normal(size=(b, l, c)).astype(np.float32)
  y = rng.integers(0, c, size=(b, l)).astype(np.int32)
  mask = (rng.random((b, l)) > 0.3).astype(np.float32)
  w = rng.random(b).astype(np.float32)
  s64, t64 = s.astype(np.float64), t.astype(np.float64)
  pt = np.exp(np_log_softmax(t64 / temp))
  kl = (pt * (np_log_softmax(t64 / temp) - np_log_softmax(s64 / temp))).sum(-1)
  ce = -np.take_along_axis(np_log_softmax(s64), y[..., None], -1)[..., 0]
  want = np_mean(alpha * temp ** 2 * kl + (1 - alpha) * ce, mask, w)
  got = dl.kd_loss(s, t, y, temperature=temp, alpha=alpha, mask=mask, weight_b=w)
  np.testing.assert_allclose(got, want, rtol=RTOL)
  # Ignore-index labels (-100) at masked positions change nothing, also under jit.
  y_ignore = np.where(mask > 0, y, -100)
  jitted = jax.jit(lambda s: dl.kd_loss(s, t, y_ignore, temperature=temp, alpha=alpha,
                                        mask=mask, weight_b=w))
  np.testing.assert_allclose(jitted(s), want, rtol=RTOL)
  g = jax.grad(jitted)(s)
  assert np.all(np.isfinite(g)) and np.all(g[mask == 0] == 0)
  # Pure soft loss needs no labels; equal logits give zero.
  assert abs(float(dl.kd_loss(t, t, temperature=temp))) < 1e-6
  with pytest.raises(ValueError, match="labels are required"):
    dl.kd_loss(s, t, alpha=0.5)
  with pytest.raises(ValueError, match="alpha must be in"):
    dl.kd_loss(s, t, y, alpha=1.5)
  with pytest.raises(ValueError, match="temperature must be > 0"):
    dl.kd_loss(s, t, temperature=0.0)


def test_soft_cross_entropy_matches_numpy_and_kd_gradient(rng):
  s = rng.normal(size=(4, 6)).astype(np.float32)
  t = rng.normal(size=(4, 6)).astype(np.float32)
  w = rng.random(4).astype(np.float32)
  temp = 3.0
  pt = np.exp(np_log_softmax(t.astype(np.float64) / temp))
  want = np_mean(-temp ** 2 * (pt * np_log_softmax(s.astype(np.float64) / temp)).sum(-1),
                 None, w)
  np.testing.assert_allclose(dl.soft_cross_entropy(s, t, temperature=temp, weight_b=w),
                             want, rtol=RTOL)
  # Differs from the KL by the teacher's entropy: same student gradient.
  g_ce = jax.grad(lambda x: dl.soft_cross_entropy(x, t, temperature=temp, weight_b=w))(s)
  g_kl = jax.grad(lambda x: dl.kd_loss(x, t, temperature=temp, weight_b=w))(s)
  np.testing.assert_allclose(g_ce, g_kl, rtol=1e-5, atol=1e-7)


def test_hidden_mse_with_projection_mask_and_weights(rng):
  b, l, d, dt = 2, 5, 3, 4
  s = rng.normal(size=(b, l, d)).astype(np.float32)
  t = rng.normal(size=(b, l, dt)).astype(np.float32)
  kernel = rng.normal(size=(d, dt)).astype(np.float32)
  bias = rng.normal(size=(dt,)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.float32)
  w = np.array([2.0, 0.5], np.float32)
  num = den = 0.0
  for i in range(b):
    for j in range(l):
      if mask[i, j]:
        diff = s[i, j].astype(np.float64) @ kernel + bias - t[i, j]
        num += w[i] * (diff ** 2).sum()
        den += w[i] * dt
  got = dl.hidden_mse(s, t, projection_dD=kernel, bias_D=bias, mask_bl=mask, weight_b=w)
  np.testing.assert_allclose(got, num / den, rtol=RTOL)
  np.testing.assert_allclose(
      dl.embedding_mse(s, t, projection_dD=kernel, bias_D=bias, mask_bl=mask, weight_b=w),
      got, rtol=0)
  with pytest.raises(ValueError, match=r"pass projection_dD of shape \[3, 4\]"):
    dl.hidden_mse(s, t)
  with pytest.raises(ValueError, match="projection kernel must have shape"):
    dl.hidden_mse(s, t, projection_dD=kernel.T)


def test_attention_mse_padding_does_not_contribute(rng):
  b, h, length = 2, 3, 4
  s = rng.normal(size=(b, h, length, length)).astype(np.float32)
  t = rng.normal(size=(b, h, length, length)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], np.float32)
  w = np.array([1.5, 1.0], np.float32)
  num = den = 0.0
  for i in range(b):
    for q in range(length):
      for k in range(length):
        if mask[i, q] and mask[i, k]:
          num += w[i] * ((s[i, :, q, k].astype(np.float64) - t[i, :, q, k]) ** 2).sum()
          den += w[i] * h
  # Padded key scores hold -inf in both, as masked scores do before softmax.
  s_inf, t_inf = s.copy(), t.copy()
  s_inf[0, :, :, 3] = -np.inf
  t_inf[0, :, :, 3] = -1e9
  s_inf[0, :, 3, :] = np.nan
  loss_fn = lambda x: dl.attention_mse(x, t_inf, attention_mask_bk=mask, weight_b=w)
  np.testing.assert_allclose(loss_fn(s_inf), num / den, rtol=RTOL)
  g = jax.grad(loss_fn)(s_inf)
  assert np.all(np.isfinite(g))
  assert np.all(g[0, :, :, 3] == 0) and np.all(g[0, :, 3, :] == 0)
  np.testing.assert_allclose(dl.attention_mse(s, t), ((s - t) ** 2).mean(), rtol=RTOL)
  with pytest.raises(ValueError, match="heads and lengths must match"):
    dl.attention_mse(s[:, :2], t)
  with pytest.raises(ValueError, match="attention_mask_bk must be"):
    dl.attention_mse(s, t, attention_mask_bk=mask[:, :3])


def test_pkd_patient_loss_matches_numpy(rng):
  n, b, d = 3, 4, 5
  s = rng.normal(size=(n, b, d)).astype(np.float32)
  t = rng.normal(size=(n, b, d)).astype(np.float32)
  w = rng.random(b).astype(np.float32)
  s64, t64 = s.astype(np.float64), t.astype(np.float64)
  diff = (s64 / np.linalg.norm(s64, axis=-1, keepdims=True)
          - t64 / np.linalg.norm(t64, axis=-1, keepdims=True))
  # Paper form: per example, sum over layers of squared L2 distances; ours is / (n d).
  per_example = (diff ** 2).sum(axis=(0, 2))
  want = (w * per_example).sum() / w.sum() / (n * d)
  np.testing.assert_allclose(dl.pkd_patient_loss(s, t, weight_b=w), want, rtol=RTOL)
  np.testing.assert_allclose(dl.pkd_patient_loss(list(s), list(t), weight_b=w), want,
                             rtol=RTOL)
  with pytest.raises(ValueError, match="expected \\[layers, batch, width\\]"):
    dl.pkd_patient_loss(s[0], t[0])


def test_cosine_hidden_loss_matches_numpy(rng):
  s = rng.normal(size=(2, 3, 4)).astype(np.float32)
  t = rng.normal(size=(2, 3, 4)).astype(np.float32)
  mask = np.array([[1, 0, 1], [1, 1, 0]], np.float32)
  s64, t64 = s.astype(np.float64), t.astype(np.float64)
  cos = (s64 * t64).sum(-1) / np.linalg.norm(s64, axis=-1) / np.linalg.norm(t64, axis=-1)
  want = ((1 - cos) * mask).sum() / mask.sum()
  np.testing.assert_allclose(dl.cosine_hidden_loss(s, t, mask_bl=mask), want, rtol=RTOL)
  # A zero student vector has a finite gradient.
  s[0, 0] = 0
  g = jax.grad(lambda x: dl.cosine_hidden_loss(x, t, mask_bl=mask))(s)
  assert np.all(np.isfinite(g))


def test_hidden_projection_module_applies_project(rng):
  x = rng.normal(size=(2, 3, 4)).astype(np.float32)
  module = dl.HiddenProjection(features=6)
  variables = module.init(jax.random.key(0), x)
  kernel = variables["params"]["kernel"]
  assert kernel.names == (None, "embed")
  y = module.apply(variables, x)
  want = x.astype(np.float64) @ np.asarray(kernel.value) + np.asarray(
      variables["params"]["bias"].value)
  np.testing.assert_allclose(y, want, rtol=RTOL, atol=1e-6)


def test_loss_gradients_match_finite_differences(rng):
  b, l, c, d, dt, h = 2, 3, 4, 3, 4, 2
  t_logits = rng.normal(size=(b, l, c))
  y = rng.integers(0, c, size=(b, l))
  mask = np.array([[1, 1, 0], [1, 1, 1]], np.float64)
  w = np.array([0.7, 1.3])
  t_hidden = rng.normal(size=(b, l, dt))
  kernel = rng.normal(size=(d, dt))
  t_att = rng.normal(size=(b, h, l, l))
  t_cls = rng.normal(size=(2, b, dt))
  check_grad(lambda s: dl.kd_loss(s, t_logits, y, temperature=2.0, alpha=0.6, mask=mask,
                                  weight_b=w), rng.normal(size=(b, l, c)))
  check_grad(lambda s: dl.soft_cross_entropy(s, t_logits, temperature=2.0, mask=mask,
                                             weight_b=w), rng.normal(size=(b, l, c)))
  check_grad(lambda s: dl.hidden_mse(s, t_hidden, projection_dD=kernel, mask_bl=mask,
                                     weight_b=w), rng.normal(size=(b, l, d)))
  check_grad(lambda k: dl.hidden_mse(jnp.asarray(t_hidden[..., :d]), t_hidden,
                                     projection_dD=k, mask_bl=mask), kernel)
  check_grad(lambda s: dl.attention_mse(s, t_att, attention_mask_bk=mask, weight_b=w),
             rng.normal(size=(b, h, l, l)))
  check_grad(lambda s: dl.pkd_patient_loss(s, t_cls, weight_b=w),
             rng.normal(size=(2, b, dt)))
  check_grad(lambda s: dl.cosine_hidden_loss(s, t_hidden, projection_dD=kernel,
                                             mask_bl=mask, weight_b=w),
             rng.normal(size=(b, l, d)))
