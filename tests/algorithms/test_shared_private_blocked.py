"""Domain-blocked batches for the shared/private models: each private encoder runs on
its own domain's block only, and the loss and gradients equal those of the path that
runs every private encoder on every row (float64); the step trained on blocked batches
equals the old step on the same batches, sharded and not; the blocked stream's layout,
epochs, resume and messages."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from etjax.algorithms import feature_based as fb
from etjax.algorithms import unbox
from etjax.algorithms.finetune import model_inputs
from etjax.data import streams
from etjax.models.bag import BagOfEmbeddings
from etjax.sharding import mesh as mesh_lib
from etjax.sharding import partitioning, rules as rules_lib

VOCAB, LENGTH, K = 40, 8, 3


def _encoder(hidden=8, dtype=jnp.float32):
  return lambda: BagOfEmbeddings(vocab_size=VOCAB, hidden_size=hidden, dtype=dtype)


def _blocked_batch(rng, per_block=4, num_domains=K):
  n = per_block * num_domains
  types = np.zeros((n, LENGTH), np.int32)
  types[:, LENGTH // 2:] = 1
  return {"input_ids": rng.integers(1, VOCAB, (n, LENGTH)).astype(np.int32),
          "attention_mask": (rng.random((n, LENGTH)) < 0.8).astype(np.int32),
          "token_type_ids": types,
          "labels": rng.integers(0, 2, n).astype(np.int32),
          "domain": np.repeat(np.arange(num_domains), per_block).astype(np.int32),
          "weight": np.ones(n, np.float32)}


def test_blocked_loss_and_gradients_equal_all_encoders_path_float64():
  """Every loss term (task, difference, adversary, DRSS prior) and every gradient,
  with a padding row, in float64: blocked == every private encoder on every row."""
  with jax.enable_x64(True):
    batch = _blocked_batch(np.random.default_rng(0))
    batch["weight"][5] = 0.0
    model = fb.feature_model(_encoder(dtype=jnp.float64), fb.FeatureModel(
        num_domains=K, num_labels=2,
        private=True, domain_heads=True, discriminator_hidden=6,
        dropout_rate=0.0, make_private_encoder=_encoder(5, jnp.float64),
        common_head=True))
    loss_fn = fb.feature_tl_loss(model, difference_weight=0.3, drss_weight=0.7,
                                 adversarial_weight=0.2)
    params = model.init(jax.random.PRNGKey(0), *model_inputs(batch),
                        batch["domain"])["params"]
    params = jax.tree.map(lambda x: x.astype(jnp.float64), params)
    a = np.random.default_rng(2).normal(size=(K, K))
    omega = a @ a.T + K * np.eye(K)

    def run(blocks):
      return jax.value_and_grad(loss_fn, has_aux=True)(
          params, batch, jax.random.PRNGKey(1), True, omega, 0.7, blocks)

    (loss, aux), grads = run(0)
    (loss_b, aux_b), grads_b = run(K)
  assert float(aux["difference_loss"]) > 1e-3  # the term under test is not vacuous
  np.testing.assert_allclose(loss_b, loss, rtol=1e-12)
  for name in ("task_loss", "difference_loss", "domain_loss", "drss_regularizer"):
    np.testing.assert_allclose(aux_b[name], aux[name], rtol=1e-12, err_msg=name)
  np.testing.assert_allclose(aux_b["logits"], aux["logits"], rtol=1e-12, atol=1e-14)
  flat, flat_b = jax.tree.leaves(unbox(grads)), jax.tree.leaves(unbox(grads_b))
  assert len(flat) == len(flat_b)
  for g, g_b in zip(flat, flat_b):
    np.testing.assert_allclose(g_b, g, rtol=1e-10, atol=1e-14)
  # Every private encoder gets a gradient (from its own block only).
  for i in range(K):
    leaves = jax.tree.leaves(unbox(grads_b)[f"private_{i}"])
    assert max(float(np.abs(x).max()) for x in leaves) > 0


def test_blocked_model_runs_each_private_encoder_on_its_block_only():
  """The blocked forward calls private encoder k on B / K rows (the cost claim), and
  its own-private features equal the all-encoders path's pick."""
  batch = _blocked_batch(np.random.default_rng(1))
  model = fb.feature_model(_encoder(), fb.FeatureModel(
      num_domains=K, num_labels=2, private=True,
      domain_heads=False, discriminator_hidden=None, dropout_rate=0.0))
  args = (*model_inputs(batch), batch["domain"])
  params = model.init(jax.random.PRNGKey(0), *args)["params"]
  seen = []

  def spy(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and (context.module.name or "").startswith("private"):
      seen.append((context.module.name, args[0].shape[0]))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(spy):
    out = model.apply({"params": params}, *args, domain_blocks=K)
  assert sorted(seen) == [(f"private_{i}", 4) for i in range(K)]
  assert out.private is None
  ref = model.apply({"params": params}, *args)
  own = np.asarray(ref.private)[batch["domain"], np.arange(len(batch["domain"]))]
  np.testing.assert_allclose(out.own_private, own, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(out.logits, ref.logits, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="does not split into 3 equal blocks"):
    model.apply({"params": params}, *(x[:10] for x in args), domain_blocks=K)


@pytest.mark.parametrize("method", ["shared_private_adv", "drss"])
def test_blocked_steps_equal_old_steps_sharded_and_not(method):
  """Three updates on domain-blocked batches: domain_blocked=True (one device and 8
  devices) == the all-encoders step; prediction on mixed rows is unchanged."""
  rng = np.random.default_rng(5)
  batches = [_blocked_batch(rng, per_block=8) for _ in range(3)]
  make = lambda blocked: fb.FEATURE_METHODS[method](
      _encoder(), optax.sgd(0.2), num_domains=K, dropout_rate=0.0,
      domain_blocked=blocked)
  old, new = make(False), make(True)
  key = jax.random.PRNGKey(0)

  def run(step, init, update):
    state, metrics = init(key, batches[0]), []
    for batch in batches:
      state, m = update(state, batch)
      metrics.append(m)
    return state, metrics

  ref_state, ref_metrics = run(old, old.init, jax.jit(old.update))
  states = {"one device": run(new, new.init, jax.jit(new.update))}
  mesh = mesh_lib.make_mesh({"data": 8})
  rules = rules_lib.get_rules("dp")
  state_sh = partitioning.state_shardings(jax.eval_shape(new.init, key, batches[0]),
                                          mesh, rules)
  batch_sh = partitioning.batch_sharding(mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    states["8 devices"] = run(
        new, jax.jit(new.init, out_shardings=state_sh),
        jax.jit(new.update, in_shardings=(state_sh, batch_sh),
                out_shardings=(state_sh, None)))
  for where, (state, metrics) in states.items():
    for got, want in zip(metrics, ref_metrics):
      for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6,
                                   err_msg=f"{where}: {name}")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 unbox(state.params), unbox(ref_state.params))
  mixed = dict(batches[0], domain=np.arange(24, dtype=np.int32) % K)
  np.testing.assert_allclose(new.predict(states["one device"][0], mixed)["logits"],
                             old.predict(ref_state, mixed)["logits"], rtol=1e-5,
                             atol=1e-6)
  with pytest.raises(ValueError, match="equal contiguous blocks, block k of domain k"):
    new.update(states["one device"][0], mixed)
  # The Trainer may init from any example batch (one row): params are path-free.
  one_row = new.init(key, {name: v[:1] for name, v in batches[0].items()})
  jax.tree.map(np.testing.assert_array_equal, unbox(one_row.params),
               unbox(old.init(key, batches[0]).params))


def _data(sizes):
  """Encoded-like rows: 'row' is the row's index, 'domain' its domain."""
  domain = np.concatenate([np.full(n, k, np.int32) for k, n in enumerate(sizes)])
  perm = np.random.default_rng(0).permutation(len(domain))
  return {"row": np.arange(len(domain))[perm], "domain": domain[perm]}


def test_blocked_stream_layout_epochs_and_small_domains():
  """Block k holds domain k; each domain's rows come in shuffled epochs that run on
  into the next one (a 3-row domain repeats inside a 4-row block)."""
  data = _data([10, 3, 7])
  it = streams.domain_blocked_stream(data, 12, num_domains=3, seed=4,
                                     process_index=0, process_count=1)
  drawn = {k: [] for k in range(3)}
  for _ in range(15):
    batch = next(it)
    np.testing.assert_array_equal(batch["domain"], np.repeat(np.arange(3), 4))
    for k in range(3):
      drawn[k] += batch["row"][4 * k:4 * (k + 1)].tolist()
  for k, n in enumerate([10, 3, 7]):
    rows = sorted(data["row"][data["domain"] == k].tolist())
    epochs = [drawn[k][i:i + n] for i in range(0, len(drawn[k]) - n + 1, n)]
    assert len(epochs) >= 5
    for epoch in epochs:  # every full epoch is a permutation of the domain's rows
      assert sorted(epoch) == rows
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled between epochs


def test_blocked_stream_resumes_and_shares_over_processes():
  data = _data([9, 5, 6, 8])
  make = lambda **p: streams.domain_blocked_stream(data, 8, num_domains=4, seed=1, **p)
  it = make(process_index=0, process_count=1)
  for _ in range(7):
    next(it)
  saved = it.get_state()
  want = [next(it)["row"] for _ in range(5)]
  resumed = make(process_index=0, process_count=1)
  resumed.set_state(saved)
  for w in want:
    np.testing.assert_array_equal(next(resumed)["row"], w)
  halves = [make(process_index=p, process_count=2) for p in range(2)]
  for h in halves:
    h.set_state(saved)
  for w in want:  # each process: its contiguous half of the global blocked batch
    np.testing.assert_array_equal(np.concatenate([next(h)["row"] for h in halves]), w)
  with pytest.raises(ValueError, match="not that of domain-blocked batches of 4"):
    resumed.set_state({"epoch": 0, "index": 0})


def test_blocked_stream_messages():
  data = _data([4, 4, 4])
  with pytest.raises(ValueError, match=r"train.batch_size = 10 does not split into 3 "
                     r"equal blocks, one per domain.*multiple of 3"):
    streams.domain_blocked_stream(data, 10, num_domains=3, seed=0,
                                  batch_size_name="train.batch_size", process_count=1,
                                  process_index=0)
  with pytest.raises(ValueError, match=r"domains \[3\] have no training rows"):
    streams.domain_blocked_stream(data, 8, num_domains=4, seed=0, process_count=1,
                                  process_index=0)
  with pytest.raises(ValueError, match=r"ids \[2\] out of \[0, 2\)"):
    streams.domain_blocked_stream(data, 8, num_domains=2, seed=0, process_count=1,
                                  process_index=0)
