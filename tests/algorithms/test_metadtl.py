"""MetaDTL: class relations, transferability and the loss against numpy, the episode
against etjax.algorithms.meta, head slicing, one-step smoke, and a small Table 12
cell (sentiment3 -> polarity) end to end as paired claims."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import distill_fixtures as fx
from paired_claims import K_SE, SEEDS, assert_paired_gain
from etjax import main
from etjax.algorithms import meta, optim
from etjax.algorithms import metadtl as md
from etjax.algorithms.finetune import finetune
from etjax.algorithms.step import unbox
from etjax.experiments import cross_task, tl_meta

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
  return md.MetaDTLObjective(tiny(), md.MetaDTLSettings(num_labels=NUM_LABELS, **kw))


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
  # The experiments' recipe carry starts fine-tuning at exactly the cut classifier.
  ft = finetune(target, tx)
  carried = tl_meta.carry_task(NUM_LABELS)(new, jax.jit(ft.init)(jax.random.PRNGKey(9),
                                                                   batch))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b),
               unbox(carried.params), unbox(cut))
  with pytest.raises(ValueError, match="sum to"):
    md.metadtl(fx.classifier(16, 1, 60, classes=4), tx, num_labels=NUM_LABELS)
  with pytest.raises(ValueError, match="'domain'"):
    step.update(state, {k: v for k, v in batch.items() if k != "domain"})
  with pytest.raises(ValueError, match="task 2"):
    md.task_params(new.params["model"], NUM_LABELS, 2)


@functools.lru_cache(maxsize=None)
def sentiment_pair(seed: int) -> cross_task.CrossTask:
  """Table 12's synthetic pair, smaller: 3-way sentiment of 600 media reviews ->
  2-way polarity of 1,000 goods reviews (400 test)."""
  return cross_task.synthetic_pair(seed, source_size=600, target_size=1000,
                                   eval_size=400)


@functools.lru_cache(maxsize=None)
def cross_task_accuracies() -> dict:
  """{'single', 'metadtl', 'majority': [test accuracy per seed of SEEDS]}: a smaller
  Table 12 cell through the experiment's own code (`tl_meta.table12_cell`: the recipe
  MetaDTL meta-learner over source + share -> target head cut out -> fine-tuned on the
  share, each stage through the Trainer; metadtl.gin's settings) with 10% of the
  target (100 reviews), 400 meta steps and 200 fine-tuning steps; single-task
  fine-tuning on the same share; and the test set's majority-class rate."""
  settings = main.algorithm_settings()
  steps: dict = {}
  out: dict = {}
  for seed in SEEDS:
    pair = sentiment_pair(seed)
    steps = steps or tl_meta.table12_steps(pair, "bert", None, 400, 200, settings)
    for arm in ("single", "metadtl"):
      out.setdefault(arm, []).append(
          tl_meta.table12_cell(arm, pair, 10, steps, seed, 400, 200) / 100)
    labels = pair.evaluation["labels"]
    out.setdefault("majority", []).append(np.bincount(labels).max() / len(labels))
  return out


@pytest.mark.slow
def test_metadtl_sentiment3_to_polarity_end_to_end():
  """Paired over seeds 0-4 (`cross_task_accuracies`). The claim fixed before
  measuring, (a) MetaDTL's mean paired gain over single-task fine-tuning > 2 standard
  errors, did NOT hold: the gains measured +0.0175, +0.02, +0.03, -0.02, -0.0225 (mean
  +0.005, SE 0.011; as in RESULTS.md's Table 12, where MetaDTL is within noise of
  single-task on both pairs). What is true and asserted: (b) MetaDTL learns the target
  through its whole pipeline, beating the test set's majority-class rate by more than
  2 standard errors (measured gains 0.11-0.175), and (c) it does not hurt against
  single-task fine-tuning (mean paired gain above -2 standard errors)."""
  results = cross_task_accuracies()
  gain = lambda a, b: np.subtract(results[a], results[b])
  assert_paired_gain(gain("metadtl", "majority"), context=results)
  assert_paired_gain(gain("metadtl", "single"), k=-K_SE, context=results)
