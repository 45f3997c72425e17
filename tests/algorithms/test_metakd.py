"""MetaKD: expertise weights against numpy, the step against distill's objective on
the reweighted batch, a frozen teacher, and a meta-distilled student end to end."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

import distill_fixtures as fx
from etjax import data as data_lib
from etjax.algorithms import distill as distill_lib
from etjax.algorithms import metakd as mk
from etjax.algorithms import optim
from etjax.algorithms.finetune import finetune
from etjax.algorithms.step import next_rng, unbox
from etjax.data import synthetic

K, C = 3, 2


def test_expertise_weights_match_numpy():
  rng = np.random.default_rng(0)
  b, d = 9, 5
  logits = rng.normal(size=(b, C)).astype(np.float32) * 2
  feats = rng.normal(size=(b, d)).astype(np.float32)
  domains = rng.integers(0, K, b)
  protos = rng.normal(size=(K, C, d)).astype(np.float32)
  counts = np.array([[2, 1], [0, 3], [4, 4]], np.float32)
  mask = np.ones(b, bool)
  mask[[2, 7]] = False
  got = mk.expertise_weights(logits, feats, domains, protos, counts,
                             own_domain_weight=0.3, mask_b=mask)
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  cos = lambda u, v: u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
  e = np.zeros(b)
  for i in range(b):
    c, k = probs[i].argmax(), domains[i]
    own = cos(feats[i], protos[k, c]) if counts[k, c] > 0 else 0.0
    others = [cos(feats[i], protos[j, c]) for j in range(K) if j != k and counts[j, c] > 0]
    t = 0.3 * own + 0.7 * (np.mean(others) if others else 0.0)
    e[i] = probs[i].max() * (1 + t) / 2
  want = np.where(mask, e / e[mask].mean(), 0.0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def domain_batch(seed=0, batch=8, vocab=60):
  b = fx.random_batch(seed, batch=batch, vocab=vocab, classes=C)
  b["domain"] = (np.arange(batch) % K).astype(np.int32)
  b["weight"][-1] = 0.0
  return b


def test_step_is_distill_on_the_expertise_weighted_batch_and_teacher_is_frozen():
  batch = domain_batch()
  teacher = fx.classifier(16, 2, 60, classes=C)
  teacher_params = unbox(teacher.init(jax.random.PRNGKey(1), batch["input_ids"])["params"])
  student = fx.classifier(8, 1, 60, classes=C)
  protos = (np.asarray(jax.random.normal(jax.random.PRNGKey(2), (K, C, 16))),
            np.array([[1, 1], [1, 0], [2, 3]], np.float32))
  tx = optim.make_optimizer("adamw", learning_rate=1e-3, total_steps=10)
  step = mk.metakd(student, (teacher, teacher_params), tx, prototypes=protos,
                   temperature=2.0)
  state = jax.jit(step.init)(jax.random.PRNGKey(0), batch)
  new, metrics = jax.jit(step.update)(state, batch)
  # The same loss from distill's objective on the batch reweighted by numpy-free
  # expertise weights of the teacher.
  out = teacher.apply({"params": teacher_params}, batch["input_ids"],
                      batch["attention_mask"], batch["token_type_ids"])
  w = mk.expertise_weights(out.logits, out.features, batch["domain"], *protos,
                           mask_b=batch["weight"] > 0)
  objective = distill_lib.DistillLoss(student, (teacher, teacher_params),
                                      mk.DEFAULT_LOSSES, temperature=2.0)
  want, _ = jax.jit(objective.loss, static_argnums=4)(
      state.params, state.teacher_params, dict(batch, weight=batch["weight"] * w),
      next_rng(state)[0], False)
  np.testing.assert_allclose(metrics["loss"], want, rtol=1e-5)
  assert float(metrics["expertise_min"]) > 0 and np.isfinite(float(metrics["loss"]))
  assert int(new.step) == 1
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b),
               unbox(new.teacher_params), teacher_params)
  np.testing.assert_array_equal(new.prototypes_kcd, protos[0])
  assert jax.jit(step.predict)(new, batch)["logits"].shape == (8, C)
  with pytest.raises(ValueError, match="prototypes"):
    mk.metakd(student, (teacher, teacher_params), tx, prototypes=(protos[0][:, :1],
                                                                    protos[1]))
  with pytest.raises(ValueError, match="'domain'"):
    step.update(state, {k: v for k, v in batch.items() if k != "domain"})


@functools.lru_cache(maxsize=None)
def multi_domain_data(seed: int = 0):
  """Encoded {'train': 300 reviews per domain, 'labelled': 10 per domain, 'test': 100
  per domain} of the four synthetic domains, and the tokenizer."""
  splits = synthetic.multi_domain_splits({d: (300, 10, 100) for d in synthetic.DOMAINS},
                                         seed=seed)
  texts = [ex.text_a for parts in splits.values() for part in parts.values()
           for ex in part]
  tokenizer = data_lib.build_wordpiece_tokenizer(texts, vocab_size=600)
  enc = lambda split: data_lib.encode_examples(
      [ex for d in synthetic.DOMAINS for ex in splits[d][split]], tokenizer,
      fx.MAX_LENGTH)
  return tokenizer, {"train": enc("train"), "labelled": enc("dev"), "test": enc("test")}


def test_metakd_student_beats_student_without_distillation():
  """Meta-teacher (width 64, 2 layers) on 4 x 300 reviews; a width-32, 1-layer student
  fine-tuned on 4 x 10 labelled reviews vs meta-distilled over the 1,200. Measured at
  seed 0 (8 CPU devices): teacher 0.7525, plain student 0.535, MetaKD student 0.765.
  The teacher's typicality temperature is Table 10's 2.0 (chosen there on held-out
  seeds): at metaft's default 0.5 the teacher measured 0.71-0.74 from run to run, around
  the 0.72 this test asks of it. At learning rate 3e-3 the meta-teacher's accuracy
  varied from 0.50 to 0.73 between runs (float reduction order on a busy CPU), hence
  1e-3."""
  tokenizer, data = multi_domain_data()
  teacher = fx.classifier(64, 2, tokenizer.vocab_size, dropout=0.1)
  tx = optim.make_optimizer("adamw", learning_rate=1e-3, total_steps=300,
                            warmup_steps=20)
  teacher_step = mk.meta_teacher(teacher, tx, num_domains=4, temperature=2.0)
  teacher_state, _ = fx.fit(teacher_step, data["train"], 300)
  teacher_acc = fx.accuracy(teacher_step, teacher_state, data["test"])
  teacher_params = jax.device_get(unbox(teacher_state.params["model"]))
  protos = mk.teacher_prototypes(teacher, teacher_params, data_lib.eval_batches(
      data["train"], 200, process_count=1, process_index=0), num_domains=4)
  student = fx.classifier(32, 1, tokenizer.vocab_size)
  steps = 120
  student_tx = optim.make_optimizer("adamw", learning_rate=3e-3, total_steps=steps)
  plain = finetune(student, student_tx)
  state, _ = fx.fit(plain, data["labelled"], steps, batch_size=20)
  plain_acc = fx.accuracy(plain, state, data["test"])
  kd = mk.metakd(student, (teacher, teacher_params), student_tx, prototypes=protos,
                 temperature=2.0)
  state, _ = fx.fit(kd, data["train"], steps, batch_size=20)
  kd_acc = fx.accuracy(kd, state, data["test"])
  assert teacher_acc > 0.72, teacher_acc
  assert kd_acc > plain_acc + 0.08, (kd_acc, plain_acc, teacher_acc)
