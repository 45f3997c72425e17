"""A Trainer that prepares batches ahead (prefetch) on bucketed, length-grouped grain
batches resumes to the parameters of an uninterrupted run without prefetch."""

from __future__ import annotations

import jax
import numpy as np

import toy_task
from etjax.algorithms.step import unbox
from etjax.data import pipeline
from etjax.sharding.mesh import make_mesh
from etjax.train.trainer import Trainer

STEP = toy_task.make_train_step(total_steps=20)


def _iterator():
  # Length-grouped windows of 3 batches, cut to 4 or 8 tokens: the saved position
  # may fall inside a window.
  return pipeline.train_iterator(toy_task.make_examples(48, seed=0), 8, seed=3,
                                 buckets=(4, 8), group_batches=3)


def _fit(workdir, num_steps, prefetch):
  trainer = Trainer(STEP, workdir=str(workdir), num_steps=num_steps, progress=False,
                    log_every=2, prefetch=prefetch, compilation_cache=None,
                    mesh=make_mesh({"data": 1}, devices=jax.devices()[:1]))
  return trainer.fit(_iterator())


def _params(state):
  return [np.asarray(x) for x in jax.tree.leaves(unbox(state.params))]


def test_trainer_with_prefetch_resumes_exactly(tmp_path):
  straight = _fit(tmp_path / "a", 8, prefetch=0)
  assert _fit(tmp_path / "b", 4, prefetch=3).step == 4
  resumed = _fit(tmp_path / "b", 8, prefetch=3)
  assert resumed.step == 8
  for a, b in zip(_params(straight.state), _params(resumed.state)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(jax.random.key_data(straight.state.rng),
                                jax.random.key_data(resumed.state.rng))
