"""REINFORCE: the estimator's mean equals the exact policy gradient on a bandit."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from etjax.algorithms import policy


def sigmoid(x):
  return 1 / (1 + np.exp(-x))


def test_log_prob_entropy_and_sampling():
  z = np.array([-30.0, -1.0, 0.0, 2.0, 30.0], np.float32)
  logp = -np.logaddexp(0, -z.astype(np.float64))  # log sigmoid(z), exact in float64
  log1mp = -np.logaddexp(0, z.astype(np.float64))
  np.testing.assert_allclose(policy.log_prob(z, np.ones(5)), logp, rtol=1e-5)
  np.testing.assert_allclose(policy.log_prob(z, np.zeros(5)), log1mp, rtol=1e-5)
  ent = -(np.exp(logp) * logp + np.exp(log1mp) * log1mp)
  np.testing.assert_allclose(policy.entropy(z), ent, rtol=1e-4, atol=1e-12)
  a = policy.sample_actions(jax.random.key(0), jnp.broadcast_to(jnp.float32(0.8), (40000,)))
  assert a.dtype == jnp.int32
  assert abs(float(a.mean()) - sigmoid(0.8)) < 4 * np.sqrt(0.25 / 40000)


def test_reinforce_loss_gradient_per_sample():
  z = np.array([0.3, -1.2, 2.0], np.float32)
  a = np.array([1, 0, 1])
  r = np.array([1.0, 2.0, -0.5], np.float32)
  mask = np.array([1, 1, 0], np.float32)
  g = jax.grad(policy.reinforce_loss)(z, a, r, 0.25, mask_b=mask)
  np.testing.assert_allclose(g, -mask * (r - 0.25) * (a - sigmoid(z)), rtol=1e-5)
  g_mean = jax.grad(lambda z: policy.reinforce_loss(z, a, 1.5, 0.5, reduction="mean"))(z)
  np.testing.assert_allclose(g_mean, -(1.5 - 0.5) * (a - sigmoid(z)) / 3, rtol=1e-5)
  with pytest.raises(ValueError, match="rewards must be a scalar or"):
    policy.reinforce_loss(z, a, r[:2])
  with pytest.raises(ValueError, match="reduction must be"):
    policy.reinforce_loss(z, a, r, reduction="max")


def bandit_reward(a):
  # Joint, non-additive reward over the batch's three select/skip actions.
  return 1.0 * a[..., 0] - 0.5 * a[..., 1] + 2.0 * a[..., 0] * a[..., 2] + 0.3


def test_estimator_mean_matches_exact_bandit_gradient():
  theta = np.array([0.2, -0.7, 1.1])
  p = sigmoid(theta)
  exact = np.zeros(3)
  expected_reward = 0.0
  for a in itertools.product([0, 1], repeat=3):
    a = np.array(a, np.float64)
    prob = np.prod(np.where(a == 1, p, 1 - p))
    expected_reward += prob * bandit_reward(a)
    exact += prob * bandit_reward(a) * (a - p)  # d/dtheta of prod p^a (1-p)^(1-a)

  def one(baseline, key):
    logits = jnp.asarray(theta, jnp.float32)
    actions = policy.sample_actions(key, logits)
    reward = bandit_reward(actions.astype(jnp.float32))
    grad = -jax.grad(policy.reinforce_loss)(logits, actions, reward, baseline)
    return policy.update_baseline(baseline, reward, decay=0.99), grad

  n = 60000
  keys = jax.random.split(jax.random.key(1), n)
  baseline, grads = jax.jit(lambda k: jax.lax.scan(one, jnp.float32(0.0), k))(keys)
  grads = np.asarray(grads, np.float64)
  stderr = grads.std(axis=0) / np.sqrt(n)
  assert np.all(np.abs(grads.mean(axis=0) - exact) < 4.5 * stderr), (
      grads.mean(axis=0), exact, stderr)
  # The moving average tracks E[R], and lowers the estimator's variance.
  assert abs(float(baseline) - expected_reward) < 0.2
  _, grads0 = jax.jit(jax.vmap(lambda k: one(0.0, k)))(keys)
  assert np.all(np.asarray(grads0).var(axis=0) > grads.var(axis=0))


def test_update_baseline_and_selector_policy():
  np.testing.assert_allclose(policy.update_baseline(1.0, 3.0, decay=0.75), 1.5)
  np.testing.assert_allclose(
      policy.update_baseline(1.0, np.array([2.0, 4.0, 100.0]), decay=0.5,
                             mask_b=np.array([1, 1, 0])), 0.5 + 0.5 * 3.0)
  with pytest.raises(ValueError, match="decay must be in"):
    policy.update_baseline(0.0, 1.0, decay=1.0)
  module = policy.SelectorPolicy(hidden=8)
  x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
  variables = module.init(jax.random.key(0), x)
  logits = module.apply(variables, x)
  assert logits.shape == (5,)
  np.testing.assert_array_equal(logits, 0.0)  # starts at pi = 1/2
