"""Trainer: sharded equivalence, exact resume, non-finite stop, logs, evaluate/predict."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

import toy_task
from etjax.algorithms.step import unbox
from etjax.data import pipeline
from etjax.sharding.mesh import make_mesh
from etjax.train import logging as log_lib
from etjax.train import metrics as metrics_lib
from etjax.train.trainer import NonFiniteLossError, Trainer


# One TrainStep for the module: jit reuses its compilations across trainers.
STEP = toy_task.make_train_step(total_steps=20)


def _trainer(workdir, num_steps, **kwargs):
  kwargs.setdefault("progress", False)
  kwargs.setdefault("log_every", 1)
  return Trainer(STEP, workdir=str(workdir), num_steps=num_steps, **kwargs)


def _train_losses(workdir):
  return [r["loss"] for r in log_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
          if r["split"] == "train"]


def _params(state):
  return [np.asarray(x) for x in jax.tree.leaves(unbox(state.params))]


def test_sharded_losses_match_one_device(tmp_path):
  one = _trainer(tmp_path / "one", 5, mesh=make_mesh({"data": 1},
                                                     devices=jax.devices()[:1]))
  one.fit(toy_task.ToyIterator())
  reference = _train_losses(tmp_path / "one")
  # The first update's loss is only checked; later ones are logged (log_every=1).
  assert len(reference) == 4
  dp = _trainer(tmp_path / "dp", 5, mesh=make_mesh({"data": 8}), rules="dp")
  dp.fit(toy_task.ToyIterator())
  np.testing.assert_allclose(_train_losses(tmp_path / "dp"), reference, rtol=1e-5,
                             atol=1e-6)
  tp = _trainer(tmp_path / "tp", 5, mesh="data=2,model=4", rules="tp")
  result = tp.fit(toy_task.ToyIterator())
  np.testing.assert_allclose(_train_losses(tmp_path / "tp"), reference, rtol=1e-5,
                             atol=1e-6)
  kernel = result.state.params["wi"]["kernel"].value
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "model")
  assert kernel.addressable_shards[0].data.shape == (16, 8)


def _grain_iterator():
  return pipeline.train_iterator(toy_task.make_examples(40, seed=0), 8, seed=3)


@pytest.mark.parametrize("make_iter", [lambda: toy_task.ToyIterator(num=40),
                                       _grain_iterator], ids=["toy", "grain"])
def test_resume_ends_with_the_parameters_of_an_uninterrupted_run(tmp_path, make_iter):
  straight = _trainer(tmp_path / "a", 8, mesh="data=2,model=4", rules="tp",
                      log_every=4).fit(make_iter())
  first = _trainer(tmp_path / "b", 4, mesh="data=2,model=4", rules="tp", log_every=4)
  assert first.fit(make_iter()).step == 4
  # A fresh process would build everything anew: new trainer, new iterator at 0.
  second = _trainer(tmp_path / "b", 8, mesh="data=2,model=4", rules="tp", log_every=4)
  resumed = second.fit(make_iter())
  assert resumed.step == 8
  # It did resume: the second run logged only its own steps (5..8).
  records = log_lib.read_jsonl(str(tmp_path / "b" / "metrics.jsonl"))
  assert [r["step"] for r in records] == [4, 8]
  for a, b in zip(_params(straight.state), _params(resumed.state)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(jax.random.key_data(straight.state.rng),
                                jax.random.key_data(resumed.state.rng))


class _PoisonedIterator(toy_task.ToyIterator):
  """Gives batch number `bad` (1-based) an infinite weight, so its loss is not finite."""

  def __init__(self, bad, **kwargs):
    super().__init__(**kwargs)
    self.bad, self.served = bad, 0

  def __next__(self):
    batch = super().__next__()
    self.served += 1
    if self.served == self.bad:
      batch["weight"] = np.full_like(batch["weight"], np.inf)
    return batch


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  trainer = _trainer(tmp_path, 10, checkpoint_every=2, log_every=5)
  with pytest.raises(NonFiniteLossError, match=r"at step 6; .*checkpoint, step 4, is kept"):
    trainer.fit(_PoisonedIterator(bad=6))
  assert trainer.checkpointer.all_steps()[-1] == 4
  state = trainer.restore(next(toy_task.ToyIterator()))
  assert int(state.step) == 4
  assert all(np.all(np.isfinite(p)) for p in _params(state))


def test_logs_evaluation_best_checkpoint_and_predict(tmp_path):
  trainer = _trainer(tmp_path, 6, eval_every=3, keep_best_metric="accuracy",
                     log_every=2, progress=True)
  eval_data = toy_task.eval_batches(num=20, batch_size=8)  # 8 + 8 + 4 (padded)
  result = trainer.fit(toy_task.ToyIterator(), eval_data)
  assert result.step == 6 and set(result.eval_metrics) >= {"accuracy", "macro_f1", "auc"}

  records = log_lib.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [(r["step"], r["split"]) for r in records] == [
      (2, "train"), (3, "eval"), (4, "train"), (6, "train"), (6, "eval")]
  train_records = [r for r in records if r["split"] == "train"]
  assert all(r["examples_per_s"] > 0 for r in train_records)
  # Compilation is reported apart, once.
  assert train_records[0]["first_step_s"] > 0
  assert not any("first_step_s" in r for r in train_records[1:])
  scalars = log_lib.read_tensorboard_scalars(str(tmp_path / "tb"))
  assert [s for s, _ in scalars["train/loss"]] == [2, 4, 6]
  np.testing.assert_allclose([v for _, v in scalars["eval/accuracy"]],
                             [r["accuracy"] for r in records if r["split"] == "eval"],
                             rtol=1e-6)

  # Evaluation equals metrics of logits computed directly with the model.
  model = toy_task.ToyClassifier()
  batch = {k: np.concatenate([b[k] for b in eval_data]) for k in eval_data[0]}
  params = jax.device_get(unbox(result.state.params))
  logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"])
  expected = metrics_lib.classification_metrics(np.asarray(logits), batch["labels"])
  assert result.eval_metrics["num_examples"] == 20
  for name in ("accuracy", "macro_f1", "auc"):
    assert result.eval_metrics[name] == pytest.approx(expected[name], rel=1e-6)

  best = trainer.checkpointer.best_step()
  evals = {r["step"]: r["accuracy"] for r in records if r["split"] == "eval"}
  assert best == max(evals, key=lambda s: (evals[s], s))
  restored = trainer.restore(eval_data[0], best=True)
  assert int(restored.step) == best

  # Predict keeps rows of weight > 0 only, in order.
  data = [dict(b) for b in eval_data]
  data[-1]["weight"] = np.array([1, 1, 0, 0], np.float32)
  out = trainer.predict(result.state, lambda: iter(data))
  assert out["logits"].shape == (18, toy_task.CLASSES)
  np.testing.assert_allclose(out["logits"], np.asarray(logits)[:18], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out["predictions"], np.argmax(out["logits"], -1))
  np.testing.assert_allclose(out["probabilities"].sum(-1), 1.0, rtol=1e-6)


def test_finished_run_resumes_to_nothing_and_bad_inputs(tmp_path):
  trainer = _trainer(tmp_path, 2)
  trainer.fit(toy_task.ToyIterator())
  again = _trainer(tmp_path, 2).fit(toy_task.ToyIterator())
  assert again.step == 2
  with pytest.raises(ValueError, match="exhausted iterator"):
    trainer.evaluate(again.state, iter([]))
  with pytest.raises(ValueError, match="not divisible by the 8 batch shards"):
    _trainer(tmp_path / "odd", 2, mesh="data=8").fit(toy_task.ToyIterator(batch_size=4))
  with pytest.raises(ValueError, match="num_steps must be positive"):
    _trainer(tmp_path, 0)


def test_write_config_never_overwrites_silently(tmp_path):
  trainer = _trainer(tmp_path, 1)
  path = trainer.write_config("a = 1\n")
  assert trainer.write_config("a = 1\n") == path
  with pytest.warns(RuntimeWarning, match="differed"):
    trainer.write_config("a = 2\n")
  assert open(path).read() == "a = 2\n" and open(path + ".1").read() == "a = 1\n"
