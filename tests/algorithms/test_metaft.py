"""MetaFT: prototypes, typicality weights, corrupted-domain loss and episodes against
numpy and etjax.algorithms.meta; one-step smoke; few-shot target end to end."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import distill_fixtures as fx
from paired_claims import SEEDS, assert_paired_gain
from etjax import data as data_lib
from etjax import main
from etjax.algorithms import meta, optim
from etjax.algorithms import metaft as mf
from etjax.algorithms import prototypes as proto
from etjax.algorithms.finetune import classifier_loss, finetune
from etjax.algorithms.step import unbox
from etjax.data import synthetic
from etjax.experiments import tl_meta
from etjax.train.fit import accuracy, fit_arrays

K, C = 3, 2


def domain_batch(seed=0, batch=12, vocab=60):
  b = fx.random_batch(seed, batch=batch, vocab=vocab, classes=C)
  b["domain"] = (np.arange(batch) % K).astype(np.int32)
  b["weight"][-1] = 0.0  # a padding row
  return b


def numpy_ema(protos, counts, feats, labels, domains, mask, momentum):
  protos, counts = protos.copy(), counts.copy()
  for k in range(K):
    for c in range(C):
      rows = (labels == c) & (domains == k) & mask
      if rows.any():
        mean = feats[rows].mean(0)
        protos[k, c] = (momentum * protos[k, c] + (1 - momentum) * mean
                        if counts[k, c] > 0 else mean)
        counts[k, c] += rows.sum()
  return protos, counts


def numpy_scores(feats, labels, domains, protos, counts):
  out = []
  for h, y, k in zip(feats, labels, domains):
    cos = [h @ protos[j, y] / (np.linalg.norm(h) * np.linalg.norm(protos[j, y]))
           for j in range(K) if j != k and counts[j, y] > 0]
    out.append(np.mean(cos) if cos else 0.0)
  return np.asarray(out)


def numpy_ce(logits, labels, weights):
  logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1,
                         keepdims=True)) - logits.max(1, keepdims=True)
  losses = -logp[np.arange(len(labels)), labels]
  return (losses * weights).sum() / weights.sum()


def test_update_prototypes_matches_numpy():
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(10, 4)).astype(np.float32)
  labels, domains = rng.integers(0, C, 10), rng.integers(0, K, 10)
  mask = rng.random(10) > 0.2
  protos = rng.normal(size=(K, C, 4)).astype(np.float32)
  counts = np.array([[0, 3], [2, 0], [0, 0]], np.float32)
  got = mf.update_prototypes(jnp.asarray(protos), jnp.asarray(counts), feats, labels,
                             domains, momentum=0.7, mask_b=mask)
  want = numpy_ema(protos, counts, feats, labels, domains, mask, 0.7)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got[1], want[1], rtol=0)
  with pytest.raises(ValueError, match="momentum"):
    mf.update_prototypes(protos, counts, feats, labels, domains, momentum=1.0)


@functools.lru_cache(maxsize=None)
def tiny():
  return fx.classifier(16, 1, 60, classes=C)


def objective(**changes):
  kw = dict(num_domains=K, corruption_weight=0.3, corruption_rate=0.5,
            reversal_scale=0.0, typicality=True, own_domain_weight=0.0,
            temperature=0.5, momentum=0.9, inner_lr=None, inner_steps=0,
            first_order=False, meta_weight=1.0)
  kw.update(changes)
  return mf.MetaFTObjective(tiny(), mf.MetaFTSettings(**kw))


def run(obj, *args):
  """obj.loss under jit (eager dispatch of every op is far slower on a busy CPU)."""
  return jax.jit(obj.loss, static_argnums=5)(*args)


def test_loss_weights_and_corruption_match_numpy():
  batch = domain_batch()
  obj = objective()
  params = obj.init(jax.random.PRNGKey(0), batch)
  rng = jax.random.PRNGKey(3)
  # A state that has already seen some (domain, class) pairs.
  protos0 = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (K, C, 16)))
  counts0 = np.array([[1, 0], [0, 0], [2, 5]], np.float32)
  loss, aux = run(obj, params, protos0, counts0, batch, rng, True)
  feats, labels, domains = (np.asarray(aux["features"], np.float64), batch["labels"],
                            batch["domain"])
  mask = batch["weight"] > 0
  protos, counts = numpy_ema(protos0.astype(np.float64), counts0, feats, labels,
                             domains, mask, 0.9)
  np.testing.assert_allclose(aux["prototypes_kcd"], protos, rtol=1e-5, atol=1e-6)
  scores = numpy_scores(feats, labels, domains, protos, counts)
  np.testing.assert_allclose(aux["typicality"], scores, rtol=1e-5, atol=1e-6)
  e = np.exp((scores[mask] - scores[mask].max()) / 0.5)
  weights = np.zeros(len(scores))
  weights[mask] = mask.sum() * e / e.sum()
  np.testing.assert_allclose(aux["weights"], weights, rtol=1e-5, atol=1e-6)
  task = numpy_ce(np.asarray(aux["logits"], np.float64), labels, weights)
  # The corrupted labels are corrupt_domains with the second of three keys.
  want_corrupt = proto.corrupt_domains(jax.random.split(rng, 3)[1], domains,
                                       num_domains=K, rate=0.5)
  np.testing.assert_array_equal(aux["corrupted_domains"], want_corrupt)
  domain = numpy_ce(np.asarray(aux["domain_logits"], np.float64),
                    np.asarray(aux["corrupted_domains"]), mask.astype(np.float64))
  np.testing.assert_allclose(aux["task_loss"], task, rtol=1e-5)
  np.testing.assert_allclose(aux["domain_loss"], domain, rtol=1e-5)
  np.testing.assert_allclose(loss, task + 0.3 * domain, rtol=1e-5)
  # rate 1: every label moves to another domain; rate 0: none does.
  _, aux1 = run(objective(corruption_rate=1.0), params, protos0, counts0, batch, rng,
               True)
  assert np.all(np.asarray(aux1["corrupted_domains"]) != domains)
  _, aux0 = run(objective(corruption_rate=0.0), params, protos0, counts0, batch, rng,
               True)
  np.testing.assert_array_equal(aux0["corrupted_domains"], domains)
  # typicality=False: plain weights.
  _, plain = run(objective(typicality=False), params, protos0, counts0, batch, rng,
                 True)
  np.testing.assert_allclose(plain["weights"], batch["weight"], rtol=0)


def _grads(obj, params, batch, rng):
  zeros = (jnp.zeros((K, C, 16)), jnp.zeros((K, C)))
  return jax.jit(jax.grad(lambda p: obj.loss(p, *zeros, batch, rng, True)[0]))(params)


def test_gradient_reversal_flips_the_domain_gradient_of_the_encoder():
  batch, rng = domain_batch(1), jax.random.PRNGKey(2)
  params = objective().init(jax.random.PRNGKey(0), batch)
  plain = unbox(_grads(objective(), params, batch, rng))
  rev = unbox(_grads(objective(reversal_scale=1.0), params, batch, rng))
  task_only = unbox(_grads(objective(corruption_weight=0.0), params, batch, rng))
  # Encoder: task + domain vs task - domain; so their mean is the task gradient.
  jax.tree.map(lambda a, b, t: np.testing.assert_allclose(
      (a + b) / 2, t, rtol=1e-4, atol=1e-7), plain["model"], rev["model"],
      task_only["model"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               plain["domain_head"], rev["domain_head"])
  enc_diff = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(),
                                          plain["model"], rev["model"]))
  assert max(enc_diff) > 1e-4


def test_episode_term_equals_meta_gradient():
  """Second order, through one inner step (the smoke test runs first order, which
  etjax.algorithms.meta's own tests check)."""
  batch, rng = domain_batch(2), jax.random.PRNGKey(5)
  kw = dict(corruption_weight=0.0, inner_lr=0.5, inner_steps=1)
  obj, base = objective(**kw), objective(corruption_weight=0.0)
  params = obj.init(jax.random.PRNGKey(0), batch)
  zeros = (jnp.zeros((K, C, 16)), jnp.zeros((K, C)))
  _, aux = run(obj, params, *zeros, batch, rng, True)
  group = int(aux["episode_group"])
  assert 0 <= group < K
  weights = np.asarray(aux["weights"])
  support = dict(batch, weight=weights * (batch["domain"] == group))
  query = dict(batch, weight=weights * (batch["domain"] != group))
  model_loss = classifier_loss(tiny())
  task_loss = lambda p, b: model_loss(p, b, jax.random.split(rng, 3)[0], True)[0]
  meta_loss, want = jax.jit(lambda p: meta.meta_gradient(
      task_loss, p, support, query, inner_lr=0.5, inner_steps=1))(params["model"])
  np.testing.assert_allclose(aux["meta_loss"], meta_loss, rtol=1e-5)
  got = jax.tree.map(lambda a, b: a - b, unbox(_grads(obj, params, batch, rng)),
                     unbox(_grads(base, params, batch, rng)))
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6),
               got["model"], unbox(want))


