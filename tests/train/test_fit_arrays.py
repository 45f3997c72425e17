"""`fit_arrays`: the Trainer on in-memory data equals the plain loop it replaces, for
flat data and for named streams, in float64."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import toy_task
from etjax.algorithms.step import TrainStep
from etjax.train import fit as fit_lib


@pytest.fixture(autouse=True)
def _float64():
  with jax.enable_x64(True):
    yield


def _in_float64(step: TrainStep) -> TrainStep:
  """`step` with every floating leaf of its initial state in float64."""
  def init(rng, batch):
    state = step.init(rng, batch)
    return jax.tree.map(lambda x: x.astype(jnp.float64)
                        if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
  return step._replace(init=init)


def _plain_loop(step, batches, num_steps, seed):
  first = next(batches)
  state = jax.jit(step.init)(jax.random.key(seed), first)
  update = jax.jit(step.update)
  batch = first
  for i in range(num_steps):
    if i:
      batch = next(batches)
    state, _ = update(state, batch)
  return state


def _assert_same_params(a, b):
  flat_a = jax.tree.leaves(jax.device_get(a.params))
  flat_b = jax.tree.leaves(jax.device_get(b.params))
  assert len(flat_a) == len(flat_b)
  for x, y in zip(flat_a, flat_b):
    assert np.asarray(x).dtype == np.float64
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-12, atol=1e-12)


def test_fit_arrays_equals_the_plain_loop_and_evaluates():
  step = _in_float64(toy_task.make_train_step(total_steps=12))
  data = toy_task.make_examples(48, seed=3)
  trainer, result = fit_lib.fit_arrays(step, data, num_steps=12, batch_size=8, seed=5)
  assert result.step == 12
  expected = _plain_loop(step, fit_lib.train_batches(data, 8, seed=5), 12, seed=5)
  _assert_same_params(result.state, expected)
  # Evaluation through the Trainer equals argmax accuracy of the plain predict.
  logits = np.asarray(step.predict(expected, {k: jnp.asarray(v) for k, v in data.items()})
                      ["logits"])
  want = float(np.mean(logits.argmax(-1) == data["labels"]))
  assert fit_lib.accuracy(trainer, result.state, data) == pytest.approx(want, abs=1e-12)
  np.testing.assert_allclose(fit_lib.logits(trainer, result.state, data), logits,
                             rtol=1e-12, atol=1e-12)


def test_fit_arrays_on_named_streams_equals_the_plain_loop():
  inner = _in_float64(toy_task.make_train_step(total_steps=6))

  # A two-stream step: one update on the concatenation of both streams' rows.
  def merge(batch):
    return {k: jnp.concatenate([batch["a"][k], batch["b"][k]]) for k in batch["a"]}

  step = TrainStep(init=lambda rng, batch: inner.init(rng, merge(batch)),
                   update=lambda state, batch: inner.update(state, merge(batch)),
                   predict=inner.predict)
  data = {"a": toy_task.make_examples(40, seed=1), "b": toy_task.make_examples(24, seed=2)}
  sizes = {"a": 8, "b": 4}
  _, result = fit_lib.fit_arrays(step, data, num_steps=6, batch_size=sizes, seed=7)
  expected = _plain_loop(step, fit_lib.train_batches(data, sizes, seed=7), 6, seed=7)
  _assert_same_params(result.state, expected)


def test_fit_arrays_rejects_per_stream_sizes_for_flat_data():
  with pytest.raises(ValueError, match="named streams"):
    fit_lib.fit_arrays(toy_task.make_train_step(), toy_task.make_examples(16, seed=0),
                       num_steps=1, batch_size={"a": 8}, seed=0)


def test_trainers_of_one_step_share_the_compiled_predict():
  """A second Trainer of the same TrainStep compiles neither update nor predict again
  (a paper table's runs and a selection search's trials rely on it)."""
  step = toy_task.make_train_step(total_steps=4)
  data = toy_task.make_examples(32, seed=0)
  compiles, counts = [], []

  def listener(name, _, **unused):
    if "backend_compile" in name:
      compiles.append(name)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    for seed in range(2):
      trainer, result = fit_lib.fit_arrays(step, data, num_steps=2, batch_size=8,
                                           seed=seed, compilation_cache=None)
      fit_lib.accuracy(trainer, result.state, data)
      counts.append(len(compiles))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert counts[0] > 0  # the first run compiled (so the listener sees compiles)
  assert counts[1] == counts[0], f"the second run compiled {counts[1] - counts[0]}"
