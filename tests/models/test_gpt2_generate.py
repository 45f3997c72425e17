"""GPT-2 generation: greedy equals transformers' generate; the cache equals the
uncached forward step by step; sampling filters equal a numpy reference."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import etjax.models as models
from etjax.models import gpt2_decode as gen
from etjax.models.gpt2 import positions_from_mask

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "tiny_gpt2")
MAX_NEW = 12  # make_gpt2_fixtures.MAX_NEW_TOKENS


def _expected():
  return dict(np.load(os.path.join(FIXTURE, "expected.npz")))


@functools.lru_cache(maxsize=None)
def _model():
  """The fixture model and a jitted generate over it (stop tokens and the rng traced,
  so the tests share compilations)."""
  module, params = models.from_pretrained(FIXTURE)

  @functools.partial(jax.jit, static_argnames=("do_sample", "temperature", "top_k",
                                               "top_p", "return_logits"))
  def run(prompt, mask, stops, rng=None, **kw):
    return gen.generate(module, params, prompt, mask, max_new_tokens=MAX_NEW,
                        stop_tokens=stops, rng=rng, **kw)
  return module, params, run


def _padded(ids, pad):
  """transformers' ids padded to MAX_NEW (generate stops once every row has ended)."""
  return np.pad(ids, ((0, 0), (0, MAX_NEW - ids.shape[1])), constant_values=pad)


def test_greedy_matches_transformers_generate():
  module, _, run = _model()
  e = _expected()
  got = run(e["prompt_ids"], e["prompt_mask"], np.array([63]))
  np.testing.assert_array_equal(np.asarray(got.tokens), e["greedy"])
  got = run(e["prompt_ids"], e["prompt_mask"], np.array([int(e["stop_token"])]))
  want = _padded(e["greedy_stop"], module.config.pad_token_id)
  assert (want == module.config.pad_token_id).any()   # a row did stop early
  np.testing.assert_array_equal(np.asarray(got.tokens), want)


def test_cached_generation_equals_the_uncached_forward_step_by_step():
  module, params, run = _model()
  e = _expected()
  prompt, mask = e["prompt_ids"], e["prompt_mask"]
  got = run(prompt, mask, np.array([63]), return_logits=True)
  tokens, logits = np.asarray(got.tokens), np.asarray(got.logits)
  # The uncached model on the prompt and the first t tokens, padded on the right to
  # one shape (one compilation; padding after the last token cannot reach it).
  ids = np.concatenate([prompt, tokens], axis=1)

  @jax.jit
  def last_logits(t):
    length = np.arange(ids.shape[1])[None, :] < prompt.shape[1] + t
    full_mask = jnp.where(length, np.concatenate([mask, np.ones_like(tokens)], 1), 0)
    positions = positions_from_mask(full_mask)
    out = module.apply({"params": params}, jnp.where(length, ids, 0), full_mask, None,
                       positions)
    return out.logits[:, prompt.shape[1] + t - 1]

  for t in range(MAX_NEW):
    last = np.asarray(last_logits(t))
    np.testing.assert_array_equal(tokens[:, t], last.argmax(-1))
    np.testing.assert_allclose(logits[:, t], last, atol=1e-4, rtol=0)


def _numpy_filter(logits, temperature, top_k, top_p):
  """transformers' warpers written out in numpy, row by row: temperature, top-k
  (below the k-th value removed), top-p (ascending sort, remove while the cumulative
  probability stays <= 1 - p, never the most likely token)."""
  out = logits.astype(np.float64) / temperature
  for row in out:
    if 0 < top_k < row.size:
      row[row < np.sort(row)[-top_k]] = -np.inf
    if top_p < 1.0:
      order = np.argsort(row, kind="stable")
      probs = np.exp(row[order] - row.max())
      probs /= probs.sum()
      remove = np.cumsum(probs) <= 1 - top_p
      remove[-1] = False
      row[order[remove]] = -np.inf
  return out


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 5, 1.0), (0.7, 0, 0.9), (1.3, 10, 0.5), (1.0, 0, 0.05), (2.0, 3, 0.99)])
def test_filters_match_a_numpy_reference(temperature, top_k, top_p):
  logits = np.random.default_rng(0).normal(size=(6, 40)).astype(np.float32) * 3
  got = np.asarray(gen.filter_logits(jnp.asarray(logits), temperature=temperature,
                                     top_k=top_k, top_p=top_p))
  want = _numpy_filter(logits, temperature, top_k, top_p)
  np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
  kept = ~np.isinf(want)
  np.testing.assert_allclose(got[kept], want[kept], rtol=1e-6)
  assert kept.sum(axis=1).min() >= 1


def test_sampling_stays_in_the_filtered_support_and_top_1_is_greedy():
  _, _, run = _model()
  e = _expected()
  args = (e["prompt_ids"], e["prompt_mask"], np.array([63]))
  greedy = run(*args)
  top1 = run(*args, jax.random.PRNGKey(3), do_sample=True, temperature=0.5, top_k=1)
  np.testing.assert_array_equal(np.asarray(top1.tokens), np.asarray(greedy.tokens))
  sampled = run(*args, jax.random.PRNGKey(0), do_sample=True, top_k=4, top_p=0.8,
                return_logits=True)
  tokens, logits = np.asarray(sampled.tokens), np.asarray(sampled.logits)
  support = ~np.isinf(_numpy_filter(logits.reshape(-1, logits.shape[-1]), 1.0, 4, 0.8))
  assert support[np.arange(tokens.size), tokens.reshape(-1)].all()
  assert not np.array_equal(tokens, np.asarray(greedy.tokens))
  again = run(*args, jax.random.PRNGKey(0), do_sample=True, top_k=4, top_p=0.8,
              return_logits=True)
  np.testing.assert_array_equal(np.asarray(again.tokens), tokens)


def test_bad_arguments_are_named():
  module, params = models.from_pretrained(FIXTURE)
  ids = np.ones((1, 4), np.int32)
  with pytest.raises(ValueError, match="exceeds the model's n_positions=40"):
    gen.generate(module, params, ids, max_new_tokens=37)
  with pytest.raises(ValueError, match="needs an rng"):
    gen.generate(module, params, ids, max_new_tokens=2, do_sample=True)
  with pytest.raises(ValueError, match="top_p must lie in"):
    gen.filter_logits(jnp.zeros((1, 4)), top_p=0.0)