def test_one_step_smoke_and_errors():
  batch = domain_batch(3)
  tx = optim.make_optimizer("adamw", learning_rate=1e-3, total_steps=10)
  step = mf.metaft(tiny(), tx, num_domains=K, inner_lr=0.1, inner_steps=1,
                   first_order=True)
  state = jax.jit(step.init)(jax.random.PRNGKey(0), batch)
  boxed = jax.tree.leaves(state.params, is_leaf=lambda x: isinstance(
      x, nn.LogicallyPartitioned))
  assert all(isinstance(x, nn.LogicallyPartitioned) for x in boxed)
  new, metrics = jax.jit(step.update)(state, batch)
  assert int(new.step) == 1 and all(np.isfinite(float(v)) for v in metrics.values())
  assert float(new.counts_kc.sum()) == float((batch["weight"] > 0).sum())
  assert jax.jit(step.predict)(new, batch)["logits"].shape == (12, C)
  with pytest.raises(ValueError, match="'domain'"):
    step.update(state, {k: v for k, v in batch.items() if k != "domain"})
  with pytest.raises(ValueError, match="inner_lr"):
    mf.metaft(tiny(), tx, num_domains=K, inner_steps=1)
  with pytest.raises(ValueError, match="num_domains >= 2"):
    mf.metaft(tiny(), tx, num_domains=1)
  with pytest.raises(ValueError, match="num_labels"):
    mf.metaft(tiny().encoder, tx, num_domains=K)
  # start_from: the fine-tuning state begins at the meta-learner's classifier.
  ft = mf.start_from(finetune(tiny(), tx), new.params["model"], tx)
  ft_state = jax.jit(ft.init)(jax.random.PRNGKey(9), batch)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b),
               unbox(ft_state.params), unbox(new.params["model"]))
  ft_state = jax.jit(mf.finetune_from(new.params["model"], tiny(), tx).init)(
      jax.random.PRNGKey(9), batch)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b),
               unbox(ft_state.params), unbox(new.params["model"]))
  # The experiments' recipe carry: every classifier parameter, none left fresh.
  carried = tl_meta.carry_classifier(new, jax.jit(finetune(tiny(), tx).init)(
      jax.random.PRNGKey(9), batch))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b),
               unbox(carried.params), unbox(new.params["model"]))


