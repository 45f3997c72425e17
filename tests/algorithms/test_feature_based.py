"""Feature-based TL (FullyShared, SharedPrivate(-Adv), DRSS(-Adv)): losses against
numpy, gradient reversal inside the model, DRSS's Omega against the closed form in
numpy, recovery of a known domain relationship, sharded == unsharded, one-step smoke
runs for single sentences and pairs."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from etjax.algorithms import feature_based as fb
from etjax.algorithms import make_optimizer, unbox
from etjax.algorithms.shared_private import shared_head_weights
from etjax.models.bag import BagOfEmbeddings
from etjax.sharding import mesh as mesh_lib
from etjax.sharding import partitioning, rules as rules_lib
from etjax.train import fit as fit_lib

VOCAB, LENGTH, K = 40, 8, 3


def _encoder(hidden=8):
  return lambda: BagOfEmbeddings(vocab_size=VOCAB, hidden_size=hidden)


def _batch(rng, n=16, pairs=False, num_domains=K):
  types = np.zeros((n, LENGTH), np.int32)
  if pairs:
    types[:, LENGTH // 2:] = 1
  return {"input_ids": rng.integers(1, VOCAB, (n, LENGTH)).astype(np.int32),
          "attention_mask": np.ones((n, LENGTH), np.int32),
          "token_type_ids": types,
          "labels": rng.integers(0, 2, n).astype(np.int32),
          "domain": (np.arange(n) % num_domains).astype(np.int32),
          "weight": np.ones(n, np.float32)}


def _sgd(lr=0.1):
  return optax.sgd(lr)


# SharedPrivate-Adv and DRSS run in the sharded test and the DRSS tests below.
@pytest.mark.parametrize("method,pairs,kwargs", [
    ("fully_shared", False, {}), ("shared_private", True, {}),
    ("drss_adv", True, {"common_head": True})])
def test_one_step_smoke(method, pairs, kwargs):
  batch = _batch(np.random.default_rng(0), pairs=pairs)
  tx = make_optimizer("adamw", learning_rate=1e-2, total_steps=10)
  step = fb.FEATURE_METHODS[method](_encoder(), tx, num_domains=K, **kwargs)
  state = step.init(jax.random.PRNGKey(0), batch)
  state, metrics = jax.jit(step.update)(state, batch)
  assert int(state.step) == 1
  assert all(np.isfinite(float(v)) for v in metrics.values())
  out = step.predict(state, {k: v for k, v in batch.items() if k != "labels"})
  assert out["logits"].shape == (16, 2)
  if method.startswith("drss"):
    assert state.omega.shape == (K, K)
    np.testing.assert_allclose(np.trace(state.omega), 1.0, rtol=1e-5)
    assert {"omega/0_1", "omega/0_2", "omega/1_2"} <= set(metrics)
  else:
    assert state.omega is None


def test_loss_terms_match_numpy():
  """task CE + difference + domain CE + tr(W Omega^-1 W^T), recomputed from the
  model's own outputs in numpy."""
  batch = _batch(np.random.default_rng(1), n=12)
  batch["weight"][3] = 0.0  # a padding row: left out of every term
  step_kwargs = dict(difference_weight=0.3, drss_weight=0.7, adversarial_weight=0.2)
  model = fb.feature_model(_encoder(), fb.FeatureModel(
      num_domains=K, num_labels=2, private=True,
      domain_heads=True, discriminator_hidden=6, dropout_rate=0.0))
  loss_fn = fb.feature_tl_loss(model, **step_kwargs)
  params = model.init(jax.random.PRNGKey(0), batch["input_ids"], batch["attention_mask"],
                      batch["token_type_ids"], batch["domain"])["params"]
  a = np.random.default_rng(2).normal(size=(K, K))
  omega = (a @ a.T + K * np.eye(K)).astype(np.float32)
  loss, aux = loss_fn(params, batch, jax.random.PRNGKey(1), True, omega, 1.0)
  out = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                    batch["token_type_ids"], batch["domain"])
  keep = batch["weight"] > 0

  def ce(logits, labels):
    logits = np.asarray(logits, np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return -logp[np.arange(len(labels)), labels][keep].mean()

  def unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)

  diff = sum(np.sum((unit(out.shared)[keep & (batch["domain"] == d)].T
                     @ unit(out.private[d])[keep & (batch["domain"] == d)]) ** 2)
             for d in range(K))
  w = np.asarray(unbox(params)["shared_kernel"], np.float64).reshape(K, -1).T
  reg = np.trace(w @ np.linalg.inv(omega) @ w.T)
  task, dom = ce(out.logits, batch["labels"]), ce(out.domain_logits, batch["domain"])
  np.testing.assert_allclose(aux["task_loss"], task, rtol=1e-5)
  np.testing.assert_allclose(aux["difference_loss"], diff, rtol=1e-5)
  np.testing.assert_allclose(aux["domain_loss"], dom, rtol=1e-5)
  np.testing.assert_allclose(aux["drss_regularizer"], reg, rtol=1e-5)
  np.testing.assert_allclose(loss, task + 0.3 * diff + 0.2 * dom + 0.7 * reg, rtol=1e-5)


