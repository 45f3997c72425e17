"""Policy-gradient instance selection: a Bernoulli select/skip policy and REINFORCE.

A selector policy maps each source example's features (its representation, the TL
model's prediction and loss, ...) to a logit z_b; the action a_b = 1 selects the
example, a_b = 0 skips it, with pi(a_b = 1) = sigmoid(z_b), independently per example.

REINFORCE with a baseline (Williams 1992): for a reward R (a scalar for the whole
batch, RTL's delayed reward; or one per example, MGTL's immediate plus delayed
rewards) and a baseline b that does not depend on the current actions,

    grad E[R] = E[ sum_b (R_b - b) grad log pi(a_b) ],

estimated from sampled actions by the gradient of the surrogate loss

    L = - sum_b stop_gradient(R_b - b) * log pi(a_b)        (`reinforce_loss`).

The baseline is a moving average of past rewards, b <- d b + (1 - d) mean(R), updated
AFTER the gradient is taken so that it never depends on the current actions (which
keeps the estimator unbiased); it only lowers the variance.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


class SelectorPolicy(nn.Module):
  """A small MLP from example features to select logits.

  Attributes:
    hidden: width of the hidden layer (0 for a linear policy).
  """
  hidden: int = 32

  @nn.compact
  def __call__(self, features_bf: Array) -> Array:
    """Returns [b] select logits z_b."""
    x = jnp.asarray(features_bf, jnp.float32)
    init = lambda names: nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                      names)
    if self.hidden:
      x = nn.tanh(nn.Dense(self.hidden, kernel_init=init((None, None)),
                           bias_init=nn.with_logical_partitioning(
                               nn.initializers.zeros, (None,)))(x))
    # A zero last layer starts the policy at pi = 1/2 for every example.
    out = nn.Dense(1, kernel_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                              (None, None)),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                          (None,)))(x)
    return out[..., 0]


def sample_actions(rng: Array, logits_b: Array) -> Array:
  """Samples a_b ~ Bernoulli(sigmoid(z_b)).

  Returns:
    [b] int32 actions, 1 = select, 0 = skip.
  """
  return jax.random.bernoulli(rng, jax.nn.sigmoid(logits_b)).astype(jnp.int32)


def log_prob(logits_b: Array, actions_b: Array) -> Array:
  """log pi(a_b) = a log sigmoid(z) + (1 - a) log sigmoid(-z), stable for large |z|.

  Returns:
    [b] log-probabilities.
  """
  z = jnp.asarray(logits_b, jnp.float32)
  a = jnp.asarray(actions_b, z.dtype)
  return a * jax.nn.log_sigmoid(z) + (1 - a) * jax.nn.log_sigmoid(-z)


def entropy(logits_b: Array) -> Array:
  """Entropy of each Bernoulli policy, -p log p - (1 - p) log(1 - p).

  Returns:
    [b] entropies (nats), for an exploration bonus.
  """
  z = jnp.asarray(logits_b, jnp.float32)
  # sigmoid(-z) rather than 1 - sigmoid(z): the latter rounds to 0 for large z.
  return -(jax.nn.sigmoid(z) * jax.nn.log_sigmoid(z)
           + jax.nn.sigmoid(-z) * jax.nn.log_sigmoid(-z))


def reinforce_loss(logits_b: Array, actions_b: Array, rewards: Array,
                   baseline: Array | float = 0.0, *, mask_b: Optional[Array] = None,
                   reduction: str = "sum") -> Array:
  """The REINFORCE surrogate; its gradient is minus the policy-gradient estimate.

      L = - sum_b m_b * stop_gradient(R_b - baseline) * log pi(a_b)

  Args:
    logits_b: [b] select logits from the policy (differentiable).
    actions_b: [b] sampled actions (0/1).
    rewards: [] one reward for the batch, or [b] one per example.
    baseline: [] the moving-average baseline.
    mask_b: optional [b]; 0 leaves an example out (padding).
    reduction: "sum" (the joint policy over the batch, as written above) or "mean"
      (divided by the number of valid examples).

  Returns:
    [] the surrogate loss.
  """
  if reduction not in ("sum", "mean"):
    raise ValueError(f"reinforce_loss: reduction must be 'sum' or 'mean', got "
                     f"{reduction!r}")
  logp_b = log_prob(logits_b, actions_b)
  rewards = jnp.asarray(rewards, jnp.float32)
  if rewards.ndim not in (0, 1) or (rewards.ndim == 1 and rewards.shape != logp_b.shape):
    raise ValueError(f"reinforce_loss: rewards must be a scalar or [batch]="
                     f"{logp_b.shape}, got {rewards.shape}")
  advantage_b = jax.lax.stop_gradient(jnp.broadcast_to(rewards - baseline, logp_b.shape))
  m_b = jnp.ones_like(logp_b) if mask_b is None else jnp.asarray(mask_b, jnp.float32)
  loss = -jnp.sum(m_b * advantage_b * logp_b)
  if reduction == "mean":
    loss = loss / jnp.maximum(jnp.sum(m_b), 1.0)
  return loss


def update_baseline(baseline: Array | float, rewards: Array, *, decay: float = 0.9,
                    mask_b: Optional[Array] = None) -> Array:
  """Moving average of rewards: decay * baseline + (1 - decay) * mean(rewards).

  Args:
    baseline: [] the current baseline.
    rewards: [] or [b] rewards just observed.
    decay: in [0, 1).
    mask_b: optional [b] valid examples for per-example rewards.

  Returns:
    [] the new baseline.
  """
  if not 0.0 <= decay < 1.0:
    raise ValueError(f"update_baseline: decay must be in [0, 1), got {decay}")
  r = jnp.asarray(rewards, jnp.float32)
  if r.ndim == 0:
    mean = r
  else:
    m = jnp.ones_like(r) if mask_b is None else jnp.asarray(mask_b, jnp.float32)
    mean = jnp.sum(m * r) / jnp.maximum(jnp.sum(m), 1.0)
  return decay * jnp.asarray(baseline, jnp.float32) + (1.0 - decay) * mean
