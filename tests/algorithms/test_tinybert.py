"""TinyBERT's two stages, its layer map, and its run on the synthetic data."""

import jax
import numpy as np
import optax
import pytest

from etjax.algorithms import optim
from etjax.algorithms import tinybert as tb
from etjax.algorithms.finetune import finetune
from etjax.algorithms.step import unbox
from tests.algorithms import distill_fixtures as fx
from tests.algorithms import paired_claims


def test_layer_map_is_m_n_over_m():
  assert tb.tinybert_layer_map(2, 4) == (2, 4)
  assert tb.tinybert_layer_map(4, 12) == (3, 6, 9, 12)
  assert tb.tinybert_layer_map(3, 12) == (4, 8, 12)
  # floor(m N / M) where M does not divide N.
  assert tb.tinybert_layer_map(4, 6) == (1, 3, 4, 6)


def test_gin_file_binds_what_both_shapes_take():
  """gin/algorithms/tinybert.gin: every binding is tinybert's; all but
  intermediate_steps (each recipe stage runs its own count) tinybert_stages'."""
  import inspect  # pylint: disable=g-import-not-at-top
  from etjax import main  # pylint: disable=g-import-not-at-top
  settings = main.algorithm_settings()["tinybert"]["tinybert"]
  takes = lambda fn: set(inspect.signature(fn).parameters)
  assert set(settings) <= takes(tb.tinybert)
  assert set(settings) - {"intermediate_steps"} <= takes(tb.tinybert_stages)
  assert settings["intermediate_steps"] is None  # the road: as long as stage 2


TXS = (optax.sgd(0.1), optax.adam(1e-2))


@pytest.fixture(scope="module")
def switching():
  """3 updates of the switching step (stage 1 for 2): its models, states, metrics."""
  batch = fx.random_batch(4, batch=8, length=10)
  teacher = fx.classifier(64, 4, 60, classes=3)
  teacher_params = jax.jit(teacher.init)(jax.random.PRNGKey(1),
                                         batch["input_ids"])["params"]
  student = fx.classifier(32, 2, 60, classes=3)
  step = tb.tinybert(student, (teacher, teacher_params), *TXS, intermediate_steps=2,
                     temperature=2.0)
  state0 = jax.jit(step.init)(jax.random.PRNGKey(0), batch)
  update = jax.jit(step.update)
  history, states = [], [state0]
  for _ in range(3):
    state, metrics = update(states[-1], batch)
    states.append(state)
    history.append(jax.device_get(metrics))
  return dict(batch=batch, teacher=(teacher, teacher_params), student=student,
              states=states, history=history)


def test_stages_switch_and_stage_one_matches_hand_computation(switching):
  batch, (teacher, teacher_params) = switching["batch"], switching["teacher"]
  student, states, history = (switching[k] for k in ("student", "states", "history"))
  state0 = states[0]
  assert [float(m["stage"]) for m in history] == [1.0, 1.0, 2.0]
  for m in history[:2]:
    assert float(m["distill/kd"]) == 0.0
    for k in tb.INTERMEDIATE:
      assert float(m[f"distill/{k}"]) > 0.0
  assert float(history[2]["distill/kd"]) > 0.0
  assert all(float(history[2][f"distill/{k}"]) == 0.0 for k in tb.INTERMEDIATE)
  # Each stage touches only its own optimizer state.
  adam_count = lambda s: int(optax.tree.get(s.opt_state["prediction"], "count"))
  assert [adam_count(s) for s in states] == [0, 0, 0, 1]
  jax.tree.map(np.testing.assert_array_equal, unbox(states[-1].teacher_params),
               unbox(teacher_params))

  # Stage 1's first loss by hand: pairs (1, 2), (2, 4) of g(m) = m N / M, W_h and W_e.
  params = unbox(state0.params)
  kw = dict(output_hidden_states=True, output_attentions=True)
  encoder = lambda m, p: m.apply({"params": p}, batch["input_ids"],
                                 batch["attention_mask"], **kw).encoder
  s_out, t_out = jax.jit(lambda ps, pt: (encoder(student, ps), encoder(teacher, pt)))(
      params["student"], unbox(teacher_params))
  mask = batch["attention_mask"]
  hidden = params["projections"]["hidden"]
  embed = params["projections"]["embedding"]
  lin = lambda x, p: np.asarray(x) @ np.asarray(p["kernel"]) + np.asarray(p["bias"])
  pairs = [(1, 2), (2, 4)]

  def mse(a, b):
    m = np.broadcast_to(mask[..., None], a.shape)
    return ((a - b) ** 2 * m).sum() / m.sum()

  want_hidden = sum(mse(lin(s_out.hidden_states[i], hidden),
                        np.asarray(t_out.hidden_states[j])) for i, j in pairs)
  want_embed = mse(lin(s_out.hidden_states[0], embed), np.asarray(t_out.hidden_states[0]))
  pair_mask = (mask[:, None, :, None] * mask[:, None, None, :]) * np.ones((1, 2, 1, 1))
  want_att = sum((((np.asarray(s_out.attentions[i - 1]) - np.asarray(
      t_out.attentions[j - 1])) ** 2) * pair_mask).sum() / pair_mask.sum()
                 for i, j in pairs)
  np.testing.assert_allclose(history[0]["distill/hidden_mse"], want_hidden, rtol=1e-5)
  np.testing.assert_allclose(history[0]["distill/embedding_mse"], want_embed, rtol=1e-5)
  np.testing.assert_allclose(history[0]["distill/attention_mse"], want_att, rtol=1e-5)
  np.testing.assert_allclose(history[0]["loss"], want_hidden + want_embed + want_att,
                             rtol=1e-5)