def test_domain_and_common_heads_match_numpy():
  """logits = [s; p_d] . head + b  +  s . Ws[d] + p_d . Wp[d] + b[d] for a row of
  domain d, recomputed in numpy from the parameters and encoder outputs."""
  batch = _batch(np.random.default_rng(7), n=9)
  model = fb.feature_model(_encoder(), fb.FeatureModel(
      num_domains=K, num_labels=2, private=True,
      domain_heads=True, discriminator_hidden=None, dropout_rate=0.0,
      make_private_encoder=_encoder(4), common_head=True))
  args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
          batch["domain"])
  params = unbox(model.init(jax.random.PRNGKey(0), *args)["params"])
  out = model.apply({"params": params}, *args)
  s, d = np.asarray(out.shared, np.float64), batch["domain"]
  p = np.asarray(out.private, np.float64)[d, np.arange(len(d))]
  x = np.concatenate([s, p], -1)
  f64 = lambda a: np.asarray(a, np.float64)
  want = (x @ f64(params["head"]["kernel"]) + f64(params["head"]["bias"])
          + np.einsum("bd,bdc->bc", s, f64(params["shared_kernel"])[d])
          + np.einsum("be,bec->bc", p, f64(params["private_kernel"])[d])
          + f64(params["bias"])[d])
  np.testing.assert_allclose(out.logits, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.features, x, rtol=1e-6)
  assert out.private.shape == (K, 9, 4)


def test_adversary_reverses_the_encoder_gradient():
  """Through gradient reversal the shared encoder gets -lambda times the domain
  loss's plain gradient, the discriminator the plain gradient itself."""
  batch = _batch(np.random.default_rng(3))
  model = fb.feature_model(_encoder(), fb.FeatureModel(
      num_domains=K, num_labels=2, private=False,
      domain_heads=False, discriminator_hidden=6, dropout_rate=0.0))
  loss_fn = fb.feature_tl_loss(model, adversarial_weight=1.0)
  params = model.init(jax.random.PRNGKey(0), batch["input_ids"], None, None,
                      batch["domain"])["params"]

  def domain_grads(scale):
    return jax.grad(lambda p: loss_fn(p, batch, jax.random.PRNGKey(0), True, None, scale)[1]
                    ["domain_loss"])(params)

  reversed_, plain = domain_grads(0.5), domain_grads(-1.0)  # -1: identity backward
  jax.tree.map(lambda g, h: np.testing.assert_allclose(g, -0.5 * h, rtol=1e-5,
                                                       atol=1e-9),
               unbox(reversed_["shared"]), unbox(plain["shared"]))
  jax.tree.map(lambda g, h: np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-9),
               unbox(reversed_["discriminator"]), unbox(plain["discriminator"]))


def test_omega_is_the_numpy_closed_form_of_the_updated_weights():
  batch = _batch(np.random.default_rng(4))
  step = fb.drss(_encoder(), _sgd(0.5), num_domains=K, drss_weight=0.1, omega_every=2,
                 dropout_rate=0.0)
  state = step.init(jax.random.PRNGKey(0), batch)
  np.testing.assert_allclose(state.omega, np.eye(K) / K)
  update = jax.jit(step.update)
  state1, _ = update(state, batch)
  np.testing.assert_array_equal(state1.omega, state.omega)  # step 1: not an Omega step
  state2, metrics = update(state1, batch)
  w = np.asarray(shared_head_weights(unbox(state2.params)), np.float64)
  w /= np.linalg.norm(w)  # the step's ridge (1e-3) is relative to tr(W^T W)
  evals, evecs = np.linalg.eigh(w.T @ w + 1e-3 * np.eye(K))
  root = (evecs * np.sqrt(evals)) @ evecs.T
  np.testing.assert_allclose(state2.omega, root / np.trace(root), rtol=1e-4, atol=1e-6)
  corr = fb.domain_relationships(state2)
  np.testing.assert_allclose(metrics["omega/0_2"], corr[0, 2], rtol=1e-6)


def _related_domains(n, seed):
  """Domains 0 and 1 label by (nearly) the same token scores; domain 2 by its own."""
  r = np.random.default_rng(0)
  v = r.normal(size=VOCAB)
  scores = np.stack([v, v + 0.2 * r.normal(size=VOCAB), r.normal(size=VOCAB)])
  g = np.random.default_rng(seed)
  ids = g.integers(1, VOCAB, (n, LENGTH)).astype(np.int32)
  domain = g.integers(0, K, n).astype(np.int32)
  labels = (scores[domain[:, None], ids].sum(1) > 0).astype(np.int32)
  return {"input_ids": ids, "attention_mask": np.ones_like(ids),
          "token_type_ids": np.zeros_like(ids), "labels": labels, "domain": domain,
          "weight": np.ones(n, np.float32)}