def test_dataset_prototypes_equal_class_prototypes_of_all_rows():
  rng = np.random.default_rng(4)
  feats = rng.normal(size=(23, 5)).astype(np.float32)
  data = {"labels": rng.integers(0, C, 23).astype(np.int32),
          "domain": rng.integers(0, K, 23).astype(np.int32),
          "weight": (rng.random(23) > 0.2).astype(np.float32), "feats": feats}
  batches = [{k: v[i:i + 7] for k, v in data.items()} for i in range(0, 23, 7)]
  got = mf.dataset_prototypes(lambda b: b["feats"], batches, num_groups=K,
                              num_classes=C)
  want = proto.class_prototypes(feats, data["labels"], data["domain"], num_classes=C,
                                num_domains=K, mask_b=data["weight"])
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got[1], want[1], rtol=0)


TARGET = "kitchen"
VOCAB = 600  # every seed's tokenizer has at most 600 ids: one compiled step for all


@functools.lru_cache(maxsize=None)
def few_shot_data(seed: int, source_size: int = 300, target_size: int = 40):
  """Encoded (meta-training rows of all four domains, target train, target test)."""
  sizes = {d: (source_size, 1, 1) for d in synthetic.DOMAINS}
  sizes[TARGET] = (target_size, 1, 400)
  splits = synthetic.multi_domain_splits(sizes, seed=seed)
  texts = [ex.text_a for parts in splits.values() for part in parts.values()
           for ex in part]
  tokenizer = data_lib.build_wordpiece_tokenizer(texts, vocab_size=VOCAB)
  enc = lambda examples: data_lib.encode_examples(examples, tokenizer, fx.MAX_LENGTH)
  meta_rows = data_lib.concatenate([enc(splits[d]["train"]) for d in synthetic.DOMAINS])
  return meta_rows, enc(splits[TARGET]["train"]), enc(splits[TARGET]["test"])


