"""A linear-chain conditional random field: log-likelihood, Viterbi, BIO constraints.

The score of a tag path y_0..y_{n-1} over emissions x (n = the sequence's length) is

    start[y_0] + sum_t emissions[t, y_t] + sum_{t>=1} transitions[y_{t-1}, y_t]
    + end[y_{n-1}]

and log p(y | x) = score(y) - log Z, with log Z the log-sum-exp over every path
(the forward algorithm). Sequences are right-padded: `mask_bl` is 1 on a prefix of
each row. A row of length 0 has log Z = 0 and an empty best path (all padding).

Constrained decoding: `bio_allowed(tags)` marks the transitions a BIO scheme permits
(I-X only after B-X or I-X, never first); `constrain` gives those that are not
allowed the score DISALLOWED, large and finite so that a gold path breaking the
scheme in the data keeps a finite (very low) likelihood instead of a NaN loss.
"""

from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

DISALLOWED = -10000.0


def bio_allowed(tags: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Which (start, transition, end) moves a BIO tag set allows.

  Args:
    tags: tag names such as 'O', 'B-URL', 'I-URL' (anything else is treated like 'O').

  Returns:
    (start_t, transitions_tt, end_t) boolean arrays: I-X may not start a sequence and
    may follow only B-X or I-X; every other move is allowed.
  """
  num = len(tags)
  start = np.ones(num, bool)
  trans = np.ones((num, num), bool)
  for j, tag in enumerate(tags):
    if tag.startswith("I-"):
      kind = tag[2:]
      start[j] = False
      for i, prev in enumerate(tags):
        trans[i, j] = prev in (f"B-{kind}", f"I-{kind}")
  return start, trans, np.ones(num, bool)


def constrain(start_t, transitions_tt, end_t, allowed) -> tuple:
  """The scores with disallowed moves set to DISALLOWED (`allowed` from bio_allowed,
  or None to leave them as they are)."""
  if allowed is None:
    return start_t, transitions_tt, end_t
  a_start, a_trans, a_end = (jnp.asarray(a) for a in allowed)
  return (jnp.where(a_start, start_t, DISALLOWED),
          jnp.where(a_trans, transitions_tt, DISALLOWED),
          jnp.where(a_end, end_t, DISALLOWED))


def path_score(emissions_blt, tags_bl, mask_bl, transitions_tt, start_t, end_t):
  """The unnormalised score of the given tag paths: float [B]."""
  mask_bl = mask_bl.astype(emissions_blt.dtype)
  tags_bl = tags_bl.astype(jnp.int32)
  emit_bl = jnp.take_along_axis(emissions_blt, tags_bl[..., None], axis=-1)[..., 0]
  score_b = (emit_bl * mask_bl).sum(-1)
  trans_bl = transitions_tt[tags_bl[:, :-1], tags_bl[:, 1:]]
  score_b += (trans_bl * mask_bl[:, 1:]).sum(-1)
  lengths_b = mask_bl.sum(-1).astype(jnp.int32)
  has_any_b = lengths_b > 0
  first_b = start_t[tags_bl[:, 0]]
  last_b = end_t[jnp.take_along_axis(tags_bl, jnp.maximum(lengths_b - 1, 0)[:, None],
                                     axis=1)[:, 0]]
  return score_b + jnp.where(has_any_b, first_b + last_b, 0.0)


def log_partition(emissions_blt, mask_bl, transitions_tt, start_t, end_t):
  """log Z by the forward algorithm: float [B] (0 for an empty row)."""
  mask_bl = mask_bl.astype(bool)
  alpha_bt = start_t[None] + emissions_blt[:, 0]

  def step(alpha_bt, inputs):
    emit_bt, valid_b = inputs
    scores_bij = alpha_bt[:, :, None] + transitions_tt[None]
    new_bt = jax.nn.logsumexp(scores_bij, axis=1) + emit_bt
    return jnp.where(valid_b[:, None], new_bt, alpha_bt), None

  alpha_bt, _ = jax.lax.scan(step, alpha_bt, (jnp.swapaxes(emissions_blt[:, 1:], 0, 1),
                                              jnp.swapaxes(mask_bl[:, 1:], 0, 1)))
  log_z_b = jax.nn.logsumexp(alpha_bt + end_t[None], axis=-1)
  return jnp.where(mask_bl[:, 0], log_z_b, 0.0)


def log_likelihood(emissions_blt, tags_bl, mask_bl, transitions_tt, start_t, end_t):
  """log p(tags | emissions) per row: float [B]."""
  return (path_score(emissions_blt, tags_bl, mask_bl, transitions_tt, start_t, end_t)
          - log_partition(emissions_blt, mask_bl, transitions_tt, start_t, end_t))


def viterbi(emissions_blt, mask_bl, transitions_tt, start_t, end_t):
  """The best tag path of each row and its score.

  Returns:
    (tags_bl int32 [B, L], 0 at padding; score_b float [B]).
  """
  mask_bl = mask_bl.astype(bool)
  num_tags = emissions_blt.shape[-1]
  delta_bt = start_t[None] + emissions_blt[:, 0]
  identity_bt = jnp.broadcast_to(jnp.arange(num_tags, dtype=jnp.int32),
                                 delta_bt.shape)

  def forward(delta_bt, inputs):
    emit_bt, valid_b = inputs
    scores_bij = delta_bt[:, :, None] + transitions_tt[None]
    back_bt = jnp.argmax(scores_bij, axis=1).astype(jnp.int32)
    new_bt = jnp.max(scores_bij, axis=1) + emit_bt
    # Past a row's end the best tag carries over unchanged (identity pointers).
    return (jnp.where(valid_b[:, None], new_bt, delta_bt),
            jnp.where(valid_b[:, None], back_bt, identity_bt))

  delta_bt, back_lbt = jax.lax.scan(
      forward, delta_bt, (jnp.swapaxes(emissions_blt[:, 1:], 0, 1),
                          jnp.swapaxes(mask_bl[:, 1:], 0, 1)))
  final_bt = delta_bt + end_t[None]
  last_b = jnp.argmax(final_bt, axis=-1).astype(jnp.int32)

  def backward(tag_b, back_bt):
    prev_b = jnp.take_along_axis(back_bt, tag_b[:, None], axis=1)[:, 0]
    return prev_b, tag_b

  first_b, later_lb = jax.lax.scan(backward, last_b, back_lbt, reverse=True)
  tags_bl = jnp.concatenate([first_b[:, None], jnp.swapaxes(later_lb, 0, 1)], axis=1)
  tags_bl = jnp.where(mask_bl, tags_bl, 0)
  score_b = jnp.where(mask_bl[:, 0], jnp.max(final_bt, axis=-1), 0.0)
  return tags_bl, score_b


class CRF(nn.Module):
  """CRF parameters (transitions [T, T], start [T], end [T]) and their uses.

  `allowed` (from `bio_allowed`) fixes the disallowed moves to DISALLOWED in both the
  likelihood and the decoding.
  """
  num_tags: int
  allowed: Optional[tuple] = None

  def setup(self):
    init = nn.initializers.zeros
    self.transitions = self.param(
        "transitions", nn.with_logical_partitioning(init, ("classes", None)),
        (self.num_tags, self.num_tags), jnp.float32)
    self.start = self.param("start", nn.with_logical_partitioning(init, ("classes",)),
                            (self.num_tags,), jnp.float32)
    self.end = self.param("end", nn.with_logical_partitioning(init, ("classes",)),
                          (self.num_tags,), jnp.float32)

  def scores(self):
    return constrain(self.start, self.transitions, self.end, self.allowed)

  def log_likelihood(self, emissions_blt, tags_bl, mask_bl):
    """log p(tags | emissions): float32 [B]."""
    start, trans, end = self.scores()
    return log_likelihood(emissions_blt.astype(jnp.float32), tags_bl, mask_bl, trans,
                          start, end)

  def decode(self, emissions_blt, mask_bl):
    """Viterbi: (tags int32 [B, L], score [B])."""
    start, trans, end = self.scores()
    return viterbi(emissions_blt.astype(jnp.float32), mask_bl, trans, start, end)

  def __call__(self, emissions_blt, mask_bl):
    return self.decode(emissions_blt, mask_bl)