def test_drss_recovers_a_known_domain_relationship():
  steps, size = 250, 48
  data = _related_domains(steps * size, seed=1)
  tx = make_optimizer("adamw", learning_rate=2e-2, total_steps=steps, weight_decay=0.0)
  step = fb.drss(_encoder(16), tx, num_domains=K, drss_weight=1e-3, dropout_rate=0.0)
  # One epoch of the data through the Trainer.
  trainer, result = fit_lib.fit_arrays(step, data, num_steps=steps, batch_size=size,
                                       seed=0)
  test = _related_domains(600, seed=2)
  assert fit_lib.accuracy(trainer, result.state, test) > 0.7
  corr = fb.domain_relationships(result.state)
  assert corr[0, 1] > 0.8, corr
  assert corr[0, 1] > max(corr[0, 2], corr[1, 2]) + 0.3, corr


@pytest.mark.parametrize("method", ["shared_private_adv", "drss"])
def test_sharded_steps_equal_one_device(method):
  batch = _batch(np.random.default_rng(5), n=16)
  step = fb.FEATURE_METHODS[method](_encoder(), _sgd(0.2), num_domains=K,
                                    dropout_rate=0.0)
  rng = jax.random.PRNGKey(0)

  def run(update, state):
    out = []
    for _ in range(3):
      state, metrics = update(state, batch)
      out.append(metrics)
    return state, out

  ref_state, ref_metrics = run(jax.jit(step.update), step.init(rng, batch))
  mesh = mesh_lib.make_mesh({"data": 8})
  rules = rules_lib.get_rules("dp")
  state_sh = partitioning.state_shardings(jax.eval_shape(step.init, rng, batch), mesh,
                                          rules)
  batch_sh = partitioning.batch_sharding(mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    init = jax.jit(step.init, out_shardings=state_sh)
    update = jax.jit(step.update, in_shardings=(state_sh, batch_sh),
                     out_shardings=(state_sh, None))
    state, metrics = run(update, init(rng, batch))
  assert state.params["shared"]["embed"]["embedding"].value.sharding.is_fully_replicated
  for got, want in zip(metrics, ref_metrics):
    for name in want:
      np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6,
                                 err_msg=name)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               unbox(state.params), unbox(ref_state.params))
  if method == "drss":
    np.testing.assert_allclose(state.omega, ref_state.omega, rtol=1e-5, atol=1e-6)


def test_bad_configurations_are_named():
  batch = _batch(np.random.default_rng(6))
  step = fb.drss(_encoder(), _sgd(), num_domains=2)
  with pytest.raises(ValueError, match=r"num_domains=2.*\[0, 2\)"):
    step.init(jax.random.PRNGKey(0), batch)
  model = fb.feature_model(_encoder(), fb.FeatureModel(
      num_domains=K, num_labels=2, private=False,
      domain_heads=False, discriminator_hidden=None, dropout_rate=0.0))
  with pytest.raises(ValueError, match="domain_heads"):
    fb.feature_tl_step(model, _sgd(), fb.FeatureTL(drss_weight=1.0))
  with pytest.raises(ValueError, match="discriminator"):
    fb.feature_tl_step(model, _sgd(), fb.FeatureTL(adversarial_weight=1.0))
  with pytest.raises(ValueError, match="private encoders"):
    fb.feature_tl_step(model, _sgd(), fb.FeatureTL(difference_weight=1.0))
  with pytest.raises(ValueError, match="'domain'"):
    fb.fully_shared(_encoder(), _sgd(), num_domains=K).init(
        jax.random.PRNGKey(0), {k: v for k, v in batch.items() if k != "domain"})
  with pytest.raises(ValueError,
                     match=r"drss: unknown setting\(s\) \['discriminator_hidden'\]"):
    fb.drss(_encoder(), _sgd(), num_domains=K, discriminator_hidden=8)
  with pytest.raises(ValueError,
                     match=r"fully_shared: unknown setting\(s\) \['omega_evry'\]"):
    fb.fully_shared(_encoder(), _sgd(), num_domains=K, omega_evry=2)
  with pytest.raises(ValueError,
                     match=r"shared_private: missing setting\(s\) \['num_domains'\]"):
    fb.shared_private(_encoder(), _sgd())
  with pytest.raises(ValueError, match="state has no Omega"):
    fb.domain_relationships(fb.fully_shared(_encoder(), _sgd(), num_domains=K).init(
        jax.random.PRNGKey(0), batch))