@functools.lru_cache(maxsize=None)
def few_shot_accuracies() -> dict:
  """{'single', 'metaft': [test accuracy per seed of SEEDS]}: a meta-learner
  (metaft.gin's settings) on 300 reviews of each other domain plus the 40 of the
  target (200 steps at 1e-3, Table 11's recipe), then 60 fine-tuning steps on the 40
  (`tl_meta.carry_classifier`, the recipe's carry); against the same 60 steps from
  scratch, with the same data and seeds. Every run goes through the Trainer."""
  model = fx.classifier(32, 1, VOCAB, dropout=0.1)
  meta = mf.metaft(model, optim.make_optimizer("adamw", learning_rate=1e-3,
                                               total_steps=200, warmup_steps=10),
                   **main.algorithm_settings()["metaft"]["metaft"])
  single = finetune(model, optim.make_optimizer("adamw", learning_rate=2e-3,
                                                total_steps=60))
  out: dict = {}
  for seed in SEEDS:
    meta_rows, target, test = few_shot_data(seed)
    _, meta_run = fit_arrays(meta, meta_rows, num_steps=200, batch_size=32, seed=seed)
    starts = {"single": None,
              "metaft": lambda fresh: tl_meta.carry_classifier(meta_run.state, fresh)}
    for arm, start in starts.items():
      trainer, run = fit_arrays(single, target, num_steps=60, batch_size=20, seed=seed,
                                start_from=start)
      out.setdefault(arm, []).append(accuracy(trainer, run.state, test))
  return out


@pytest.mark.slow
def test_metaft_beats_single_domain_finetuning_with_few_target_examples():
  """Claim (fixed before measuring): over seeds 0-4 the mean paired gain of MetaFT
  over single-domain fine-tuning (`few_shot_accuracies`) in test accuracy exceeds 2
  standard errors of the paired gains. It replaces a margin of 0.06 set after
  measuring, and a 3-seed version of this claim; every seed still wins, as before
  (measured gains 4.75 / 9.75 / 8 / 3.75 / 13 pt)."""
  results = few_shot_accuracies()
  metas, singles = np.asarray(results["metaft"]), np.asarray(results["single"])
  assert (metas > singles).all(), results
  assert_paired_gain(metas - singles, context=results)
