"""Gradient accumulation equals the full-batch gradient."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from etjax.algorithms.accumulate import accumulate_gradients, accumulate_step
from etjax.algorithms.finetune import (step_from_loss, weighted_accuracy,
                                       weighted_cross_entropy)
from etjax.models.microbatch import merge_microbatches, split_microbatches
from etjax.train import Trainer


class _Mlp(nn.Module):

  @nn.compact
  def __call__(self, x_bd):
    h = nn.with_logical_partitioning(nn.initializers.normal(0.5), ("embed", "mlp"))
    w_df = self.param("w", h, (x_bd.shape[-1], 16))
    return jnp.tanh(x_bd @ w_df) @ self.param("v", nn.initializers.normal(0.5), (16, 3))


def _loss(params, batch, rng):
  del rng
  logits_bc = _Mlp().apply({"params": params}, batch["x"])
  logp_bc = jax.nn.log_softmax(logits_bc)
  nll_b = -jnp.take_along_axis(logp_bc, batch["labels"][:, None], axis=1)[:, 0]
  accuracy = jnp.mean(jnp.argmax(logits_bc, -1) == batch["labels"])
  return jnp.mean(nll_b), {"accuracy": accuracy, "mean_logit": jnp.mean(logits_bc),
                          "logits_bc": logits_bc}


def _setup(batch_size=24):
  kx, ky, kp = jax.random.split(jax.random.PRNGKey(0), 3)
  batch = {"x": jax.random.normal(kx, (batch_size, 5)),
           "labels": jax.random.randint(ky, (batch_size,), 0, 3)}
  params = _Mlp().init(kp, batch["x"])["params"]
  return params, batch


@pytest.mark.parametrize("num_microbatches", [1, 2, 3, 8])
def test_equals_full_batch_gradient(num_microbatches):
  params, batch = _setup()
  grad_fn = jax.value_and_grad(_loss, has_aux=True)
  (loss, metrics), grads = grad_fn(params, batch, None)
  acc = jax.jit(accumulate_gradients(grad_fn, num_microbatches))
  (loss_m, metrics_m), grads_m = acc(params, batch)
  assert isinstance(grads_m["w"], nn.LogicallyPartitioned)  # boxes survive
  np.testing.assert_allclose(loss_m, loss, rtol=1e-5)
  for name in metrics:  # scalars averaged, per-example logits back in batch order
    np.testing.assert_allclose(metrics_m[name], metrics[name], rtol=1e-5, atol=1e-7)
  assert metrics_m["logits_bc"].shape == (24, 3)
  for g_m, g in zip(jax.tree.leaves(grads_m), jax.tree.leaves(grads)):
    np.testing.assert_allclose(g_m, g, rtol=1e-5, atol=1e-7)


def test_rng_is_folded_per_microbatch():
  seen = []

  def grad_fn(params, batch, rng):
    seen.append(rng)
    return jax.random.uniform(rng), params
  acc = accumulate_gradients(grad_fn, 4)
  value, _ = acc(jnp.zeros(()), {"x": jnp.zeros((8, 1))}, jax.random.PRNGKey(3))
  want = np.mean([jax.random.uniform(jax.random.fold_in(jax.random.PRNGKey(3), i))
                  for i in range(4)])
  np.testing.assert_allclose(value, want, rtol=1e-6)


def test_split_is_strided_and_merge_inverts_it():
  x = jnp.arange(12).reshape(6, 2)
  micro = split_microbatches({"x": x}, 3)["x"]
  np.testing.assert_array_equal(micro[1], x[np.array([1, 4])])
  np.testing.assert_array_equal(merge_microbatches(micro), x)


def test_indivisible_batch_names_the_leaf():
  params, batch = _setup(batch_size=10)
  acc = accumulate_gradients(jax.value_and_grad(_loss, has_aux=True), 4)
  with pytest.raises(ValueError, match=r"batch\['labels'\] of 10 examples does not "
                     r"split into 4 equal microbatches"):
    acc(params, batch)


# --- accumulate_step and the Trainer's gradient options (float64: exact mathematics) ---

def _classifier_step(learning_rate=0.1):
  """A step_from_loss TrainStep over _Mlp with etjax's weighted-mean cross-entropy."""
  def loss_fn(params, batch, rng, deterministic):
    del rng, deterministic
    logits_bc = _Mlp().apply({"params": params}, batch["x"])
    weights = batch["weight"]
    return (weighted_cross_entropy(logits_bc, batch["labels"], weights),
            {"logits": logits_bc,
             "accuracy": weighted_accuracy(logits_bc, batch["labels"], weights)})
  init = lambda rng, batch: _Mlp().init(rng, batch["x"])["params"]
  return step_from_loss(loss_fn, init, optax.adam(learning_rate))


