"""BERT-PKD and DistilBERT: student initialisation from teacher layers, the patient
loss's layer choice, and one step of each."""

import jax
import numpy as np
import optax
import pytest

from etjax.algorithms import distilbert as db
from etjax.algorithms import pkd as pkd_lib
from etjax.algorithms.step import unbox
from tests.algorithms import distill_fixtures as fx


def _teacher(batch, layers=4, hidden=32, noise=0.0):
  """A random teacher; `noise` adds N(0, noise^2) to every parameter so that its
  layers' states differ clearly (BERT's 0.02 init keeps them close)."""
  model = fx.classifier(hidden, layers, 60, classes=3)
  params = jax.jit(model.init)(jax.random.PRNGKey(1), batch["input_ids"])["params"]
  if noise:
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    params = jax.tree.unflatten(treedef, [x + noise * jax.random.normal(k, x.shape)
                                          for x, k in zip(leaves, keys)])
  return model, params


def _layer_stack(params):
  return unbox(params)["encoder"]["encoder"]["layers"]


def test_every_other_layer_and_select_layers():
  assert db.every_other_layer(12) == (0, 2, 4, 6, 8, 10)
  assert db.every_other_layer(5) == (0, 2)
  batch = fx.random_batch(0)
  teacher, teacher_params = _teacher(batch)
  student = db.student_like(teacher, 2)
  assert student.encoder.config.num_layers == 2
  init = db.init_from_teacher(student, (teacher, unbox(teacher_params)), (0, 2))
  params = unbox(jax.jit(init)(jax.random.PRNGKey(0), batch))
  t = unbox(teacher_params)
  jax.tree.map(lambda s, tl: np.testing.assert_array_equal(s, np.asarray(tl)[[0, 2]]),
               _layer_stack(params), _layer_stack(t))
  for name in ("embeddings", "pooler"):
    jax.tree.map(np.testing.assert_array_equal, params["encoder"][name],
                 t["encoder"][name])
  jax.tree.map(np.testing.assert_array_equal, params["classifier"], t["classifier"])
  narrow = fx.classifier(16, 2, 60, classes=3)
  with pytest.raises(ValueError, match=r"select_layers: classifier/kernel has shape \(32, 3\) in the teacher, the student expects \(16, 3\)"):
    jax.eval_shape(db.init_from_teacher(narrow, (teacher, teacher_params), (0, 2)),
                   jax.random.PRNGKey(0), batch)
  with pytest.raises(ValueError, match="outside the teacher's 4 layers"):
    jax.eval_shape(db.init_from_teacher(student, (teacher, teacher_params), (0, 4)),
                   jax.random.PRNGKey(0), batch)


def test_distilbert_step_from_every_other_layer():
  batch = fx.random_batch(1)
  teacher, teacher_params = _teacher(batch)
  student, step = db.distilbert((teacher, teacher_params), optax.sgd(0.05))
  state0 = jax.jit(step.init)(jax.random.PRNGKey(0), batch)
  jax.tree.map(lambda s, tl: np.testing.assert_array_equal(s, np.asarray(tl)[[0, 2]]),
               _layer_stack(state0.params["student"]), _layer_stack(teacher_params))
  state, metrics = jax.jit(step.update)(state0, batch)
  assert student.encoder.config.num_layers == 2
  assert {"distill/soft_ce", "distill/ce", "distill/cosine"} <= set(metrics)
  np.testing.assert_allclose(
      metrics["loss"], 5 * metrics["distill/soft_ce"] + 2 * metrics["distill/ce"]
      + metrics["distill/cosine"], rtol=1e-5)
  assert unbox(state.params)["projections"] == {}
  with pytest.raises(ValueError, match="num_student_layers must be in 1..2"):
    db.distilbert((teacher, teacher_params), optax.sgd(0.05), num_student_layers=3)


def test_pkd_last_uses_teacher_layer_n_minus_m_plus_1():
  batch = fx.random_batch(2)
  teacher, teacher_params = _teacher(batch, noise=0.3)
  student = fx.classifier(32, 2, 60, classes=3)
  step = pkd_lib.pkd(student, (teacher, teacher_params), optax.sgd(0.05),
                     strategy="PKD-Last", alpha=0.5, beta=10.0, temperature=5.0)
  state0 = jax.jit(step.init)(jax.random.PRNGKey(0), batch)
  # Initialised from the teacher's first two layers.
  jax.tree.map(lambda s, tl: np.testing.assert_array_equal(s, np.asarray(tl)[:2]),
               _layer_stack(state0.params["student"]), _layer_stack(teacher_params))
  _, metrics = jax.jit(step.update)(state0, batch)

  states = lambda m, p: m.apply({"params": p}, batch["input_ids"],
                                batch["attention_mask"],
                                output_hidden_states=True).encoder.hidden_states
  # One compiled function for both models (compiles dominate this test's time).
  hs, ht = map(np.asarray, jax.jit(lambda ps, pt: (states(student, ps),
                                                   states(teacher, pt)))(
      unbox(state0.params["student"]), unbox(teacher_params)))
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  patient = lambda j: ((unit(hs[1][:, 0]) - unit(ht[j][:, 0])) ** 2).mean()
  # M=2, N=4: PKD-Last pairs student layer 1 with teacher layer 3 (PKD-Skip: 2).
  np.testing.assert_allclose(metrics["distill/pkd"], patient(3), rtol=1e-5)
  # ... and distinguishably so at the test tolerance.
  assert abs(patient(3) - patient(2)) > 1e-2 * patient(3)
  np.testing.assert_allclose(
      metrics["loss"], 0.5 * metrics["distill/ce"] + 0.5 * metrics["distill/kd"]
      + 10.0 * metrics["distill/pkd"], rtol=1e-5)
  with pytest.raises(ValueError, match="unknown strategy"):
    pkd_lib.pkd(student, (teacher, teacher_params), optax.sgd(0.1), strategy="middle")
