"""AdaBERT: ops against numpy, the efficiency term's pull, a valid derived student
whose size matches its ops, retrained with KD on the synthetic data."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from etjax.algorithms import adabert as ab
from etjax.algorithms import optim
from etjax.algorithms.distill import distill, hinton
from etjax.algorithms.step import unbox
from tests.algorithms import distill_fixtures as fx


def test_pooling_ops_match_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 6, 3)).astype(np.float32)
  mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], np.int32)
  for op, reduce in (("maxpool3", np.max), ("avgpool3", np.mean)):
    got = np.asarray(ab.Op(op).apply({}, jnp.asarray(x), jnp.asarray(mask)))
    want = np.zeros_like(x)
    for b in range(2):
      valid = int(mask[b].sum())
      for t in range(valid):
        window = x[b, max(t - 1, 0):min(t + 2, valid)]
        want[b, t] = reduce(window, axis=0)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=op)


def test_genotype_derivation_and_checks():
  config = ab.AdaBertConfig(vocab_size=50, num_nodes=3)
  assert config.num_edges == 9
  alpha = np.zeros((9, len(ab.OP_NAMES)))
  alpha[:, ab.OP_NAMES.index("zero")] = 5.0  # zero is never kept ...
  alpha[0, ab.OP_NAMES.index("conv7")] = 2.0  # ... the strongest non-zero op is
  alpha[1, ab.OP_NAMES.index("identity")] = 1.0
  genotype = ab.derive_genotype(alpha, config)
  assert genotype[:2] == ("conv7", "identity")
  edges = config.edges()
  for j in range(3):
    kept = [e for e, (node, _) in enumerate(edges) if node == j and genotype[e] != "zero"]
    assert len(kept) == 2
  ab.check_genotype(genotype, config)
  with pytest.raises(ValueError, match="node 0 without inputs"):
    ab.check_genotype(("zero", "zero") + genotype[2:], config)
  with pytest.raises(ValueError, match="unknown ops"):
    ab.check_genotype(("conv9",) + genotype[1:], config)


def _search(beta, teacher, batch, steps=25):
  # One node (2 edges x 10 ops) keeps the compile short.
  config = ab.AdaBertConfig(vocab_size=60, num_labels=3, width=16, num_cells=1,
                            num_nodes=1, max_length=16)
  step = ab.adabert_search(config, teacher, optax.adam(1e-3), optax.adam(0.05),
                           gamma=0.5, beta=beta, cost="params")
  # The batch is the whole data set: every update sees its rows (reordered).
  data = dict(batch, domain=np.zeros_like(batch["labels"]))
  state, metrics = fx.fit(step, data, steps, batch_size=len(batch["labels"]))
  assert np.isfinite(float(metrics["loss"]))
  return ab.architecture_weights(state, config)[1], config


def test_efficiency_term_lowers_expected_cost():
  batch = fx.random_batch(5, batch=8, length=10)
  # A small non-BERT teacher keeps the two compiles short.
  teacher = ab.AdaBert(ab.AdaBertConfig(vocab_size=60, num_labels=3, width=16,
                                        num_cells=1, num_nodes=1, max_length=16),
                       ("conv3", "identity"))
  teacher_params = jax.jit(teacher.init)(jax.random.PRNGKey(1),
                                         batch["input_ids"])["params"]
  free, config = _search(0.0, (teacher, teacher_params), batch)
  thrifty, _ = _search(2.0, (teacher, teacher_params), batch)
  uniform = float(ab.cost_vector(config.width).mean() / ab.cost_vector(config.width).max())
  assert thrifty < free - 0.1, (thrifty, free)
  assert thrifty < uniform - 0.1, (thrifty, uniform)


def test_search_derive_and_retrain_on_synthetic_data():
  """Measured at seed 0: genotype (identity, identity, maxpool3, zero, dilconv3),
  17,026 parameters against the teacher's 100,866, test accuracy 0.78 (teacher
  0.79)."""
  tokenizer, encoded = fx.synthetic_data()
  teacher, teacher_params, _ = fx.trained_teacher()
  config = ab.AdaBertConfig(vocab_size=tokenizer.vocab_size, width=32, num_cells=1,
                            num_nodes=2, max_length=fx.MAX_LENGTH)
  search = ab.adabert_search(config, (teacher, teacher_params), optax.adam(3e-3),
                             optax.adam(3e-2), gamma=0.8, beta=0.05, temperature=2.0)
  state, _ = fx.fit(search, encoded["teacher"], 40, batch_size=20)
  genotype = ab.derive_genotype(unbox(state.params["student"]["alpha"]), config)
  ab.check_genotype(genotype, config)

  student = ab.AdaBert(config, genotype)
  steps = 150
  tx = optim.make_optimizer("adamw", learning_rate=5e-3, total_steps=steps)
  retrain = distill(student, (teacher, teacher_params), tx, losses=hinton(1.0),
                    temperature=2.0)
  state, _ = fx.fit(retrain, encoded["teacher"], steps, batch_size=20)
  size = ab.param_count(state.params["student"])
  assert size == ab.student_param_count(genotype, config)
  assert size < ab.param_count(teacher_params)
  acc = fx.accuracy(retrain, state, encoded["test"])
  assert acc > 0.7, (acc, genotype)


def test_deferred_retrain_builds_the_named_cells_when_first_used():
  """The recipe's retraining step asks for its cells only when traced, once, and then
  makes `retrain`'s very updates; a sequence longer than the positions is named."""
  batch = fx.random_batch(2, batch=4, length=10)
  config = ab.AdaBertConfig(vocab_size=60, num_labels=2, width=8, num_cells=1,
                            num_nodes=2, max_length=12)
  teacher = ab.AdaBert(config, ("identity", "identity", "conv3", "zero", "avgpool3"))
  teacher_params = jax.jit(teacher.init)(jax.random.PRNGKey(3),
                                         batch["input_ids"])["params"]
  genotype = ("conv3", "maxpool3", "zero", "dilconv5", "identity")
  asked = []

  def genotype_fn():
    asked.append(1)
    return genotype
  tx = optax.adam(1e-2)
  deferred = ab.deferred_retrain(config, genotype_fn, (teacher, teacher_params), tx,
                                 gamma=0.6, temperature=2.0)
  assert not asked  # built before any search ran
  direct = ab.retrain(config, genotype, (teacher, teacher_params), tx, gamma=0.6,
                      temperature=2.0)
  states = [jax.jit(s.init)(jax.random.PRNGKey(0), batch) for s in (deferred, direct)]
  assert len(asked) == 1
  assert sorted(unbox(states[0].params["student"])["cell0"]) == [
      "edge0_conv3", "edge3_dilconv5", "norm0", "norm1"]
  for _ in range(2):
    states = [jax.jit(s.update)(state, batch)[0]
              for s, state in zip((deferred, direct), states)]
  jax.tree.map(np.testing.assert_array_equal, unbox(states[0].params),
               unbox(states[1].params))
  np.testing.assert_array_equal(jax.jit(deferred.predict)(states[0], batch)["logits"],
                                jax.jit(direct.predict)(states[1], batch)["logits"])
  assert len(asked) == 1
  long = fx.random_batch(2, batch=4, length=16)
  with pytest.raises(ValueError, match="16 tokens exceed AdaBertConfig.max_length = 12"):
    jax.eval_shape(direct.init, jax.random.PRNGKey(0), long)


def test_gin_file_binds_what_the_functions_take():
  """gin/algorithms/adabert.gin, as `etjax train` and the paper table read it."""
  import inspect  # pylint: disable=g-import-not-at-top
  from etjax import main  # pylint: disable=g-import-not-at-top
  settings = main.algorithm_settings()["adabert"]
  functions = {"AdaBertConfig": ab.AdaBertConfig, "adabert_search": ab.adabert_search,
               "arch_optimizer": ab.arch_optimizer}
  assert set(settings) == set(functions)
  for name, fn in functions.items():
    assert set(settings[name]) <= set(inspect.signature(fn).parameters), name
  config = ab.AdaBertConfig(vocab_size=10, **settings["AdaBertConfig"])
  assert config.num_edges == 9 and settings["arch_optimizer"]["learning_rate"] == 0.03
