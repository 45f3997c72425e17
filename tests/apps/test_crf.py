"""The linear-chain CRF against brute-force enumeration of every tag path (float64)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from etjax.models import crf


def _brute_force(emissions_lt, length, trans_tt, start_t, end_t):
  """(log Z, best path, best score) over all T**length paths of one row."""
  num_tags = emissions_lt.shape[-1]
  scores = {}
  for path in itertools.product(range(num_tags), repeat=length):
    s = start_t[path[0]] + end_t[path[-1]] + sum(emissions_lt[t, y]
                                                 for t, y in enumerate(path))
    s += sum(trans_tt[a, b] for a, b in zip(path[:-1], path[1:]))
    scores[path] = s
  values = np.array(list(scores.values()))
  log_z = values.max() + np.log(np.exp(values - values.max()).sum())
  best = max(scores, key=scores.get)
  return log_z, best, scores[best], scores


@pytest.mark.parametrize("num_tags,lengths", [(3, [4, 2, 1]), (4, [3, 3, 0]),
                                              (2, [5, 1, 4])])
def test_log_partition_likelihood_and_viterbi_equal_brute_force(num_tags, lengths):
  with jax.enable_x64(True):
    rng = np.random.default_rng(num_tags)
    max_len = max(lengths)
    em = rng.normal(size=(len(lengths), max_len, num_tags)) * 2
    trans = rng.normal(size=(num_tags, num_tags))
    start, end = rng.normal(size=num_tags), rng.normal(size=num_tags)
    mask = np.array([[t < n for t in range(max_len)] for n in lengths])
    tags = rng.integers(0, num_tags, size=(len(lengths), max_len))
    args = [jnp.asarray(a) for a in (trans, start, end)]
    log_z = np.asarray(jax.jit(crf.log_partition)(jnp.asarray(em), jnp.asarray(mask), *args))
    ll = np.asarray(jax.jit(crf.log_likelihood)(jnp.asarray(em), jnp.asarray(tags),
                                       jnp.asarray(mask), *args))
    best, best_score = jax.jit(crf.viterbi)(jnp.asarray(em), jnp.asarray(mask), *args)
    assert log_z.dtype == np.float64
    for b, n in enumerate(lengths):
      if n == 0:
        assert log_z[b] == 0 and ll[b] == 0 and np.all(np.asarray(best[b]) == 0)
        continue
      ref_z, ref_best, ref_score, scores = _brute_force(em[b], n, trans, start, end)
      np.testing.assert_allclose(log_z[b], ref_z, rtol=1e-5, atol=1e-12)
      np.testing.assert_allclose(ll[b], scores[tuple(tags[b, :n])] - ref_z, rtol=1e-5)
      assert tuple(np.asarray(best[b, :n])) == ref_best
      assert np.all(np.asarray(best[b, n:]) == 0)
      np.testing.assert_allclose(float(best_score[b]), ref_score, rtol=1e-5)


def test_bio_constraints_forbid_i_without_its_b():
  tags = ["O", "B-URL", "I-URL", "B-VER", "I-VER"]
  start, trans, end = crf.bio_allowed(tags)
  assert list(start) == [True, True, False, True, False]
  assert trans[1, 2] and trans[2, 2] and not trans[0, 2] and not trans[3, 2]
  assert trans[4, 4] and not trans[2, 4] and trans[2, 0] and trans[4, 1]
  assert end.all()


def test_constrained_viterbi_equals_brute_force_over_allowed_paths():
  tags = ["O", "B-X", "I-X"]
  allowed = crf.bio_allowed(tags)
  with jax.enable_x64(True):
    rng = np.random.default_rng(7)
    # Emissions that favour I-X everywhere: unconstrained decoding would start with it.
    em = rng.normal(size=(1, 4, 3)) + np.array([0, 0, 3.0])
    raw = (np.zeros(3), rng.normal(size=(3, 3)), np.zeros(3))
    s, t, e = crf.constrain(*(jnp.asarray(a) for a in raw), allowed)
    best, _ = jax.jit(crf.viterbi)(jnp.asarray(em), jnp.ones((1, 4), bool), t, s, e)
    legal = {}
    for path in itertools.product(range(3), repeat=4):
      names = [tags[i] for i in path]
      ok = names[0] != "I-X" and all(not (b == "I-X" and a == "O")
                                     for a, b in zip(names[:-1], names[1:]))
      if ok:
        legal[path] = (sum(em[0, i, y] for i, y in enumerate(path))
                       + sum(raw[1][a, b] for a, b in zip(path[:-1], path[1:])))
    assert tuple(np.asarray(best[0])) == max(legal, key=legal.get)
    assert tags[int(best[0, 0])] != "I-X"
    # log Z over all paths (disallowed ones carry DISALLOWED) equals brute force.
    log_z = jax.jit(crf.log_partition)(jnp.asarray(em), jnp.ones((1, 4), bool), t, s, e)
    ref_z = _brute_force(em[0], 4, np.asarray(t), np.asarray(s), np.asarray(e))[0]
    np.testing.assert_allclose(float(log_z[0]), ref_z, rtol=1e-5)


def test_crf_module_gradient_matches_finite_differences():
  with jax.enable_x64(True):
    module = crf.CRF(num_tags=3, allowed=crf.bio_allowed(["O", "B-X", "I-X"]))
    rng = np.random.default_rng(1)
    em = jnp.asarray(rng.normal(size=(2, 3, 3)))
    tags = jnp.asarray([[1, 2, 0], [0, 1, 0]])
    mask = jnp.asarray([[1, 1, 1], [1, 1, 0]])
    params = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape)),
                          nn_unbox(module.init(jax.random.key(0), em, mask)))
    f = jax.jit(lambda p: module.apply(p, em, tags, mask,
                                       method=crf.CRF.log_likelihood).sum())
    grad = jax.jit(jax.grad(f))(params)["params"]["transitions"]
    eps = 1e-6
    for (i, j) in [(0, 1), (1, 2), (2, 0)]:
      plus, minus = (jax.tree.map(lambda x: x, params) for _ in range(2))
      plus["params"]["transitions"] = plus["params"]["transitions"].at[i, j].add(eps)
      minus["params"]["transitions"] = minus["params"]["transitions"].at[i, j].add(-eps)
      fd = (f(plus) - f(minus)) / (2 * eps)
      np.testing.assert_allclose(float(grad[i, j]), float(fd), rtol=1e-5, atol=1e-9)


def nn_unbox(tree):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  return nn.meta.unbox(tree)
