"""Continued MLM pretraining (etjax.train.dapt) on a tiny BERT, through the Trainer,
handing its encoder to fine-tuning."""

import os

import jax
import numpy as np
import optax
import pytest

import etjax.models as models
from etjax import algorithms
from etjax.data import tokenizers
from etjax.train import dapt

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "models", "fixtures", "tiny_bert")
TEXTS = ["the quick brown fox jumps over the lazy dog", "a lazy dog sleeps all day",
         "foxes are quick and brown", "dogs chase foxes over the hills",
         "the hills are quiet at night", "brown dogs and quick foxes"] * 4


def _tokenizer():
  # The fixture's vocabulary has 99 ids; a WordPiece vocabulary of the texts fits it.
  return tokenizers.build_wordpiece_tokenizer(TEXTS, vocab_size=99)


@pytest.mark.slow
def test_continue_pretraining_hands_a_changed_encoder_to_fine_tuning(tmp_path):
  encoder, params = models.from_pretrained(FIXTURE)
  tokenizer = _tokenizer()
  assert tokenizer.mask_id is not None and tokenizer.vocab_size <= 99
  kw = dict(workdir=str(tmp_path / "mlm"), num_steps=6, batch_size=8, max_length=16,
            learning_rate=1e-3, whole_word=True)
  result = dapt.continue_pretraining(encoder, params, TEXTS, tokenizer, **kw)
  assert np.isfinite(result.train_metrics["loss"])
  assert set(result.head) == {"transform", "norm", "bias"}
  # Same tree as the encoder's, with new values (the pooler, which MLM does not use,
  # is carried through to the next stage).
  assert jax.tree.structure(result.params) == jax.tree.structure(params)
  used = {k: v for k, v in result.params.items() if k != "pooler"}
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), used,
                         {k: params[k] for k in used})
  assert all(jax.tree.leaves(changed)), changed
  np.testing.assert_array_equal(result.params["pooler"]["bias"], params["pooler"]["bias"])
  # The next stage starts from it.
  classifier = models.SequenceClassifier(encoder, num_labels=2)
  step = algorithms.finetune(classifier, optax.sgd(0.1),
                             pretrained={"encoder": result.params})
  batch = tokenizer.encode(TEXTS[:8], max_length=16)
  state = step.init(jax.random.PRNGKey(0), batch)
  np.testing.assert_array_equal(
      algorithms.unbox(state.params["encoder"]["pooler"]["kernel"]),
      result.params["pooler"]["kernel"])
  # A finished stage resumes as done: the same parameters come back.
  again = dapt.continue_pretraining(encoder, params, TEXTS, tokenizer, **kw)
  jax.tree.map(np.testing.assert_array_equal, again.params, result.params)


def test_a_tokenizer_without_mask_token_is_refused(tmp_path):
  encoder, params = models.from_pretrained(FIXTURE)
  tokenizer = _tokenizer()
  tokenizer.mask_id = None
  with pytest.raises(ValueError, match="needs a mask token"):
    dapt.continue_pretraining(encoder, params, TEXTS, tokenizer,
                              workdir=str(tmp_path), num_steps=1)
