"""Optimizer presets: schedule values, decay mask on boxed trees, one update by hand."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from etjax.algorithms import optim
from etjax.algorithms.step import unbox


class _Tiny(nn.Module):
  """Dense + LayerNorm + RMSNorm with logical boxes on every parameter."""

  @nn.compact
  def __call__(self, x):
    lp = nn.with_logical_partitioning
    x = nn.Dense(4, kernel_init=lp(nn.initializers.normal(1.0), ("embed", "mlp")),
                 bias_init=lp(nn.initializers.normal(1.0), ("mlp",)))(x)
    x = nn.LayerNorm(scale_init=lp(nn.initializers.ones, ("mlp",)),
                     bias_init=lp(nn.initializers.zeros, ("mlp",)))(x)
    x = nn.RMSNorm(scale_init=lp(nn.initializers.ones, ("mlp",)), name="final_rms")(x)
    return nn.Dense(2, use_bias=False, name="head",
                    kernel_init=lp(nn.initializers.normal(1.0), ("mlp", "classes")))(x)


def _boxed_params():
  return _Tiny().init(jax.random.key(0), jnp.ones((2, 3)))["params"]


def test_schedule_matches_hand_computation():
  sched = optim.warmup_linear_decay(1e-3, warmup_steps=4, total_steps=12)
  for step in range(16):
    if step < 4:
      expected = 1e-3 * step / 4
    else:
      expected = 1e-3 * max(0.0, (12 - step) / 8)
    np.testing.assert_allclose(float(sched(step)), expected, rtol=1e-6, atol=1e-12)
  no_warmup = optim.warmup_linear_decay(2.0, warmup_steps=0, total_steps=5)
  np.testing.assert_allclose([float(no_warmup(s)) for s in range(6)],
                             [2.0, 1.6, 1.2, 0.8, 0.4, 0.0], rtol=1e-6, atol=1e-7)


def test_schedule_rejects_bad_steps():
  with pytest.raises(ValueError, match="warmup_steps"):
    optim.warmup_linear_decay(1e-3, warmup_steps=20, total_steps=10)
  with pytest.raises(ValueError, match="total_steps"):
    optim.warmup_linear_decay(1e-3, warmup_steps=0, total_steps=0)


def test_decay_mask_on_boxed_tree_keeps_structure():
  params = _boxed_params()
  mask = optim.decay_mask(params)
  assert jax.tree.structure(mask) == jax.tree.structure(params)
  assert isinstance(mask["Dense_0"]["kernel"], nn.LogicallyPartitioned)
  flat = {optim.path_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
  assert flat == {"Dense_0/kernel": True, "Dense_0/bias": False,
                  "LayerNorm_0/scale": False, "LayerNorm_0/bias": False,
                  "final_rms/scale": False, "head/kernel": True}


def test_adamw_one_step_by_hand():
  params = _boxed_params()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5) * jnp.arange(p.size).reshape(p.shape),
                       params)
  lr, wd, b1, b2, eps, clip = 0.1, 0.3, 0.8, 0.9, 1e-6, 2.0
  tx = optim.make_optimizer("adamw", learning_rate=lr, warmup_steps=0, total_steps=10,
                            weight_decay=wd, b1=b1, b2=b2, eps=eps, max_grad_norm=clip)
  state = tx.init(params)
  updates, _ = tx.update(grads, state, params)
  assert jax.tree.structure(updates) == jax.tree.structure(params)

  p_np = {optim.path_name(k): np.asarray(v)
          for k, v in jax.tree_util.tree_flatten_with_path(unbox(params))[0]}
  g_np = {optim.path_name(k): np.asarray(v)
          for k, v in jax.tree_util.tree_flatten_with_path(unbox(grads))[0]}
  norm = np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in g_np.values()))
  scale = min(1.0, clip / norm)
  got = {optim.path_name(k): np.asarray(v)
         for k, v in jax.tree_util.tree_flatten_with_path(unbox(updates))[0]}
  for name, g in g_np.items():
    g = g * scale
    m_hat = (1 - b1) * g / (1 - b1)
    v_hat = (1 - b2) * g * g / (1 - b2)
    step = m_hat / (np.sqrt(v_hat) + eps)
    decayed = name in ("Dense_0/kernel", "head/kernel")
    if decayed:
      step = step + wd * p_np[name]
    np.testing.assert_allclose(got[name], -lr * step, rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("name,kwargs", [
    ("sgd", dict(learning_rate=0.1, total_steps=10, momentum=0.9, weight_decay=0.01)),
    ("adafactor", dict(learning_rate=0.1, total_steps=10, min_dim_size_to_factor=2)),
])
def test_other_presets_update_boxed_params(name, kwargs):
  params = _boxed_params()
  tx = optim.make_optimizer(name, **kwargs)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = jax.jit(tx.update)(grads, state, params)
  assert jax.tree.structure(updates) == jax.tree.structure(params)
  assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))


def test_sgd_decay_is_masked():
  params = _boxed_params()
  tx = optim.make_optimizer("sgd", learning_rate=0.5, total_steps=10, momentum=None,
                            weight_decay=0.1, max_grad_norm=None)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  u, p = unbox(updates), unbox(params)
  np.testing.assert_allclose(u["Dense_0"]["kernel"], -0.5 * 0.1 * p["Dense_0"]["kernel"],
                             rtol=1e-6)
  np.testing.assert_array_equal(u["Dense_0"]["bias"], 0.0)
  np.testing.assert_array_equal(u["LayerNorm_0"]["scale"], 0.0)


def test_unknown_optimizer_and_bad_arguments():
  with pytest.raises(ValueError, match="unknown optimizer 'adam'.*adafactor, adamw, sgd"):
    optim.make_optimizer("adam", learning_rate=1e-3, total_steps=10)
  with pytest.raises(ValueError, match="optimizer 'adamw': bad arguments"):
    optim.make_optimizer("adamw", learning_rate=1e-3, total_steps=10, momentum=0.9)
  with pytest.raises(ValueError, match="max_grad_norm"):
    optim.make_optimizer("adamw", learning_rate=1e-3, total_steps=10, max_grad_norm=0.0)


def _group_step(tx):
  """A step_from_loss TrainStep over _Tiny (squared error to fixed targets)."""
  from etjax.algorithms.finetune import step_from_loss  # pylint: disable=g-import-not-at-top

  def loss_fn(params, batch, rng, deterministic):
    del rng, deterministic
    out = _Tiny().apply({"params": params}, batch["x"])
    return jnp.mean((out - batch["y"]) ** 2), {"logits": out}
  return step_from_loss(loss_fn, lambda rng, b: _Tiny().init(rng, b["x"])["params"], tx)


@pytest.mark.parametrize("devices", [1, 8])
def test_param_groups_through_the_trainer(tmp_path, devices):
  """Two learning rates (a 'pretrained' Dense_0 and the rest as 'new') through
  Trainer.fit, checkpointed and restored: each group moves exactly as its own SGD."""
  from etjax.sharding import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from etjax.train import Trainer  # pylint: disable=g-import-not-at-top
  sizes = {"data": 1} if devices == 1 else {"data": 4, "model": 2}
  mesh = mesh_lib.make_mesh(sizes, devices=jax.devices()[:devices])
  # Momentum gives each group a state shaped like its parameters (MaskedNodes for the
  # other group); on the first step the update is still -rate * grad.
  groups = {"pretrained": optax.sgd(0.01, momentum=0.9),
            "new": optax.sgd(0.5, momentum=0.9)}
  tx = optim.param_groups(groups, [(r"^Dense_0/", "pretrained")], default="new")
  rng = np.random.default_rng(0)
  batch = {"x": rng.standard_normal((8, 3)).astype(np.float32),
           "y": rng.standard_normal((8, 2)).astype(np.float32)}
  step = _group_step(tx)
  trainer = Trainer(step, workdir=str(tmp_path / "run"), num_steps=1, mesh=mesh,
                    rules="2d", progress=False, tensorboard=False)
  state0 = trainer.init_state(batch)
  result = trainer.fit(iter([batch]))
  restored = trainer.restore(batch)
  grads, _ = step.grad(jax.device_get(state0), batch, jax.random.key(0))
  flat0 = jax.tree_util.tree_flatten_with_path(unbox(jax.device_get(state0.params)))[0]
  for path, before in flat0:
    name = optim.path_name(path)
    rate = 0.01 if name.startswith("Dense_0/") else 0.5
    grad = _at(unbox(grads), path)
    want = np.asarray(before) - rate * np.asarray(grad)
    np.testing.assert_allclose(_at(unbox(result.state.params), path), want, rtol=1e-5,
                               atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(_at(unbox(restored.params), path),
                                  _at(unbox(result.state.params), path))


def _at(tree, path):
  for key in path:
    tree = tree[key.key]
  return np.asarray(tree)


def test_param_groups_name_missing_transforms():
  with pytest.raises(ValueError, match=r"labels \['frozen'\] have no transform"):
    optim.param_groups({"new": optax.sgd(0.1)}, [("^x", "frozen")], default="new")
