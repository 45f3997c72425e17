"""distill: the loss terms against numpy, the frozen teacher, the sharded step, and
KD helping a small student on the synthetic data."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from etjax.algorithms import distill as distill_lib
from etjax.algorithms import optim
from etjax.algorithms.finetune import finetune
from etjax.algorithms.step import unbox
from etjax.sharding import mesh as mesh_lib
from etjax.sharding import partitioning, rules as rules_lib
from tests.algorithms import distill_fixtures as fx
from tests.algorithms import paired_claims


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_mse(s, t, mask_bl, w_b):
  # mean over valid (b, l) and all features, example b weighted by w_b.
  m = (mask_bl * w_b[:, None])[..., None] * np.ones_like(t)
  return ((s - t) ** 2 * m).sum() / m.sum()


def test_terms_match_numpy():
  rng = np.random.default_rng(0)
  b, l, d, big_d, c, m, n, h = 4, 5, 3, 6, 3, 2, 4, 2
  mask = np.ones((b, l), np.float32)
  mask[1, 3:] = 0
  w = np.array([1.0, 0.5, 2.0, 0.0], np.float32)
  student = {"logits": rng.normal(size=(b, c)).astype(np.float32),
             "hidden_states": rng.normal(size=(m + 1, b, l, d)).astype(np.float32),
             "attentions": rng.dirichlet(np.ones(l), (m, b, h, l)).astype(np.float32)}
  teacher = {"logits": rng.normal(size=(b, c)).astype(np.float32),
             "hidden_states": rng.normal(size=(n + 1, b, l, big_d)).astype(np.float32),
             "attentions": rng.dirichlet(np.ones(l), (n, b, h, l)).astype(np.float32)}
  proj = {k: {"kernel": rng.normal(size=(d, big_d)).astype(np.float32),
              "bias": rng.normal(size=big_d).astype(np.float32)}
          for k in ("hidden", "embedding")}
  proj["cosine"] = {"kernel": rng.normal(size=(d, big_d)).astype(np.float32)}
  proj["pkd"] = {"kernel": rng.normal(size=(d, big_d)).astype(np.float32)}
  batch = {"attention_mask": mask, "weight": w}
  losses = {k: 1.0 for k in distill_lib.LOSSES if k != "ce"}
  temperature = 2.0
  got = distill_lib.distillation_terms(student, teacher, batch, losses,
                                       temperature=temperature, layer_map="skip",
                                       projections=proj)
  # skip map for M=2, N=4: student 1 -> 2, 2 -> 4.
  hs, ht = student["hidden_states"], teacher["hidden_states"]
  lin = lambda x, p: x @ p["kernel"] + p.get("bias", 0)
  log_ps = _np_log_softmax(student["logits"] / temperature)
  log_pt = _np_log_softmax(teacher["logits"] / temperature)
  kl = temperature ** 2 * (np.exp(log_pt) * (log_pt - log_ps)).sum(-1)
  ce = -temperature ** 2 * (np.exp(log_pt) * log_ps).sum(-1)
  want = {
      "kd": (kl * w).sum() / w.sum(),
      "soft_ce": (ce * w).sum() / w.sum(),
      "hidden_mse": sum(_np_mse(lin(hs[i], proj["hidden"]), ht[j], mask, w)
                        for i, j in ((1, 2), (2, 4))),
      "embedding_mse": _np_mse(lin(hs[0], proj["embedding"]), ht[0], mask, w),
  }
  pair = (mask[:, :, None] * mask[:, None, :])[:, None]  # [b, 1, q, k]
  att = 0.0
  for i, j in ((1, 2), (2, 4)):
    full = pair * np.ones((b, h, l, l)) * w[:, None, None, None]
    att += (((student["attentions"][i - 1] - teacher["attentions"][j - 1]) ** 2) * full
            ).sum() / full.sum()
  want["attention_mse"] = att
  # PKD: [CLS] of pairs but the last, i.e. (1, 2), normalized.
  s_cls = lin(hs[1][:, 0], proj["pkd"])
  t_cls = ht[2][:, 0]
  diff = (s_cls / np.linalg.norm(s_cls, axis=-1, keepdims=True)
          - t_cls / np.linalg.norm(t_cls, axis=-1, keepdims=True)) ** 2
  want["pkd"] = (diff.mean(-1) * w).sum() / w.sum()
  s_last = lin(hs[-1], proj["cosine"])
  cos = (s_last * ht[-1]).sum(-1) / (np.linalg.norm(s_last, axis=-1)
                                     * np.linalg.norm(ht[-1], axis=-1))
  want["cosine"] = ((1 - cos) * mask * w[:, None]).sum() / (mask * w[:, None]).sum()
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, err_msg=k)


def test_hinton_mix_equals_kd_loss_with_alpha():
  from etjax.algorithms import adabert as ab  # small non-BERT modules compile fast
  from etjax.algorithms import distill_losses as dl  # the primitive, mixed by itself
  batch = fx.random_batch(1, classes=3)
  config = ab.AdaBertConfig(vocab_size=60, num_labels=3, width=8, num_cells=1,
                            num_nodes=1, max_length=12)
  model = ab.AdaBert(config, ("identity", "identity"))
  teacher = ab.AdaBert(config, ("avgpool3", "identity"))
  tp = jax.jit(teacher.init)(jax.random.PRNGKey(3), batch["input_ids"])["params"]
  objective = distill_lib.DistillLoss(model, (teacher, tp), distill_lib.hinton(0.3),
                                      temperature=3.0)
  params, tparams = jax.jit(objective.init)(jax.random.PRNGKey(0), batch)

  @jax.jit
  def both(params, tparams, batch):
    loss, _ = objective.loss(params, tparams, batch, jax.random.PRNGKey(1), True)
    s = model.apply({"params": params["student"]}, batch["input_ids"],
                    batch["attention_mask"]).logits
    t = teacher.apply({"params": tparams}, batch["input_ids"],
                      batch["attention_mask"]).logits
    return loss, dl.kd_loss(s, t, batch["labels"], temperature=3.0, alpha=0.3)

  loss, want = both(params, tparams, batch)
  np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_bad_configuration_is_named():
  model = fx.classifier(32, 1, 60)
  teacher = (model, {})
  tx = optax.sgd(0.1)
  with pytest.raises(ValueError, match="unknown loss"):
    distill_lib.distill(model, teacher, tx, losses={"kdd": 1.0})
  with pytest.raises(ValueError, match="every loss weight is 0"):
    distill_lib.distill(model, teacher, tx, losses={"kd": 0.0})
  with pytest.raises(ValueError, match="LossFn student needs student_init"):
    distill_lib.distill(lambda p, b, r, d: (0.0, {}), teacher, tx)
  with pytest.raises(ValueError, match="temperature must be > 0"):
    distill_lib.distill(model, teacher, tx, temperature=0.0)
  with pytest.raises(ValueError, match="hinton: alpha"):
    distill_lib.hinton(1.5)


_LOSSES = {"kd": 1.0, "ce": 0.5, "hidden_mse": 1.0, "attention_mse": 1.0,
           "embedding_mse": 1.0}


@functools.lru_cache(maxsize=None)
def _runs():
  """Two distillation steps, unsharded and on 8 devices ('dp'); returns both states,
  both metrics, the first state and the teacher params given."""
  batch = fx.random_batch(2, batch=16, length=8)
  teacher = fx.classifier(64, 2, 60, classes=3)
  teacher_params = jax.jit(teacher.init)(jax.random.PRNGKey(7),
                                         batch["input_ids"])["params"]
  student = fx.classifier(32, 1, 60, classes=3)
  # SGD keeps parameters linear in the gradients; Adam's m / sqrt(v) would magnify
  # summation-order noise of near-zero gradients.
  tx = optim.make_optimizer("sgd", learning_rate=0.5, total_steps=4, momentum=0.9)
  step = distill_lib.distill(student, (teacher, teacher_params), tx, losses=_LOSSES,
                             temperature=2.0)
  state0 = jax.jit(step.init)(jax.random.PRNGKey(0), batch)
  update = jax.jit(step.update)
  state, metrics = update(state0, batch)
  state, metrics = update(state, batch)

  mesh = mesh_lib.make_mesh({"data": 8})
  rules = rules_lib.get_rules("dp")
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    shardings = partitioning.state_shardings(jax.eval_shape(step.init,
                                                            jax.random.PRNGKey(0), batch),
                                             mesh, rules)
    sharded_update = jax.jit(
        step.update,
        in_shardings=(shardings, partitioning.batch_sharding(mesh, rules)),
        out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())))
    sharded = jax.device_put(state0, shardings)
    sharded, sharded_metrics = sharded_update(sharded, batch)
    sharded, sharded_metrics = sharded_update(sharded, batch)
  return state0, (state, metrics), (sharded, sharded_metrics), teacher_params


def test_teacher_is_frozen_and_has_no_optimizer_slots():
  state0, (state, metrics), _, teacher_params = _runs()
  assert int(state.step) == 2
  jax.tree.map(np.testing.assert_array_equal, unbox(state.teacher_params),
               unbox(teacher_params))
  # The student did move, and its projections (32 -> 64) with it.
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), unbox(state.params),
                         unbox(state0.params))
  assert all(jax.tree.leaves(changed))
  assert set(unbox(state.params)["projections"]) == {"hidden", "embedding"}
  # The momentum mirrors params exactly: nothing of the teacher in it.
  trace = optax.tree.get(state.opt_state, "trace")
  assert jax.tree.structure(unbox(trace)) == jax.tree.structure(unbox(state.params))
  n_opt = sum(np.size(x) for x in jax.tree.leaves(state.opt_state))
  n_params = sum(np.size(x) for x in jax.tree.leaves(state.params))
  assert n_opt <= n_params + 8  # the momentum and a few counters
  for k in _LOSSES:
    assert np.isfinite(metrics[f"distill/{k}"])


def test_sharded_step_equals_unsharded():
  _, (state, metrics), (sharded, sharded_metrics), _ = _runs()
  assert len(jax.tree.leaves(sharded.params)[0].sharding.device_set) == 8
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               unbox(jax.device_get(sharded.params)), unbox(state.params))
  for k in metrics:
    np.testing.assert_allclose(sharded_metrics[k], metrics[k], rtol=1e-5, atol=1e-6,
                               err_msg=k)


@pytest.mark.slow
def test_kd_student_beats_student_without_kd():
  """A width-32, 1-layer student with 40 labelled reviews: plain fine-tuning vs KD
  from a teacher trained on 1,200 (its inputs serving as the unlabelled transfer set),
  paired over seeds 0-4 (init and batch order; same teacher and data): the mean gain
  of KD exceeds 2 standard errors (issue 10's form, fixed before measuring; the old
  single-seed margin was 0.1). Measured: gains 0.19 / -0.04 / 0.18 / 0.13 / 0.19
  (mean 0.13, SE 0.044; at seed 1 the KD student stayed at 0.53)."""
  tokenizer, encoded = fx.synthetic_data()
  teacher, teacher_params, teacher_acc = fx.trained_teacher()
  assert teacher_acc > 0.72, teacher_acc
  student = fx.classifier(32, 1, tokenizer.vocab_size)
  steps = 120
  tx = optim.make_optimizer("adamw", learning_rate=3e-3, total_steps=steps)
  plain = finetune(student, tx)
  kd = distill_lib.distill(student, (teacher, teacher_params), tx, losses={"kd": 1.0},
                           temperature=2.0)

  def arms(seed):
    accuracies = []
    for step, data in ((plain, encoded["labelled"]), (kd, encoded["teacher"])):
      state, _ = fx.fit(step, data, steps, batch_size=20, seed=seed)
      accuracies.append(fx.accuracy(step, state, encoded["test"]))
    return tuple(accuracies)
  gains = paired_claims.paired_gains(paired_claims.SEEDS, arms)
  paired_claims.assert_paired_gain(gains)
