"""Checkpointer: sharded round trip, retention, and corrupt/partial steps detected."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

import toy_task
from etjax.sharding import mesh as mesh_lib
from etjax.sharding import partitioning, rules
from etjax.train import checkpoints as ckpt


@pytest.fixture(scope="module")
def states():
  """Three successive toy states (typed rng keys, boxed params, AdamW state)."""
  step = toy_task.make_train_step()
  it = toy_task.ToyIterator()
  batch = next(it)
  state = step.init(jax.random.key(0), batch)
  update = jax.jit(step.update)
  out = []
  for _ in range(3):
    state, _ = update(state, next(it))
    out.append(state)
  abstract = jax.eval_shape(step.init, jax.random.key(0), batch)
  return out, abstract


def _leaves(state):
  return [np.asarray(jax.random.key_data(x) if ckpt._is_key(x) else x)
          for x in jax.tree.leaves(state)]


def _assert_same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(_leaves(a), _leaves(b)):
    np.testing.assert_array_equal(x, y)


def _save_all(directory, states, **kwargs):
  c = ckpt.Checkpointer(directory, keep_last=3, **kwargs)
  for i, s in enumerate(states, start=1):
    c.save(i, s, {"epoch": 0, "index": 8 * i})
  return c


def test_round_trip_lands_on_mesh(tmp_path, states):
  seq, abstract = states
  c = _save_all(str(tmp_path / "ck"), seq)
  mesh = mesh_lib.make_mesh({"data": 2, "model": 4})
  shardings = partitioning.state_shardings(abstract, mesh, rules.get_rules("tp"))
  restored, data_state, step = c.restore(abstract, shardings)
  assert step == 3 and data_state == {"epoch": 0, "index": 24}
  _assert_same(restored, seq[2])
  kernel = restored.params["wi"]["kernel"]
  assert kernel.names == ("embed", "mlp")  # the logical box is rebuilt
  assert kernel.value.sharding == shardings.params["wi"]["kernel"]
  assert kernel.value.sharding.spec == jax.sharding.PartitionSpec(None, "model")
  assert restored.rng.dtype == seq[2].rng.dtype
  earlier, _, _ = c.restore(abstract, shardings, step=1)
  _assert_same(earlier, seq[0])


def _largest_array_file(step_dir):
  files = [os.path.join(r, n) for r, _, ns in os.walk(step_dir) for n in ns
           if "/state/" in os.path.join(r, n) and "/d/" in os.path.join(r, n)]
  return max(files, key=os.path.getsize)


def _truncate(step_dir):
  path = _largest_array_file(step_dir)
  os.truncate(path, os.path.getsize(path) // 2)


def _flip_byte(step_dir):
  # orbax alone restores such a file without complaint, with wrong values.
  path = _largest_array_file(step_dir)
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0xFF
  open(path, "wb").write(bytes(data))


def _delete_array_file(step_dir):
  os.remove(_largest_array_file(step_dir))


def _delete_commit_marker(step_dir):
  os.remove(os.path.join(step_dir, ckpt.INTEGRITY_FILE))


@pytest.mark.parametrize("corrupt", [_truncate, _flip_byte, _delete_array_file,
                                     _delete_commit_marker])
def test_corrupt_latest_falls_back_to_previous_with_warning(tmp_path, states, corrupt):
  seq, abstract = states
  directory = str(tmp_path / "ck")
  c = _save_all(directory, seq)
  corrupt(c.step_dir(3))
  with pytest.warns(RuntimeWarning, match="checkpoint step 3 is corrupt"):
    restored, data_state, step = c.restore(abstract)
  assert step == 2 and data_state["index"] == 16
  _assert_same(restored, seq[1])
  # Set aside, not deleted; step 3 can be written again.
  assert os.listdir(directory + ".corrupt")[0].startswith("3-")
  assert c.all_steps() == [1, 2]
  c.save(3, seq[2])
  _assert_same(c.restore(abstract)[0], seq[2])


def test_explicit_corrupt_step_raises(tmp_path, states):
  seq, abstract = states
  c = _save_all(str(tmp_path / "ck"), seq)
  _truncate(c.step_dir(2))
  with pytest.raises(ckpt.CorruptCheckpointError, match="bytes, expected"):
    c.restore(abstract, step=2)
  with pytest.raises(FileNotFoundError, match="no checkpoint step 7"):
    c.restore(abstract, step=7)


def test_retention_keeps_latest_and_best(tmp_path, states):
  seq, _ = states
  c = ckpt.Checkpointer(str(tmp_path / "ck"), keep_last=1, best_metric="accuracy",
                        keep_best=1)
  accuracies = {1: 0.5, 2: 0.9, 3: 0.7}
  for i in range(1, 7):
    c.save(i, seq[0], metrics={"accuracy": accuracies[i]} if i in accuracies else None)
  assert c.all_steps() == [2, 6]
  assert c.best_step() == 2
  assert c.metrics(2) == {"accuracy": 0.9} and c.metrics(6) == {}
  low = ckpt.Checkpointer(str(tmp_path / "low"), keep_last=1, best_metric="loss",
                          best_mode="min")
  for i, loss in enumerate([0.3, 0.1, 0.2], start=1):
    low.save(i, seq[0], metrics={"loss": loss})
  assert low.all_steps() == [2, 3] and low.best_step() == 2


def test_bad_options():
  with pytest.raises(ValueError, match="keep_last"):
    ckpt.Checkpointer("/tmp/unused-etjax-ck", keep_last=0)
  with pytest.raises(ValueError, match="best_mode"):
    ckpt.Checkpointer("/tmp/unused-etjax-ck", best_mode="best")