def test_recipe_stages_are_the_switching_steps_stages(switching):
  """tinybert_stages' two steps make the switching step's updates: stage 1 from its
  init, stage 2 on stage 1's student (carry_params, as a recipe starts it) with the
  switching step's rng at the switch (a recipe's stage has its own)."""
  from etjax.algorithms.recipe import carry_params  # pylint: disable=g-import-not-at-top
  batch, states = switching["batch"], switching["states"]
  stages = tb.tinybert_stages(switching["student"], switching["teacher"], *TXS,
                              temperature=2.0)
  assert set(stages) == {"intermediate", "prediction"}
  same = lambda a, b: jax.tree.map(np.testing.assert_array_equal, unbox(a), unbox(b))
  # Stage 1's state is the switching step's but for the optimizer state of its own
  # stage only (values: the same objective's init under the same key split).
  got = states[0].replace(opt_state=states[0].opt_state["intermediate"])
  same(jax.eval_shape(stages["intermediate"].init, jax.random.PRNGKey(0), batch),
       jax.eval_shape(lambda: got))
  for _ in range(2):
    got, metrics = jax.jit(stages["intermediate"].update)(got, batch)
  same(got.params, states[2].params)
  assert float(metrics["distill/hidden_mse"]) > 0 and "distill/kd" not in metrics
  fresh = jax.jit(stages["prediction"].init)(jax.random.PRNGKey(5), batch)
  assert not unbox(fresh.params["projections"])  # W_e, W_h: stage 1's alone
  second = carry_params(got, fresh).replace(rng=states[2].rng)
  second, metrics = jax.jit(stages["prediction"].update)(second, batch)
  assert float(metrics["distill/kd"]) > 0
  same(second.params["student"], states[3].params["student"])


@pytest.mark.slow
def test_two_stages_on_synthetic_data():
  """A width-32, 2-layer student distilled from the trained teacher through both
  stages on the teacher's (unlabelled) training inputs, against the same student
  fine-tuned on the 40 labelled reviews, paired over seeds 0-4: the mean gain exceeds
  2 standard errors (fixed before measuring). Measured gains 0.215 / 0.173 / 0.188 /
  0.148 / 0.185 (seed 0 earlier: 0.79, as the teacher; plain about 0.55)."""
  tokenizer, encoded = fx.synthetic_data()
  teacher, teacher_params, teacher_acc = fx.trained_teacher()
  student = fx.classifier(32, 2, tokenizer.vocab_size)
  stage1, stage2 = 60, 80
  step = tb.tinybert(
      student, (teacher, teacher_params),
      optim.make_optimizer("adamw", learning_rate=3e-3, total_steps=stage1),
      optim.make_optimizer("adamw", learning_rate=3e-3, total_steps=stage2),
      intermediate_steps=stage1, temperature=2.0)
  plain = finetune(student, optim.make_optimizer("adamw", learning_rate=3e-3,
                                                 total_steps=stage1 + stage2))

  def arms(seed):
    state, metrics = fx.fit(step, encoded["teacher"], stage1 + stage2, batch_size=20,
                            seed=seed)
    assert float(metrics["stage"]) == 2.0
    acc = fx.accuracy(step, state, encoded["test"])
    if seed == 0:
      assert acc > 0.7, (acc, teacher_acc)
    baseline, _ = fx.fit(plain, encoded["labelled"], stage1 + stage2, batch_size=20,
                         seed=seed)
    return fx.accuracy(plain, baseline, encoded["test"]), acc
  gains = paired_claims.paired_gains(paired_claims.SEEDS, arms)
  paired_claims.assert_paired_gain(gains)
