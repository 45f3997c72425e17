"""MetaDTL: class relations, transferability and the loss against numpy, the episode
against etjax.algorithms.meta, head slicing, one-step smoke, nli3 -> nli2 end to end."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import distill_fixtures as fx
from etjax import data as data_lib
from etjax.algorithms import meta, optim
from etjax.algorithms import metadtl as md
from etjax.algorithms import metaft as mf
from etjax.algorithms.finetune import finetune
from etjax.algorithms.step import unbox
from etjax.data import synthetic

NUM_LABELS = (3, 2)
C = 5


def np_cos(a, b):
  return a @ b.T / (np.linalg.norm(a, axis=-1)[:, None] * np.linalg.norm(b, axis=-1)[None])


def np_relations(protos, counts, temperature):
  task = np.array([0, 0, 0, 1, 1])
  cos = np_cos(protos, protos)
  rel = np.zeros((C, C))
  for c in range(C):
    cols = [j for j in range(C) if task[j] != task[c] and counts[j] > 0]
    if cols:
      e = np.exp(cos[c, cols] / temperature)
      rel[c, cols] = e / e.sum()
  return rel


def test_layout_relations_and_transferability_match_numpy():
  offsets, class_task = md.task_layout(NUM_LABELS)
  np.testing.assert_array_equal(offsets, [0, 3])
  np.testing.assert_array_equal(class_task, [0, 0, 0, 1, 1])
  rng = np.random.default_rng(0)
  protos = rng.normal(size=(C, 6)).astype(np.float32)
  counts = np.array([2, 0, 1, 3, 0], np.float32)
  rel = md.class_relations(protos, counts, class_task, temperature=0.3)
  want = np_relations(protos.astype(np.float64), counts, 0.3)
  np.testing.assert_allclose(rel, want, rtol=1e-5, atol=1e-7)
  # No seen class in the other task: a zero row.
  rel0 = md.class_relations(protos, np.array([1, 1, 1, 0, 0], np.float32), class_task,
                            temperature=0.3)
  np.testing.assert_array_equal(np.asarray(rel0)[:3], 0.0)
  feats = rng.normal(size=(7, 6)).astype(np.float32)
  classes = rng.integers(0, C, 7)
  got = md.transferability(feats, classes, protos, rel)
  np.testing.assert_allclose(got, (want[classes] * np_cos(feats, protos)).sum(-1),
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="num_labels"):
    md.task_layout((3,))


@functools.lru_cache(maxsize=None)
def tiny():
  return fx.classifier(16, 1, 60, classes=C)


def task_batch(seed=0, batch=10):
  b = fx.random_batch(seed, batch=batch, vocab=60, classes=2)
  b["domain"] = (np.arange(batch) % 2).astype(np.int32)
  b["labels"] = np.where(b["domain"] == 0, np.arange(batch) % 3, b["labels"]).astype(
      np.int32)
  b["weight"][-1] = 0.0
  return b


def objective(**changes):
  kw = dict(relation_weight=0.4, relation_temperature=0.2, typicality=True,
            temperature=0.5, momentum=0.9, inner_lr=None, inner_steps=0,
            first_order=False, meta_weight=1.0)
  kw.update(changes)
  return md.MetaDTLObjective(tiny(), NUM_LABELS, **kw)


def np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_loss_matches_numpy():
  batch, rng = task_batch(), jax.random.PRNGKey(1)
  obj = objective()
  params = obj.init(jax.random.PRNGKey(0), batch)
  protos0 = np.asarray(jax.random.normal(jax.random.PRNGKey(2), (1, C, 16)))
  counts0 = np.array([[1, 0, 2, 0, 4]], np.float32)
  loss, aux = jax.jit(obj.loss, static_argnums=5)(params, protos0, counts0, batch, rng,
                                                  True)
  feats, logits = (np.asarray(aux["features"], np.float64),
                   np.asarray(aux["logits"], np.float64))
  classes = np.array([0, 3])[batch["domain"]] + batch["labels"]
  mask = batch["weight"] > 0
  protos, counts = protos0[0].astype(np.float64), counts0[0].copy()
  for c in range(C):
    rows = (classes == c) & mask
    if rows.any():
      mean = feats[rows].mean(0)
      protos[c] = 0.9 * protos[c] + 0.1 * mean if counts[c] > 0 else mean
      counts[c] += rows.sum()
  np.testing.assert_allclose(aux["prototypes_kcd"][0], protos, rtol=1e-5, atol=1e-6)
  rel = np_relations(protos, counts, 0.2)
  np.testing.assert_allclose(aux["relations"], rel, rtol=1e-5, atol=1e-6)
  t = (rel[classes] * np_cos(feats, protos)).sum(-1)
  e = np.exp((t[mask] - t[mask].max()) / 0.5)
  w = np.zeros(len(t))
  w[mask] = mask.sum() * e / e.sum()
  np.testing.assert_allclose(aux["weights"], w, rtol=1e-5, atol=1e-6)
  own = np.array([[0, 0, 0, 1, 1]]) == batch["domain"][:, None]
  own_logp = np_log_softmax(np.where(own, logits, -np.inf))
  task = -(w * own_logp[np.arange(len(w)), classes]).sum() / w.sum()
  other_logp = np_log_softmax(np.where(~own, logits, -np.inf))
  soft = -(rel[classes] * np.where(rel[classes] > 0, other_logp, 0.0)).sum(-1)
  relation = (w * soft).sum() / w.sum()
  np.testing.assert_allclose(aux["task_loss"], task, rtol=1e-5)
  np.testing.assert_allclose(aux["relation_loss"], relation, rtol=1e-5)
  np.testing.assert_allclose(loss, task + 0.4 * relation, rtol=1e-5)


def test_episode_is_the_meta_gradient_across_tasks():
  """First order (the second-order path is the same `episode_loss`, checked in
  test_metaft)."""
  batch, rng = task_batch(1), jax.random.PRNGKey(4)
  obj = objective(relation_weight=0.0, inner_lr=0.3, inner_steps=1, first_order=True)
  base = objective(relation_weight=0.0)
  params = obj.init(jax.random.PRNGKey(0), batch)
  zeros = (jnp.zeros((1, C, 16)), jnp.zeros((1, C)))
  grad = lambda o: jax.jit(jax.grad(
      lambda p: o.loss(p, *zeros, batch, rng, True), has_aux=True))(params)
  g_all, aux = grad(obj)
  g_base, _ = grad(base)
  task = int(aux["episode_group"])
  assert task in (0, 1)
  w = np.asarray(aux["weights"])
  support = dict(batch, weight=w * (batch["domain"] == task))
  query = dict(batch, weight=w * (batch["domain"] != task))
  inner = lambda p, b: obj.task_loss(p, b, jax.random.split(rng)[0], True)
  meta_loss, want = jax.jit(lambda p: meta.meta_gradient(
      inner, p, support, query, inner_lr=0.3, inner_steps=1, first_order=True))(
          params["model"])
  np.testing.assert_allclose(aux["meta_loss"], meta_loss, rtol=1e-5)
  got = jax.tree.map(lambda a, b: a - b, unbox(g_all), unbox(g_base))
  jax.tree.map(lambda g, x: np.testing.assert_allclose(g, x, rtol=1e-4, atol=1e-6),
               got["model"], unbox(want))


def test_one_step_smoke_task_params_and_errors():
  batch = task_batch(2)
  tx = optim.make_optimizer("adamw", learning_rate=1e-3, total_steps=10)
  step = md.metadtl(tiny(), tx, num_labels=NUM_LABELS, first_order=True)
  state = jax.jit(step.init)(jax.random.PRNGKey(0), batch)
  new, metrics = jax.jit(step.update)(state, batch)
  assert int(new.step) == 1 and all(np.isfinite(float(v)) for v in metrics.values())
  assert new.prototypes_kcd.shape == (1, C, 16)
  meta_logits = np.asarray(jax.jit(step.predict)(new, batch)["logits"])
  # The target task's classifier cut from the meta-learner gives its logit columns.
  target = fx.classifier(16, 1, 60, classes=2)
  cut = md.task_params(new.params["model"], NUM_LABELS, 1)
  logits = target.apply({"params": cut}, batch["input_ids"], batch["attention_mask"],
                        batch["token_type_ids"]).logits
  np.testing.assert_allclose(logits, meta_logits[:, 3:], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="sum to"):
    md.metadtl(fx.classifier(16, 1, 60, classes=4), tx, num_labels=NUM_LABELS)
  with pytest.raises(ValueError, match="'domain'"):
    step.update(state, {k: v for k, v in batch.items() if k != "domain"})
  with pytest.raises(ValueError, match="task 2"):
    md.task_params(new.params["model"], NUM_LABELS, 2)


@functools.lru_cache(maxsize=None)
def nli_data(seed: int = 0):
  """Encoded (nli3 train as task 0 + nli2 train as task 1, nli2 train, nli2 test)."""
  splits = synthetic.cross_task_splits((600, 0, 0), (60, 0, 400), seed=seed)
  texts = [t for task in splits.values() for part in task.values() for ex in part
           for t in (ex.text_a, ex.text_b)]
  tokenizer = data_lib.build_wordpiece_tokenizer(texts, vocab_size=600)
  enc = lambda ex: data_lib.encode_examples(ex, tokenizer, 48)
  nli3, nli2 = enc(splits["nli3"]["train"]), enc(splits["nli2"]["train"])
  as_task = lambda d, t: dict(d, domain=np.full_like(d["domain"], t))
  mixed = data_lib.concatenate([as_task(nli3, 0), as_task(nli2, 1)])
  return tokenizer, mixed, nli2, enc(splits["nli2"]["test"])


def test_metadtl_nli3_to_nli2_end_to_end():
  """MetaDTL on 600 nli3 + 60 nli2 pairs, its nli2 head cut out and fine-tuned on the
  60, against fine-tuning on the 60 alone. Tiny models (width 32, 1 layer) do not
  learn the synthetic NLI tasks at this budget (nor a width-64, 2-layer model on
  4,000 nli3 pairs in 1,500 steps: 33% on 3 classes), so both stay near chance
  (measured at seed 0 under pytest: 0.515 single task, 0.525 MetaDTL); what is
  asserted is the robust part: the pipeline runs, its losses are finite, and the
  fine-tuned model does not fall clearly below the target-only baseline."""
  tokenizer, mixed, target, test = nli_data()
  meta_steps, ft_steps = 100, 40
  tx = optim.make_optimizer("adamw", learning_rate=3e-3, total_steps=meta_steps)
  step = md.metadtl(fx.classifier(32, 1, tokenizer.vocab_size, classes=C), tx,
                    num_labels=NUM_LABELS, first_order=True)
  meta_state, metrics = fx.fit(step, mixed, meta_steps)
  assert all(np.isfinite(float(v)) for v in metrics.values())
  assert np.all(np.asarray(meta_state.counts_kc) > 0)
  ft_tx = optim.make_optimizer("adamw", learning_rate=2e-3, total_steps=ft_steps)
  single = finetune(fx.classifier(32, 1, tokenizer.vocab_size, classes=2), ft_tx)
  state, _ = fx.fit(single, target, ft_steps, batch_size=20)
  single_acc = fx.accuracy(single, state, test)
  from_meta = mf.start_from(single, md.task_params(meta_state.params["model"],
                                                   NUM_LABELS, 1), ft_tx)
  state, _ = fx.fit(from_meta, target, ft_steps, batch_size=20)
  meta_acc = fx.accuracy(from_meta, state, test)
  assert meta_acc >= single_acc - 0.08, (meta_acc, single_acc)
