"""finetune / step_from_loss: losses against numpy, pretrained merging, a smoke run."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import etjax.algorithms as algorithms
import etjax.models as models


def _batch(rng, batch=8, length=12, vocab=60, classes=3, pairs=False):
  types = np.zeros((batch, length), np.int32)
  if pairs:
    types[:, length // 2:] = 1
  return {"input_ids": rng.integers(1, vocab, (batch, length)).astype(np.int32),
          "attention_mask": np.ones((batch, length), np.int32),
          "token_type_ids": types,
          "labels": rng.integers(0, classes, batch).astype(np.int32),
          "weight": np.ones(batch, np.float32)}


def _classifier(classes=3):
  config = models.get_config("bert-tiny", vocab_size=60, num_layers=2, hidden_dropout=0.0,
                             attention_dropout=0.0)
  return models.SequenceClassifier(models.module_for(config), num_labels=classes,
                                   dropout_rate=0.0)


def test_weighted_cross_entropy_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 4)).astype(np.float32)
  labels = rng.integers(0, 4, 6)
  weights = np.array([1, 0, 1, 0.5, 1, 0], np.float32)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expected = -(log_probs[np.arange(6), labels] * weights).sum() / weights.sum()
  got = algorithms.weighted_cross_entropy(jnp.asarray(logits), jnp.asarray(labels),
                                          jnp.asarray(weights))
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  accuracy = ((logits.argmax(-1) == labels) * weights).sum() / weights.sum()
  np.testing.assert_allclose(algorithms.weighted_accuracy(logits, labels, weights),
                             accuracy, rtol=1e-6)


@pytest.mark.parametrize("pairs", [False, True])
def test_finetune_step_lowers_the_loss(pairs):
  model = _classifier()
  tx = algorithms.make_optimizer("adamw", learning_rate=3e-3, total_steps=20)
  step = algorithms.finetune(model, tx)
  batch = _batch(np.random.default_rng(1), pairs=pairs)
  state = step.init(jax.random.PRNGKey(0), batch)
  update = jax.jit(step.update)
  first = None
  for _ in range(8):
    state, metrics = update(state, batch)
    first = float(metrics["loss"]) if first is None else first
  assert int(state.step) == 8
  assert float(metrics["loss"]) < first
  assert step.predict(state, batch)["logits"].shape == (8, 3)


def test_pretrained_encoder_weights_are_used_and_head_is_fresh():
  model = _classifier()
  batch = _batch(np.random.default_rng(2))
  encoder_params = nn.meta.unbox(model.init(jax.random.PRNGKey(5), batch["input_ids"])
                                 ["params"]["encoder"])
  params = algorithms.init_params(model, jax.random.PRNGKey(0), batch,
                                  pretrained={"encoder": encoder_params})
  plain = nn.meta.unbox(params)
  jax.tree.map(np.testing.assert_array_equal, plain["encoder"], encoder_params)
  assert isinstance(params["encoder"]["pooler"]["kernel"], nn.LogicallyPartitioned)
  assert "classifier" in plain


def test_pretrained_shape_mismatch_is_named():
  model = _classifier()
  batch = _batch(np.random.default_rng(3))
  bad = {"encoder": {"pooler": {"kernel": np.zeros((3, 3), np.float32)}}}
  with pytest.raises(ValueError, match="params/encoder/pooler/kernel has shape"):
    algorithms.init_params(model, jax.random.PRNGKey(0), batch, pretrained=bad)
  with pytest.raises(ValueError, match="params/encoder/typo"):
    algorithms.init_params(model, jax.random.PRNGKey(0), batch,
                           pretrained={"encoder": {"typo": np.zeros(2)}})
