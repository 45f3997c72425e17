"""Causal-LM training: the loss is transformers' shifted next-token cross-entropy, and
the TrainStep learns."""

import os

import jax
import numpy as np
import optax

import etjax.models as models
from etjax.algorithms import causal_lm

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "models", "fixtures", "tiny_gpt2")


def _data():
  e = dict(np.load(os.path.join(FIXTURE, "expected.npz")))
  return e, {"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]}


def test_targets_shift_left_and_skip_padding():
  ids = np.array([[5, 6, 7, 8], [9, 10, 0, 0]])
  mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]])
  np.testing.assert_array_equal(causal_lm.next_token_targets(ids, mask),
                                [[6, 7, 8, -100], [10, -100, -100, -100]])


def test_loss_equals_cross_entropy_of_transformers_logits():
  """The loss on our model equals, in numpy, the mean cross-entropy of transformers'
  logits at position t against token t + 1 over real tokens (as GPT2LMHeadModel with
  labels=input_ids, padding labelled -100)."""
  module, params = models.from_pretrained(FIXTURE)
  e, batch = _data()
  loss, aux = causal_lm.causal_lm_loss(module)(params, batch, jax.random.PRNGKey(0), True)
  logits = e["logits"][:, :-1].astype(np.float64)
  targets = e["input_ids"][:, 1:]
  counted = e["attention_mask"][:, 1:] != 0
  log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  picked = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  want = (log_z - picked)[counted].mean()
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  assert 0.0 <= float(aux["token_accuracy"]) <= 1.0


def test_causal_lm_step_learns_a_repeated_batch():
  module, params = models.from_pretrained(FIXTURE)
  _, batch = _data()
  step = causal_lm.causal_lm(module, optax.adam(1e-2), pretrained=params)
  state = step.init(jax.random.PRNGKey(0), batch)
  update = jax.jit(step.update)
  losses = []
  for _ in range(30):
    state, metrics = update(state, batch)
    losses.append(float(metrics["loss"]))
  # A fixed batch is memorised: the loss falls below a tenth of its start.
  assert losses[-1] < 0.1 * losses[0], losses