def _weighted_batch(seed=0, batch_size=24):
  kx, ky, kw = jax.random.split(jax.random.PRNGKey(seed), 3)
  # Uneven weights, some rows padding (weight 0): each microbatch's total differs.
  weight = jax.random.uniform(kw, (batch_size,), minval=0.0, maxval=3.0)
  weight = jnp.where(jnp.arange(batch_size) % 5 == 1, 0.0, weight)
  return {"x": jax.random.normal(kx, (batch_size, 5)),
          "labels": jax.random.randint(ky, (batch_size,), 0, 3), "weight": weight}


@pytest.mark.parametrize("num_microbatches", [2, 4])
def test_accumulated_step_equals_full_batch_step_for_weighted_losses(num_microbatches):
  with jax.enable_x64(True):
    step = _classifier_step()
    batch = _weighted_batch()
    state = step.init(jax.random.PRNGKey(0), batch)
    want_state, want = jax.jit(step.update)(state, batch)
    acc = accumulate_step(step, num_microbatches)
    got_state, got = jax.jit(acc.update)(state, batch)
    # The mean of per-microbatch means, which the old accumulation computed, is not
    # the full-batch gradient here (so the equality above can fail).
    naive = accumulate_gradients(lambda s, b, r: step.grad(s, b, r)[::-1],
                                 num_microbatches)
    _, naive_grads = jax.jit(naive)(state, batch, jax.random.PRNGKey(1))
    full_grads, _ = step.grad(state, batch, jax.random.PRNGKey(1))
  assert got["loss"].dtype == np.float64
  assert set(got) == set(want) == {"loss", "accuracy", "grad_norm"}
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-12, err_msg=name)
  for a, b in zip(jax.tree.leaves(got_state.params), jax.tree.leaves(want_state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
  gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in
            zip(jax.tree.leaves(naive_grads), jax.tree.leaves(full_grads)))
  assert gap > 1e-4, gap


def test_accumulation_needs_grad_and_apply():
  step = _classifier_step()
  bare = step._replace(grad=None, apply=None)
  with pytest.raises(ValueError, match="gradient accumulation needs a TrainStep made by "
                     "etjax.algorithms.step.gradient_step"):
    accumulate_step(bare, 2)
  assert accumulate_step(bare, 1) is bare


def _fit(tmp_path, name, steps=3, **options):
  batches = [{k: np.asarray(v) for k, v in _weighted_batch(seed).items()}
             for seed in range(steps)]
  trainer = Trainer(_classifier_step(), workdir=str(tmp_path / name), num_steps=steps,
                    progress=False, tensorboard=False, **options)
  return trainer.fit(iter(batches))


@pytest.mark.slow
def test_trainer_gradient_options_equal_the_plain_trainer(tmp_path):
  """grad_accum_steps and grad_comm_dtype through Trainer.fit on 8 devices: float64
  accumulation and float64 all-reduce give the plain run's parameters; a bfloat16
  all-reduce gives them within bfloat16 rounding."""
  with jax.enable_x64(True):
    plain = _fit(tmp_path, "plain", mesh="data=8")
    accumulated = _fit(tmp_path, "accum", mesh="data=8", grad_accum_steps=3)
    reduced = _fit(tmp_path, "comm64", mesh="data=8", grad_accum_steps=3,
                   grad_comm_dtype="float64")
    bf16 = _fit(tmp_path, "comm16", mesh="data=8", grad_comm_dtype="bfloat16")
  want = jax.tree.leaves(plain.state.params)
  for run in (accumulated, reduced):
    np.testing.assert_allclose(run.train_metrics["loss"], plain.train_metrics["loss"],
                               rtol=1e-12)
    for a, b in zip(jax.tree.leaves(run.state.params), want):
      np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
  differs = False
  for a, b in zip(jax.tree.leaves(bf16.state.params), want):
    # Adam's update is about lr * sign(g) per step: bf16 rounding of g moves it little.
    np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-2)
    differs |= not np.array_equal(a, b)
  assert differs


def test_accumulated_distillation_equals_the_full_batch_step():
  """KD + cross-entropy (distill's grad/apply halves) accumulated over 2 microbatches:
  a tiny BERT student computes in float32, so the float32 tolerance applies."""
  import distill_fixtures as fx  # pylint: disable=g-import-not-at-top
  from etjax.algorithms.distill import distill  # pylint: disable=g-import-not-at-top
  teacher = fx.classifier(16, 2, 60, classes=3)
  batch = {k: jnp.asarray(v) for k, v in fx.random_batch(0).items()}
  teacher_params = teacher.init(jax.random.PRNGKey(1), batch["input_ids"])["params"]
  step = distill(fx.classifier(16, 1, 60, classes=3), (teacher, teacher_params),
                 optax.sgd(0.5), losses={"kd": 1.0, "ce": 0.5}, temperature=2.0)
  state = step.init(jax.random.PRNGKey(0), batch)
  want_state, want = jax.jit(step.update)(state, batch)
  got_state, got = jax.jit(accumulate_step(step, 2).update)(state, batch)
  np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got_state.params), jax.tree.leaves(want_state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(want_state.params), jax.tree.leaves(state.params)))
  assert moved > 1e-3
