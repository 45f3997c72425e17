"""RTL and MGTL through the one Trainer: {'source', 'target', 'dev'} batches from
etjax.data.streams, sharded over 'batch' on 8 devices, checkpointed with their data
position and resumed bit-identical; evaluated on the target through TrainStep.predict."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from etjax.algorithms import instance_based as ib
from etjax.algorithms.step import unbox
from etjax.data.streams import named_streams
from etjax.models import SequenceClassifier
from etjax.models.bag import BagOfEmbeddings
from etjax.train import Trainer

VOCAB, LENGTH = 40, 8


def _task(n, seed, scores):
  g = np.random.default_rng(seed)
  ids = g.integers(1, VOCAB, (n, LENGTH)).astype(np.int32)
  return {"input_ids": ids, "attention_mask": np.ones_like(ids),
          "token_type_ids": np.zeros_like(ids),
          "labels": (scores[ids].sum(1) > 0).astype(np.int32),
          "domain": np.zeros(n, np.int32), "weight": np.ones(n, np.float32)}


def _streams():
  scores = np.random.default_rng(0).normal(size=VOCAB)
  data = {"source": _task(96, 1, scores), "target": _task(48, 2, scores),
          "dev": _task(48, 3, scores)}
  return named_streams(data, {"source": 16, "target": 8, "dev": 16}, seed=4), scores


class _Stop(Exception):
  pass


class _Stopping:
  """Raises _Stop after `after` batches (a crash); keeps the position methods."""

  def __init__(self, it, after):
    self.it, self.after, self.served = it, after, 0

  def __iter__(self):
    return self

  def __next__(self):
    if self.served == self.after:
      raise _Stop()
    self.served += 1
    return next(self.it)

  def get_state(self):
    return self.it.get_state()

  def set_state(self, state):
    self.it.set_state(state)


def _trainer(workdir, method, num_steps=6):
  clf = SequenceClassifier(BagOfEmbeddings(vocab_size=VOCAB, hidden_size=8),
                           num_labels=2, dropout_rate=0.0)
  step = ib.build_instance_step(method, clf, optax.sgd(0.5), selector_hidden=8)
  return Trainer(step, workdir=str(workdir), num_steps=num_steps, mesh="data=8",
                 checkpoint_every=2, log_every=2, progress=False, tensorboard=False)


def _leaves(state):
  return [jax.random.key_data(x) if jax.numpy.issubdtype(x.dtype, jax.dtypes.prng_key)
          else np.asarray(x) for x in jax.tree.leaves(unbox(state))]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rtl", "mgtl"])
def test_trains_resumes_and_evaluates_through_the_trainer(tmp_path, method):
  straight = _trainer(tmp_path / "a", method).fit(_streams()[0])
  assert straight.step == 6
  assert np.isfinite(straight.train_metrics["reward"])
  with pytest.raises(_Stop):
    _trainer(tmp_path / "b", method).fit(_Stopping(_streams()[0], 3))
  resumed_trainer = _trainer(tmp_path / "b", method)
  resumed = resumed_trainer.fit(_streams()[0])
  assert resumed_trainer.resumed_from == 2
  for a, b in zip(_leaves(straight.state), _leaves(resumed.state)):
    np.testing.assert_array_equal(a, b)
  # The selector moved, so the test would see a wrongly restored selector.
  fresh = _trainer(tmp_path / "c", method).init_state(next(_streams()[0]))
  assert not all(np.array_equal(a, b) for a, b in zip(
      _leaves(fresh.selector_params), _leaves(resumed.state.selector_params)))
  # Target-task evaluation and prediction through TrainStep.predict.
  _, scores = _streams()
  test = _task(40, 9, scores)
  batches = [{k: v[i:i + 8] for k, v in test.items()} for i in range(0, 40, 8)]
  metrics = resumed_trainer.evaluate(resumed.state, batches)
  assert metrics["num_examples"] == 40 and 0.0 <= metrics["accuracy"] <= 1.0
  out = resumed_trainer.predict(resumed.state, batches)
  assert out["logits"].shape == (40, 2) and out["select_prob"].shape == (40,)
