"""Ruder & Plank data selection: features vs numpy/scipy, top-n, optuna search."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
import scipy.spatial.distance
import scipy.stats

from etjax.algorithms import selection as sel


@pytest.fixture
def counts():
  rng = np.random.default_rng(0)
  c = rng.poisson(0.8, size=(6, 12)).astype(np.float32)
  c[0] = 0  # an empty example
  c[1, 0] = 5
  t = rng.poisson(3.0, size=12).astype(np.float32)
  t[3] = 0  # a term the target never uses
  return c, t


def test_similarity_features_match_scipy(counts):
  c, t = counts
  p = np.asarray(sel.term_distributions(c), np.float64)
  q = t / t.sum()
  np.testing.assert_allclose(p[1:], c[1:] / c[1:].sum(1, keepdims=True), rtol=1e-6)
  assert np.all(p[0] == 0)
  for i in range(1, len(c)):
    np.testing.assert_allclose(sel.jensen_shannon(p[i:i + 1], q)[0],
                               scipy.spatial.distance.jensenshannon(p[i], q) ** 2,
                               rtol=1e-5)
    np.testing.assert_allclose(sel.cosine_similarity(p[i:i + 1], q)[0],
                               1 - scipy.spatial.distance.cosine(p[i], q), rtol=1e-5)
    np.testing.assert_allclose(sel.euclidean_distance(p[i:i + 1], q)[0],
                               np.linalg.norm(p[i] - q), rtol=1e-5)
    a = 0.99
    want = np.log(np.sum(p[i] ** a * q ** (1 - a))) / (a - 1)
    np.testing.assert_allclose(sel.renyi_divergence(p[i:i + 1], q, alpha=a)[0], want,
                               rtol=1e-4)
  # Renyi tends to KL as alpha -> 1 (smoothed, so KL is finite).
  ps = np.asarray(sel.term_distributions(c, smoothing=0.1), np.float64)
  qs = np.asarray(sel.term_distributions(t, smoothing=0.1), np.float64)
  np.testing.assert_allclose(sel.renyi_divergence(ps[2:3], qs, alpha=1 - 1e-3)[0],
                             scipy.stats.entropy(ps[2], qs), rtol=2e-3)
  assert np.all(np.isfinite(sel.selection_features(c, t, normalize=False)))
  with pytest.raises(ValueError, match="alpha must be > 0 and != 1"):
    sel.renyi_divergence(p, q, alpha=1.0)


def test_diversity_features_and_standardize(counts):
  c, t = counts
  d = np.asarray(sel.diversity_features(c), np.float64)
  for i in range(1, len(c)):
    p = c[i] / c[i].sum()
    types = (c[i] > 0).sum()
    np.testing.assert_allclose(d[i], [types, types / c[i].sum(), scipy.stats.entropy(p),
                                      (p ** 2).sum()], rtol=1e-5)
  np.testing.assert_array_equal(d[0], 0)
  feats = np.asarray(sel.selection_features(c, np.stack([t, t])), np.float64)
  raw = np.asarray(sel.selection_features(c, 2 * t, normalize=False), np.float64)
  np.testing.assert_allclose(feats, (raw - raw.mean(0)) / raw.std(0), rtol=1e-4, atol=1e-5)
  assert feats.shape == (6, len(sel.FEATURE_NAMES))
  np.testing.assert_array_equal(sel.standardize(np.ones((3, 2))), 0)
  with pytest.raises(ValueError, match="same vocabulary"):
    sel.selection_features(c, t[:5])


def test_scores_and_top_n():
  f = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, 0.5]], np.float32)
  s = sel.selection_scores(f, np.array([2.0, -1.0]))
  np.testing.assert_allclose(s, [2.0, -1.0, 1.0, 0.5])
  np.testing.assert_array_equal(sel.select_top_n(s, 2), [0, 2])
  np.testing.assert_array_equal(sel.select_top_n(np.array([1.0, 3.0, 1.0, 3.0]), 3),
                                [1, 3, 0])
  with pytest.raises(ValueError, match="n must be in 1..4"):
    sel.select_top_n(s, 5)
  with pytest.raises(ValueError, match="3 weights for 2 features"):
    sel.selection_scores(f, np.ones(3))


def synthetic_pool(seed=0, n=200, vocab=40):
  """Half the source examples use the target's vocabulary, half another one."""
  rng = np.random.default_rng(seed)
  target_p = np.r_[rng.dirichlet(np.ones(vocab // 2)), np.zeros(vocab // 2)]
  other_p = np.r_[np.zeros(vocab // 2), rng.dirichlet(np.ones(vocab // 2))]
  relevant = rng.permutation(np.arange(n) < n // 2)
  counts = np.stack([rng.multinomial(rng.integers(5, 30), target_p if r else other_p)
                     for r in relevant])
  target = rng.multinomial(2000, target_p)
  return counts, target, relevant


def test_bayesian_optimization_finds_the_relevant_examples():
  counts, target, relevant = synthetic_pool()
  feats = np.asarray(sel.selection_features(counts, target))
  calls = []

  def evaluate(indices):  # stand-in for the target dev metric: selection precision
    calls.append(len(indices))
    return float(relevant[indices].mean())

  # A wrong sign on a divergence picks the least similar examples.
  wrong = np.zeros(len(sel.FEATURE_NAMES))
  wrong[sel.FEATURE_NAMES.index("jensen_shannon")] = 1.0
  assert evaluate(sel.select_top_n(feats @ wrong, 100)) < 0.1
  result = sel.optimize_selection_weights(feats, evaluate, num_selected=100,
                                          num_trials=25, seed=0)
  assert calls[1:] == [100] * 25
  assert result.value >= 0.95
  assert relevant[result.selected].mean() == result.value
  assert result.weights.shape == (8,)
  assert np.all(np.abs(result.weights) <= 1.0)
  assert len(result.study.trials) == 25
  again = sel.optimize_selection_weights(feats, evaluate, num_selected=100,
                                         num_trials=25, seed=0)
  np.testing.assert_array_equal(again.weights, result.weights)
  other = sel.optimize_selection_weights(
      feats, evaluate, num_selected=50, num_trials=5,
      sampler=optuna.samplers.RandomSampler(seed=1), weight_range=(-2.0, 2.0))
  assert len(other.study.trials) == 5 and other.selected.shape == (50,)
  with pytest.raises(ValueError, match="low < high"):
    sel.optimize_selection_weights(feats, evaluate, num_selected=10, num_trials=2,
                                   weight_range=(1.0, -1.0))
  with pytest.raises(ValueError, match="n must be in"):
    sel.optimize_selection_weights(feats, evaluate, num_selected=0, num_trials=2)
