"""Shared set-up of the distillation tests: synthetic data, tiny models, a trained teacher.

The teacher is trained once per process (`trained_teacher` is cached), so the KD,
TinyBERT and AdaBERT tests share it.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

import etjax.models as models
from etjax import data as data_lib
from etjax.algorithms.finetune import finetune
from etjax.algorithms import optim
from etjax.algorithms.step import unbox
from etjax.data import synthetic
from etjax.train import fit as fit_lib

MAX_LENGTH = 32
DOMAIN = "electronics"


def classifier(hidden: int, layers: int, vocab: int, heads: int = 2, classes: int = 2,
               dropout: float = 0.0) -> models.SequenceClassifier:
  """A tiny BERT classifier (intermediate 2 * hidden)."""
  config = models.get_config("bert-tiny", vocab_size=vocab, hidden_size=hidden,
                             num_layers=layers, num_heads=heads,
                             intermediate_size=2 * hidden, max_position_embeddings=64,
                             hidden_dropout=dropout, attention_dropout=dropout)
  return models.SequenceClassifier(models.module_for(config), num_labels=classes,
                                   dropout_rate=dropout)


def random_batch(seed: int, batch: int = 8, length: int = 12, vocab: int = 60,
                 classes: int = 3) -> dict:
  """A batch of random ids with some padding at the end of odd rows."""
  rng = np.random.default_rng(seed)
  mask = np.ones((batch, length), np.int32)
  mask[1::2, length - 3:] = 0
  return {"input_ids": (rng.integers(1, vocab, (batch, length)) * mask).astype(np.int32),
          "attention_mask": mask,
          "token_type_ids": np.zeros((batch, length), np.int32),
          "labels": rng.integers(0, classes, batch).astype(np.int32),
          "weight": np.ones(batch, np.float32)}


@functools.lru_cache(maxsize=None)
def synthetic_data(seed: int = 0, teacher_size: int = 1200, labelled_size: int = 40,
                   test_size: int = 400):
  """One domain's reviews, encoded: (tokenizer, {'teacher', 'labelled', 'test'}).

  'teacher' is the large set the teacher learns from (and the student's unlabelled
  transfer set); 'labelled' is the student's few labelled examples.
  """
  splits = synthetic.multi_domain_splits(
      {DOMAIN: (teacher_size, labelled_size, test_size)}, seed=seed)[DOMAIN]
  texts = [ex.text_a for part in splits.values() for ex in part]
  tokenizer = data_lib.build_wordpiece_tokenizer(texts, vocab_size=600)
  encoded = {name: data_lib.encode_examples(splits[split], tokenizer, MAX_LENGTH)
             for name, split in (("teacher", "train"), ("labelled", "dev"),
                                 ("test", "test"))}
  return tokenizer, encoded


# step -> the Trainer that last trained it: `accuracy` reuses its compiled predict.
_TRAINERS: dict = {}


def fit(step, data, num_steps: int, batch_size: int = 32, seed: int = 0):
  """Trains `step` on shuffled batches of `data` with the one Trainer (fit_arrays:
  one device, seed for init and shuffling); returns (final state, train metrics, the
  means over the last logging window)."""
  trainer, result = fit_lib.fit_arrays(step, data, num_steps=num_steps,
                                       batch_size=batch_size, seed=seed)
  _TRAINERS[step] = trainer
  return result.state, result.train_metrics


def accuracy(step, state, data) -> float:
  """Weighted accuracy of `step.predict` over `data`, in [0, 1] (`step` trained by
  `fit`)."""
  if step not in _TRAINERS:
    raise ValueError("distill_fixtures.accuracy: train the step with fit first")
  return fit_lib.accuracy(_TRAINERS[step], state, data)


@functools.lru_cache(maxsize=None)
def trained_teacher(steps: int = 150):
  """A 2-layer, width-64 teacher fine-tuned on the large set.

  Returns:
    (module, plain params, test accuracy).
  """
  tokenizer, encoded = synthetic_data()
  model = classifier(64, 2, tokenizer.vocab_size)
  tx = optim.make_optimizer("adamw", learning_rate=3e-3, total_steps=steps,
                            warmup_steps=10)
  step = finetune(model, tx)
  state, _ = fit(step, encoded["teacher"], steps)
  return model, jax.device_get(unbox(state.params)), accuracy(step, state,
                                                               encoded["test"])
