"""Recipes: stages through the one Trainer, each from the previous stage's parameters;
a run stopped inside a stage resumes there and ends bit-identical to an uninterrupted
one."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from etjax.algorithms.finetune import step_from_loss, weighted_cross_entropy
from etjax.algorithms.recipe import Stage, carry_params
from etjax.algorithms.step import unbox
from etjax.train import logging as log_lib
from etjax.train.recipe import run_recipe, stage_dirs


class _Mlp(nn.Module):
  classes: int

  @nn.compact
  def __call__(self, x_bd):
    lp = nn.with_logical_partitioning
    w_df = self.param("w", lp(nn.initializers.normal(0.5), ("embed", "mlp")),
                      (x_bd.shape[-1], 8))
    v_fc = self.param("head", lp(nn.initializers.normal(0.5), ("mlp", "classes")),
                      (8, self.classes))
    return jnp.tanh(x_bd @ w_df) @ v_fc


def _step(classes, learning_rate):
  model = _Mlp(classes)

  def loss_fn(params, batch, rng, deterministic):
    del rng, deterministic
    logits = model.apply({"params": params}, batch["x"])
    return weighted_cross_entropy(logits, batch["labels"] % classes,
                                  batch["weight"]), {"logits": logits}
  return step_from_loss(loss_fn, lambda rng, b: model.init(rng, b["x"])["params"],
                        optax.adam(learning_rate))


def _data(seed, num=48):
  rng = np.random.default_rng(seed)
  return {"x": rng.standard_normal((num, 5)).astype(np.float32),
          "labels": rng.integers(0, 4, num).astype(np.int32),
          "weight": rng.uniform(0.5, 2.0, num).astype(np.float32)}


class _Batches:
  """Endless shuffled batches of `data` with a JSON position (get_state/set_state)."""

  def __init__(self, data, batch_size, seed):
    self.data, self.batch_size, self.seed = data, batch_size, seed
    self.num = len(data["x"])
    self.epoch, self.index = 0, 0

  def __iter__(self):
    return self

  def __next__(self):
    if self.index + self.batch_size > self.num:
      self.epoch, self.index = self.epoch + 1, 0
    order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num)
    rows = order[self.index:self.index + self.batch_size]
    self.index += self.batch_size
    return {k: v[rows] for k, v in self.data.items()}

  def get_state(self):
    return {"epoch": self.epoch, "index": self.index}

  def set_state(self, state):
    self.epoch, self.index = int(state["epoch"]), int(state["index"])


class _Stop(Exception):
  pass


def _stopping(iterator, after):
  """`iterator` that raises _Stop once it has served `after` batches (a crash)."""
  class Stopping:
    def __iter__(self):
      return self

    def __next__(self):
      if self.served == after:
        raise _Stop()
      self.served += 1
      return next(iterator)

    def get_state(self):
      return iterator.get_state()

    def set_state(self, state):
      iterator.set_state(state)
  stopping = Stopping()
  stopping.served = 0
  return stopping


def _recipe(stop_second_after=None):
  def second_data():
    it = _Batches(_data(1), 8, seed=5)
    return it if stop_second_after is None else _stopping(it, stop_second_after)
  return [Stage("pretrain", _step(3, 0.05), 4, lambda: _Batches(_data(0), 8, seed=4)),
          Stage("target", _step(4, 0.02), 6, second_data)]


def _run(workdir, stages):
  return run_recipe(stages, str(workdir), mesh="data=8", checkpoint_every=2,
                    progress=False, tensorboard=False, log_every=2)


@pytest.mark.slow
def test_resumed_recipe_ends_bit_identical(tmp_path):
  straight = _run(tmp_path / "a", _recipe())
  # The second stage starts from the first stage's encoder; its new head is fresh.
  first_w = np.asarray(unbox(straight[0].state.params)["w"])
  assert straight[1].step == 6 and straight[0].step == 4
  # Stopped in stage 2 after its 3rd batch (its checkpoint at step 2 is kept).
  with pytest.raises(_Stop):
    _run(tmp_path / "b", _recipe(stop_second_after=3))
  resumed = _run(tmp_path / "b", _recipe())
  # Stage 1 was not retrained, stage 2 resumed from its step-2 checkpoint.
  logged = lambda stage: [r["step"] for r in log_lib.read_jsonl(
      str(tmp_path / "b" / stage / "metrics.jsonl")) if "loss" in r]
  assert logged("0_pretrain") == [2, 4]
  assert logged("1_target") == [2, 4, 6]
  for a, b in zip(jax.tree.leaves(unbox(straight[-1].state)),
                  jax.tree.leaves(unbox(resumed[-1].state))):
    np.testing.assert_array_equal(jax.random.key_data(a) if jnp.issubdtype(
        a.dtype, jax.dtypes.prng_key) else a, jax.random.key_data(b) if jnp.issubdtype(
            b.dtype, jax.dtypes.prng_key) else b)
  assert not np.array_equal(first_w, unbox(resumed[-1].state.params)["w"])


def test_carry_params_takes_matching_paths_and_shapes():
  batch = {"x": jnp.ones((2, 5))}
  old = _step(3, 0.1).init(jax.random.key(0), batch)
  fresh = _step(4, 0.1).init(jax.random.key(1), batch)
  got = carry_params(old, fresh)
  np.testing.assert_array_equal(unbox(got.params)["w"], unbox(old.params)["w"])
  np.testing.assert_array_equal(unbox(got.params)["head"], unbox(fresh.params)["head"])
  assert isinstance(got.params["w"], nn.LogicallyPartitioned)
  other = fresh.replace(params={"z": jnp.zeros(3)})
  with pytest.raises(ValueError, match="no parameter of the previous stage"):
    carry_params(old, other)


def test_stage_names_are_checked():
  step = _step(3, 0.1)
  # One stage trains in the workdir itself (a plain run's layout); several below it.
  assert stage_dirs("/tmp/r", [Stage("a", step, 1, list)]) == ["/tmp/r"]
  assert stage_dirs("/tmp/r", [Stage("a", step, 1, list), Stage("b", step, 1, list)]
                    ) == ["/tmp/r/0_a", "/tmp/r/1_b"]
  with pytest.raises(ValueError, match="must be a plain file name"):
    stage_dirs("/tmp/r", [Stage("../x", step, 1, list)])
  with pytest.raises(ValueError, match="repeat"):
    stage_dirs("/tmp/r", [Stage("a", step, 1, list), Stage("a", step, 1, list)])
