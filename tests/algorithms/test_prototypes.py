"""Class prototypes, typicality scores/weights and domain corruption vs numpy."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from etjax.algorithms import prototypes as pt


def np_prototypes(h, y, dom, mask, c, k):
  protos = np.zeros((k, c, h.shape[1]))
  counts = np.zeros((k, c))
  for i in range(len(h)):
    if mask[i]:
      protos[dom[i], y[i]] += h[i]
      counts[dom[i], y[i]] += 1
  nz = counts > 0
  protos[nz] /= counts[nz][:, None]
  return protos, counts


def np_cos(a, b):
  return a @ b / (np.linalg.norm(a) * np.linalg.norm(b))


@pytest.fixture
def data():
  rng = np.random.default_rng(0)
  b, d, c, k = 12, 5, 3, 3
  h = rng.normal(size=(b, d)).astype(np.float32)
  y = rng.integers(0, c, size=b).astype(np.int32)
  dom = rng.integers(0, k, size=b).astype(np.int32)
  y[:3], dom[:3] = 2, [0, 1, 2]  # class 2 in every domain
  y[3], dom[3] = 1, 0  # make class 1 appear only in domain 0 (below)
  y[4:][y[4:] == 1] = 0
  mask = np.ones(b, np.float32)
  mask[-1] = 0
  return h, y, dom, mask, c, k


def test_class_prototypes_match_numpy(data):
  h, y, dom, mask, c, k = data
  protos, counts = pt.class_prototypes(h, y, dom, num_classes=c, num_domains=k,
                                       mask_b=mask)
  want_p, want_n = np_prototypes(h.astype(np.float64), y, dom, mask, c, k)
  np.testing.assert_allclose(counts, want_n)
  np.testing.assert_allclose(protos, want_p, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=r"labels_b must have shape \[batch\]"):
    pt.class_prototypes(h, y[:-1], dom, num_classes=c, num_domains=k)


@pytest.mark.parametrize("own", [0.0, 0.3])
def test_typicality_scores_match_numpy(data, own):
  h, y, dom, mask, c, k = data
  protos, counts = pt.class_prototypes(h, y, dom, num_classes=c, num_domains=k,
                                       mask_b=mask)
  got = pt.typicality_scores(h, y, dom, protos, counts, own_domain_weight=own)
  p64, n64 = np_prototypes(h.astype(np.float64), y, dom, mask, c, k)
  want = np.zeros(len(h))
  for i in range(len(h)):
    others = [np_cos(h[i], p64[kk, y[i]]) for kk in range(k)
              if kk != dom[i] and n64[kk, y[i]] > 0]
    other = np.mean(others) if others else 0.0
    own_term = np_cos(h[i], p64[dom[i], y[i]]) if n64[dom[i], y[i]] > 0 else 0.0
    want[i] = own * own_term + (1 - own) * other
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert float(got[3]) == pytest.approx(own * np_cos(h[3], p64[0, 1]), abs=1e-6)


def test_typicality_weights():
  scores = np.array([0.9, -0.2, 0.4, 0.1], np.float32)
  mask = np.array([1, 1, 1, 0], np.float32)
  got = pt.typicality_weights(scores, temperature=0.5, mask_b=mask)
  e = np.exp(scores[:3].astype(np.float64) / 0.5)
  np.testing.assert_allclose(got, np.r_[3 * e / e.sum(), 0.0], rtol=1e-5)
  g = jax.grad(lambda s: pt.typicality_weights(s).sum())(scores)
  assert np.all(g == 0)  # constants for the loss
  with pytest.raises(ValueError, match="temperature must be > 0"):
    pt.typicality_weights(scores, temperature=0)


def test_corrupt_domains_rate_and_uniform_other_domain():
  k, n, rate = 4, 40000, 0.3
  dom = np.arange(n, dtype=np.int32) % k
  out = np.asarray(pt.corrupt_domains(jax.random.key(0), dom, num_domains=k, rate=rate))
  changed = out != dom
  # Binomial: 4 standard errors.
  assert abs(changed.mean() - rate) < 4 * np.sqrt(rate * (1 - rate) / n)
  assert out.min() >= 0 and out.max() < k
  # Among corrupted labels of domain 0, each other domain is equally likely.
  picks = out[changed & (dom == 0)]
  freq = np.bincount(picks, minlength=k) / len(picks)
  assert freq[0] == 0
  np.testing.assert_allclose(freq[1:], 1 / 3, atol=4 * np.sqrt(2 / 9 / len(picks)))
  np.testing.assert_array_equal(
      pt.corrupt_domains(jax.random.key(0), dom, num_domains=k, rate=0.0), dom)
  with pytest.raises(ValueError, match="needs num_domains >= 2"):
    pt.corrupt_domains(jax.random.key(0), dom, num_domains=1, rate=0.5)
  with pytest.raises(ValueError, match="rate must be in"):
    pt.corrupt_domains(jax.random.key(0), dom, num_domains=k, rate=1.5)
