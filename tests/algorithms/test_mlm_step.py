"""MLM masking (BERT's 80/10/10 rule, checked on counts), whole words, the MLM step."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import etjax.models as models
from etjax.algorithms import mlm
from etjax.algorithms.step import unbox

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "models", "fixtures")
VOCAB, MASK_ID = 1000, 3
SIGMAS = 5.0  # every count must lie within 5 binomial standard deviations (fixed)


def _within(count, n, p):
  """|count - n p| <= SIGMAS * sqrt(n p (1 - p))."""
  return abs(count - n * p) <= SIGMAS * np.sqrt(n * p * (1 - p))


def test_the_80_10_10_rule_on_counts():
  rng = np.random.default_rng(0)
  ids = rng.integers(4, VOCAB, size=(256, 512)).astype(np.int32)
  maskable = rng.random(ids.shape) < 0.9
  inputs, targets = jax.jit(lambda k: mask_and_count(k, ids, maskable))(
      jax.random.PRNGKey(0))
  inputs, targets = np.asarray(inputs), np.asarray(targets)
  selected = targets != mlm.IGNORE
  # Only maskable positions are selected, and the targets are the original tokens.
  assert not selected[~maskable].any()
  np.testing.assert_array_equal(targets[selected], ids[selected])
  np.testing.assert_array_equal(inputs[~selected], ids[~selected])
  n = int(maskable.sum())
  s = int(selected.sum())
  assert _within(s, n, 0.15), (s, n)
  # A random replacement may draw [MASK] or the original token (1/VOCAB each).
  to_mask = int((inputs[selected] == MASK_ID).sum())
  kept = int((inputs[selected] == ids[selected]).sum())
  other = s - to_mask - kept
  assert _within(to_mask, s, 0.8 + 0.1 / VOCAB), to_mask
  assert _within(kept, s, 0.1 + 0.1 / VOCAB), kept
  assert _within(other, s, 0.1 * (1 - 2 / VOCAB)), other
  # Random replacements are uniform over the vocabulary: half fall in its lower half.
  changed = inputs[selected & (inputs != MASK_ID) & (inputs != ids)]
  assert _within(int((changed < VOCAB // 2).sum()), changed.size, 0.5)


def mask_and_count(key, ids, maskable):
  return mlm.mask_tokens(key, ids, maskable, vocab_size=VOCAB, mask_id=MASK_ID)


def test_whole_word_masking_selects_words():
  rng = np.random.default_rng(1)
  batch, length = 64, 256
  # Words of 1-4 pieces: word_start holds each piece's word's first position.
  word_start = np.zeros((batch, length), np.int32)
  for row in word_start:
    pos = 0
    while pos < length:
      size = int(rng.integers(1, 5))
      row[pos:pos + size] = pos
      pos += size
  ids = rng.integers(4, VOCAB, size=(batch, length)).astype(np.int32)
  maskable = np.ones_like(ids, bool)
  _, targets = mlm.mask_tokens(jax.random.PRNGKey(2), ids, maskable, vocab_size=VOCAB,
                               mask_id=MASK_ID, word_start=word_start)
  selected = np.asarray(targets) != mlm.IGNORE
  # Every piece of a word shares its first piece's selection.
  first = np.take_along_axis(selected, word_start, axis=1)
  np.testing.assert_array_equal(selected, first)
  starts = word_start == np.arange(length)
  assert _within(int(selected[starts].sum()), int(starts.sum()), 0.15)


def test_word_starts_from_wordpiece_marks():
  from etjax.data import tokenizers  # pylint: disable=g-import-not-at-top
  texts = ["unaffable unbelievable dogs", "the cats"]
  tokenizer = tokenizers.build_wordpiece_tokenizer(
      texts * 3 + ["un", "affable", "believ", "able", "dog", "s"], vocab_size=60)
  enc = tokenizer.encode(texts, max_length=16)
  starts = mlm.word_starts(enc["input_ids"], tokenizer)
  for row, ids in zip(starts, enc["input_ids"]):
    pieces = [tokenizer.backend.id_to_token(int(i)) for i in ids]
    for pos, piece in enumerate(pieces):
      if pos and piece.startswith("##"):
        assert row[pos] == row[pos - 1]
      else:
        assert row[pos] == pos


def _tiny_mlm():
  with pytest.warns(UserWarning, match="pooler"):
    return models.from_pretrained(os.path.join(FIXTURES, "tiny_bert_mlm"), head="mlm")


def test_mlm_loss_is_the_cross_entropy_at_selected_positions():
  module, params = _tiny_mlm()
  data = dict(np.load(os.path.join(FIXTURES, "tiny_bert_mlm", "expected.npz")))
  batch = {k: data[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
  loss_fn = mlm.mlm_loss(module, vocab_size=99, mask_id=4, special_ids=(0, 1, 2),
                         mask_prob=0.3)
  key = jax.random.PRNGKey(5)
  loss, aux = loss_fn(params, batch, key, True)
  # Rebuild the step's masks from its key, and the loss in numpy.
  mask_rng, _ = jax.random.split(key)
  maskable = ~np.isin(batch["input_ids"], (0, 1, 2)) & (batch["attention_mask"] != 0)
  inputs, targets = mlm.mask_tokens(mask_rng, batch["input_ids"], maskable,
                                    vocab_size=99, mask_id=4, mask_prob=0.3)
  logits = np.asarray(module.apply({"params": params}, inputs, batch["attention_mask"],
                                   batch["token_type_ids"]).logits, np.float64)
  targets = np.asarray(targets)
  sel = targets != mlm.IGNORE
  log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(
      -1, keepdims=True)) - logits.max(-1, keepdims=True)
  want = -log_probs[sel, targets[sel]].mean()
  assert int(aux["num_masked"]) == sel.sum() > 0
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_mlm_step_learns_a_repeated_batch():
  module, params = _tiny_mlm()
  data = dict(np.load(os.path.join(FIXTURES, "tiny_bert_mlm", "expected.npz")))
  batch = {k: data[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
  step = mlm.mlm(module, optax.adam(3e-3), vocab_size=99, mask_id=4,
                 special_ids=(0, 1, 2), pretrained={"encoder": params["encoder"]})
  state = step.init(jax.random.PRNGKey(0), batch)
  # The head starts fresh; the encoder is the given one.
  np.testing.assert_array_equal(
      unbox(state.params["encoder"]["embeddings"]["word"]["embedding"]),
      params["encoder"]["embeddings"]["word"]["embedding"])
  update = jax.jit(step.update)
  losses = []
  for _ in range(60):
    state, metrics = update(state, batch)
    losses.append(float(metrics["loss"]))
  # Fresh masks every step: the loss falls, it is not memorised (measured: the last
  # ten steps' mean at 0.57 of the first ten's).
  assert np.mean(losses[-10:]) < 0.75 * np.mean(losses[:10]), losses


def test_whole_word_needs_word_start():
  module, params = _tiny_mlm()
  loss_fn = mlm.mlm_loss(module, vocab_size=99, mask_id=4, special_ids=(0,),
                         whole_word=True)
  with pytest.raises(ValueError, match="word_start"):
    loss_fn(params, {"input_ids": jnp.ones((1, 4), jnp.int32)}, jax.random.PRNGKey(0))
