"""Ahead-of-time plans: counts and per-device bytes against a real initialised state."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from etjax.algorithms.step import TrainState, TrainStep, apply_gradients, next_rng
from etjax.sharding import fake_devices, mesh as mesh_lib, partitioning, plan as plan_lib
from etjax.sharding import rules as rules_lib
from sharding_testlib import TinyClassifier

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BATCH = {"input_ids": jax.ShapeDtypeStruct((16, 6), jnp.int32),
         "labels": jax.ShapeDtypeStruct((16,), jnp.int32)}


def _train_step(model=TinyClassifier(), tx=optax.adamw(1e-3)):
  def init(rng, batch):
    params = model.init(rng, batch["input_ids"])["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), rng=rng)

  def update(state, batch):
    step_rng, new_rng = next_rng(state)
    del step_rng

    def loss_fn(params):
      logits = model.apply({"params": params}, batch["input_ids"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return apply_gradients(state, grads, tx, rng=new_rng), {"loss": loss}
  return TrainStep(init=init, update=update)


def _real_state(step):
  batch = {k: jnp.zeros(v.shape, v.dtype) for k, v in BATCH.items()}
  return jax.jit(step.init)(jax.random.PRNGKey(0), batch)


def test_plan_matches_real_initialised_model_on_fsdp_mesh():
  step = _train_step()
  mesh = mesh_lib.make_mesh({"fsdp": 8})
  rules = rules_lib.get_rules("fsdp")
  got = plan_lib.plan(step, BATCH, mesh, rules, device_memory_gib=1.0)

  state = _real_state(step)
  real_params = jax.tree.leaves(jax.tree.map(np.asarray, state.params))
  assert got.parameter_count == sum(p.size for p in real_params)
  total_param_bytes = sum(p.nbytes for p in real_params)
  # Every parameter of the tiny model has an 8-wide 'embed' dimension: 8 shards.
  assert got.parameter_bytes == total_param_bytes // 8
  assert got.gradient_bytes == got.parameter_bytes
  # The optimizer state placed on the mesh, measured shard by shard.
  placed = jax.device_put(state.opt_state,
                          partitioning.state_shardings(state.opt_state, mesh, rules))
  per_device = sum(leaf.addressable_shards[0].data.nbytes
                   for leaf in jax.tree.leaves(placed))
  assert got.optimizer_bytes == per_device
  assert got.optimizer_bytes == 2 * got.parameter_bytes + 4  # adam mu, nu + count
  assert got.peak_bytes >= got.parameter_bytes + got.optimizer_bytes
  assert got.fits is True and got.mesh["fsdp"] == 8
  assert got.device_memory_bytes == 2 ** 30 and got.peak_bytes < 2 ** 30
  assert "parameters" in got.format() and got.to_dict()["mesh"]["fsdp"] == 8


def test_plan_dp_replicates_and_names_indivisible_parameter():
  step = _train_step()
  got = plan_lib.plan(step, BATCH, mesh_lib.make_mesh({"data": 8}),
                      rules_lib.get_rules("dp"))
  params = jax.eval_shape(lambda: _real_state(step).params)
  total = sum(math.prod(p.shape) * 4 for p in jax.tree.leaves(params))
  assert got.parameter_bytes == total and got.fits is None
  with pytest.raises(ValueError, match=r"params/query: shape \(8, 3, 4\)"):
    plan_lib.plan(_train_step(TinyClassifier(heads=3)), BATCH,
                  mesh_lib.make_mesh({"data": 4, "model": 2}), rules_lib.get_rules("tp"))


def test_ensure_fake_devices_reexecutes_once():
  code = ("from etjax.sharding.fake_devices import ensure_fake_devices\n"
          "ensure_fake_devices(4)\n"
          "import jax, os; print(jax.device_count(), os.environ['ETJAX_FAKE_DEVICES'])")
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "ETJAX_FAKE_DEVICES")}
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                        text=True, timeout=120, cwd=_REPO)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split() == ["4", "4"]
  env = fake_devices.fake_device_environ(16, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --x=1"})
  assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=16 --x=1"
  assert env["JAX_PLATFORMS"] == "cpu"
