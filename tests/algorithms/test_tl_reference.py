"""The composed TL steps against hand-written references of their updates.

Feature-based (FullyShared, SharedPrivate-Adv, DRSS-Adv, domain-blocked too): three
SGD updates in float64 equal p <- p - lr * grad of the closed-form sum
    L = CE + a ||S_d^T P_d||^2 (per domain, unit rows) + b CE(D(R(S)), domain)
        + c tr(W Omega^-1 W^T)
written here in jnp from the model's outputs, with Omega from numpy's closed form.
(The domain discriminator computes in float32, so with it the tolerance is float32's.)
Instance-based (RTL, MGTL): one update equals the steps of the module docstring
written out here (selected rows' weighted CE plus MGTL's binary domain CE, the
source_gain reward against a target-only SGD step, normalized advantage plus MGTL's
immediate rewards, REINFORCE with entropy bonus); the TL model in float64, the
selector (a float32 policy) at float32's tolerance.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from etjax.algorithms import feature_based as fb
from etjax.algorithms import instance_based as ib
from etjax.algorithms import policy, unbox
from etjax.models import SequenceClassifier
from etjax.models.bag import BagOfEmbeddings

VOCAB, LENGTH, K = 40, 8, 3


def _batch(seed, n=12):
  g = np.random.default_rng(seed)
  weight = np.ones(n)
  weight[4] = 0.0  # padding: counts in no term
  return {"input_ids": g.integers(1, VOCAB, (n, LENGTH)).astype(np.int32),
          "attention_mask": (g.random((n, LENGTH)) < 0.8).astype(np.int32),
          "token_type_ids": np.zeros((n, LENGTH), np.int32),
          "labels": g.integers(0, 2, n).astype(np.int32),
          "domain": np.repeat(np.arange(K), n // K).astype(np.int32), "weight": weight}


def _ce_rows(logits, labels):
  return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1)[:, 0]


def _mean(w, x):
  return jnp.sum(w * x) / jnp.sum(w)


def _unit(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _reference_feature_loss(model, weights, lam):
  dw, aw, rw = weights

  def loss(p, batch, omega):
    out = model.apply({"params": p}, batch["input_ids"], batch["attention_mask"],
                      batch["token_type_ids"], batch["domain"], grl_scale=lam)
    w, d = batch["weight"], batch["domain"]
    total = _mean(w, _ce_rows(out.logits, batch["labels"]))
    if dw:
      s, own = _unit(out.shared), _unit(out.private[d, jnp.arange(len(d))])
      keep = (w > 0)[:, None]
      total += dw * sum(jnp.sum((jnp.where(keep & (d == k)[:, None], s, 0).T
                                 @ jnp.where(keep & (d == k)[:, None], own, 0)) ** 2)
                        for k in range(K))
    if aw:
      total += aw * _mean(w, _ce_rows(out.domain_logits, d))
    if rw:
      wk = unbox(p)["shared_kernel"].reshape(K, -1).T
      total += rw * jnp.trace(wk @ jnp.linalg.inv(omega) @ wk.T)
    return total
  return loss


def _numpy_omega(p, eps=1e-3):
  w = np.asarray(unbox(p)["shared_kernel"], np.float64).reshape(K, -1).T
  w = w / np.linalg.norm(w)
  evals, evecs = np.linalg.eigh(w.T @ w + eps * np.eye(K))
  root = (evecs * np.sqrt(evals)) @ evecs.T
  return root / np.trace(root)


@pytest.mark.parametrize("method,weights,blocked", [
    ("fully_shared", (0.0, 0.0, 0.0), False),
    ("shared_private_adv", (0.3, 0.2, 0.0), False),
    ("drss_adv", (0.3, 0.2, 0.7), False), ("drss_adv", (0.3, 0.2, 0.7), True)])
def test_feature_steps_are_the_closed_form_sgd_update_float64(method, weights, blocked):
  lr, lam = 0.3, 0.5
  dw, aw, rw = weights
  settings = dict(difference_weight=dw, adversarial_weight=aw, drss_weight=rw)
  settings = {k: v for k, v in settings.items() if v or method != "fully_shared"}
  with jax.enable_x64(True):
    step = fb.FEATURE_METHODS[method](
        lambda: BagOfEmbeddings(vocab_size=VOCAB, hidden_size=6, dtype=jnp.float64),
        optax.sgd(lr), num_domains=K, dropout_rate=0.0, grl_scale=lam,
        domain_blocked=blocked, **(settings | ({"discriminator_hidden": 5} if aw else {})))
    batches = [_batch(s) for s in range(3)]
    state = step.init(jax.random.PRNGKey(0), batches[0])
    params = jax.tree.map(lambda x: x.astype(jnp.float64), state.params)
    state = state.replace(params=params, opt_state=optax.sgd(lr).init(params),
                          omega=None if state.omega is None else state.omega.astype(
                              jnp.float64))
    model = fb.feature_model(
        lambda: BagOfEmbeddings(vocab_size=VOCAB, hidden_size=6, dtype=jnp.float64),
        fb.FeatureModel(num_domains=K, dropout_rate=0.0, private=method != "fully_shared",
                        domain_heads=method.startswith("drss"),
                        discriminator_hidden=5 if aw else None))
    ref_grad = jax.jit(jax.value_and_grad(_reference_feature_loss(model, weights, lam)))
    # The domain discriminator computes in float32 by design (tl_modules), so with
    # it the sums hold to float32's rounding; without it, to float64's.
    rtol = 1e-6 if aw else 1e-10
    ref_p, omega = params, np.eye(K) / K
    update = jax.jit(step.update)
    for batch in batches:
      state, metrics = update(state, batch)
      loss, grads = ref_grad(ref_p, batch, omega)
      np.testing.assert_allclose(metrics["loss"], loss, rtol=rtol)
      ref_p = jax.tree.map(lambda p, g: p - lr * g, ref_p, grads)
      if rw:
        omega = _numpy_omega(ref_p)
    for got, want in zip(jax.tree.leaves(unbox(state.params)),
                         jax.tree.leaves(unbox(ref_p))):
      np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * 1e-3)
    if rw:
      np.testing.assert_allclose(state.omega, omega, rtol=rtol)


def _part(seed, n):
  g = np.random.default_rng(seed)
  ids = g.integers(1, VOCAB, (n, LENGTH)).astype(np.int32)
  weight = np.ones(n)
  weight[-1] = 0.0
  return {"input_ids": ids, "attention_mask": np.ones_like(ids),
          "token_type_ids": np.zeros_like(ids),
          "labels": g.integers(0, 2, n).astype(np.int32),
          "domain": np.zeros(n, np.int32), "weight": weight}


def _reference_selection_update(model, selector, state, batch, *, lr, sel_lr, aw, iw,
                                ew):
  """One RTL/MGTL update written out (SGD on both; step 0: baseline 0, spread 1)."""
  src, tgt, dev = batch["source"], batch["target"], batch["dev"]
  _, step_rng = jax.random.split(state.rng)
  sample_rng, _ = jax.random.split(step_rng)
  apply = lambda p, part: model.apply({"params": p}, part["input_ids"],
                                      part["attention_mask"], part["token_type_ids"])
  p0 = unbox(state.params)
  logits, feats, t_logit = apply(p0, src)
  cols = [feats.astype(jnp.float32), jax.nn.softmax(logits),
          _ce_rows(logits, src["labels"])[:, None]]
  if aw:
    cols.append(jax.nn.sigmoid(t_logit)[:, None])
  x = jnp.concatenate(cols, -1)
  z = selector.apply({"params": state.selector_params}, x)
  valid = (src["weight"] > 0).astype(jnp.float32)
  actions = policy.sample_actions(sample_rng, z) * valid.astype(jnp.int32)
  rows = {k: jnp.concatenate([tgt[k], src[k]]) for k in ("input_ids", "attention_mask",
                                                          "token_type_ids", "labels")}
  w = jnp.concatenate([tgt["weight"], src["weight"] * actions])
  is_t = jnp.concatenate([jnp.ones(len(tgt["weight"]), jnp.int32),
                          jnp.zeros(len(actions), jnp.int32)])

  def tl_loss(p, w):
    lg, _, d = apply(p, rows)
    loss = _mean(w, _ce_rows(lg, rows["labels"]))
    if aw:
      loss += aw * _mean(w, _ce_rows(jnp.stack([jnp.zeros_like(d), d], -1), is_t))
    return loss

  dev_value = lambda p: -_mean(dev["weight"], _ce_rows(apply(p, dev)[0], dev["labels"]))
  sgd = lambda p, g: jax.tree.map(lambda a, b: a - lr * b, p, g)
  p1 = sgd(p0, jax.grad(tl_loss)(p0, w))
  reward = dev_value(p1) - dev_value(sgd(p0, jax.grad(tl_loss)(p0, w * is_t)))
  adv = reward / (1.0 + 1e-8)
  if aw:
    p = jax.nn.sigmoid(t_logit)
    n = jnp.sum(valid)
    mean = jnp.sum(p * valid) / n
    std = jnp.sqrt(jnp.sum((p - mean) ** 2 * valid) / n)
    adv = adv + iw * actions * valid * (p - mean) / (std + 1e-6)

  def sel_loss(sp):
    zz = selector.apply({"params": sp}, x)
    logp = actions * jax.nn.log_sigmoid(zz) + (1 - actions) * jax.nn.log_sigmoid(-zz)
    ent = -(jax.nn.sigmoid(zz) * jax.nn.log_sigmoid(zz)
            + jax.nn.sigmoid(-zz) * jax.nn.log_sigmoid(-zz))
    return (-jnp.sum(valid * adv * logp) / jnp.sum(valid)
            - ew * jnp.sum(valid * ent) / jnp.sum(valid))

  sel = jax.tree.map(lambda a, b: a - sel_lr * b, unbox(state.selector_params),
                     jax.grad(sel_loss)(unbox(state.selector_params)))
  return p1, sel, reward


@pytest.mark.parametrize("method", ["rtl", "mgtl"])
def test_selection_step_is_the_written_out_update(method):
  lr, sel_lr, ew = 0.5, 0.2, 0.05
  aw, iw = (0.3, 0.4) if method == "mgtl" else (0.0, 0.0)
  extra = {"adversarial_weight": aw, "immediate_weight": iw,
           "discriminator_hidden": 5} if aw else {}
  with jax.enable_x64(True):
    clf = SequenceClassifier(BagOfEmbeddings(vocab_size=VOCAB, hidden_size=6,
                                             dtype=jnp.float64), num_labels=2,
                             dropout_rate=0.0)
    step = ib.build_instance_step(method, clf, optax.sgd(lr), optax.sgd(sel_lr),
                                  selector_hidden=4, entropy_weight=ew, **extra)
    batch = {"source": _part(1, 10), "target": _part(2, 6), "dev": _part(3, 8)}
    state = step.init(jax.random.PRNGKey(0), batch)
    params = jax.tree.map(lambda x: x.astype(jnp.float64), state.params)
    state = state.replace(params=params, opt_state=optax.sgd(lr).init(params))
    new_state, metrics = jax.jit(step.update)(state, batch)
    model = ib.SelectionTLModel(clf, 5 if aw else None)
    p1, sel, reward = jax.jit(functools.partial(
        _reference_selection_update, model, policy.SelectorPolicy(hidden=4), lr=lr,
        sel_lr=sel_lr, aw=aw, iw=iw, ew=ew))(state, batch)
  assert 0.0 < float(metrics["selected_fraction"]) < 1.0  # the actions matter
  np.testing.assert_allclose(metrics["reward"], reward, rtol=1e-9, atol=1e-14)
  for got, want in zip(jax.tree.leaves(unbox(new_state.params)), jax.tree.leaves(p1)):
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13)
  for got, want in zip(jax.tree.leaves(unbox(new_state.selector_params)),
                       jax.tree.leaves(sel)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
