"""Greedy decoding equals transformers' generate(do_sample=False, num_beams=1)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from etjax.models import hf
from etjax.models.t5 import T5Encoder, T5Model
from etjax.models.t5_decode import greedy_decode
from t5_testlib import (FLAVOURS, assert_close, expected, fixture_dir, rng_key,
                       tiny_config)

MAX_LENGTH = 10  # make_t5_fixtures.MAX_NEW_TOKENS


def _padded(generated: np.ndarray, pad_id: int) -> np.ndarray:
  """transformers' ids without the start token, padded to MAX_LENGTH (generate stops
  early once every sequence has ended)."""
  ids = generated[:, 1:]
  return np.pad(ids, ((0, 0), (0, MAX_LENGTH - ids.shape[1])), constant_values=pad_id)


@pytest.mark.parametrize("name,overrides", [(name, {}) for name in FLAVOURS] + [
    # Encoding pipelined over 2 stages; decoding runs the plain stack (same params).
    ("t5_v1_0", dict(pipeline_stages=2, pipeline_microbatches=3))])
def test_greedy_matches_transformers_generate(name, overrides):
  module, params = hf.from_pretrained(fixture_dir(name), **overrides)
  e = expected(name)
  # eos_token_id is traced, so one compilation serves both runs.
  decode = jax.jit(functools.partial(greedy_decode, module, max_length=MAX_LENGTH))
  pad = module.config.pad_token_id
  got = decode(params, e["input_ids"], e["attention_mask"],
               eos_token_id=module.config.eos_token_id)
  np.testing.assert_array_equal(np.asarray(got), _padded(e["generated"], pad))
  # Ending on a token the model emits early: the rest of those rows is padding.
  got_stop = decode(params, e["input_ids"], e["attention_mask"],
                    eos_token_id=int(e["stop_id"]))
  want_stop = _padded(e["generated_stop"], pad)
  assert (want_stop == pad).any()
  np.testing.assert_array_equal(np.asarray(got_stop), want_stop)


def test_bad_arguments_are_named():
  module, params = hf.from_pretrained(fixture_dir("t5_encoder"))
  ids = np.ones((1, 4), np.int32)
  with pytest.raises(ValueError, match="needs a T5Model, got T5Encoder"):
    greedy_decode(module, params, ids, max_length=4)
  assert isinstance(module, T5Encoder)
  module, params = hf.from_pretrained(fixture_dir("t5_v1_0"))
  with pytest.raises(ValueError, match="max_length must be positive, got 0"):
    greedy_decode(module, params, ids, max_length=0)


def test_cached_decoder_equals_the_full_decoder_at_every_position():
  # Teacher-forced: 20 target positions (past max_distance 16, so every bucket kind),
  # with source and decoder padding masks, one token at a time through the caches.
  module = T5Model(tiny_config(num_decoder_layers=3))
  rng = np.random.default_rng(0)
  src = rng.integers(2, 64, size=(2, 7)).astype(np.int32)
  src_mask = np.array([[1] * 7, [1] * 5 + [0] * 2], np.int32)
  tgt = rng.integers(2, 64, size=(2, 20)).astype(np.int32)
  tgt_mask = np.ones_like(tgt)
  tgt_mask[1, 3] = 0
  params = jax.jit(module.init)(rng_key(0), src)["params"]
  cached = module.clone(use_cache=True)

  @jax.jit
  def both(params):
    enc = module.apply({"params": params}, src, src_mask, method=T5Model.encode)
    _, full = module.apply({"params": params}, tgt, enc, src_mask, tgt_mask,
                           method=T5Model.decode)
    _, variables = cached.apply({"params": params}, np.zeros_like(tgt), enc, src_mask,
                                tgt_mask, method=T5Model.decode, mutable=["cache"])

    def step(cache, token_b):
      # Zeros for the encoder output: the steps must read its keys and values from
      # the cache made above.
      (_, logits_b1v), variables = cached.apply(
          {"params": params, "cache": cache}, token_b[:, None], jnp.zeros_like(enc),
          src_mask, tgt_mask, method=T5Model.decode, mutable=["cache"])
      return variables["cache"], logits_b1v[:, 0]

    _, steps_tbv = jax.lax.scan(step, variables["cache"], tgt.T)
    return full, steps_tbv.transpose(1, 0, 2)

  full, stepped = both(params)
  assert_close(stepped, full, what="cached logits")


def test_cached_decoder_takes_one_position_per_call():
  module = T5Model(tiny_config(), use_cache=True)
  ids = np.ones((1, 4), np.int32)
  params = jax.eval_shape(module.init, rng_key(0), ids)["params"]
  enc = np.zeros((1, 4, module.config.d_model), np.float32)
  _, variables = jax.eval_shape(lambda p: module.apply(
      {"params": p}, ids, enc, method=T5Model.decode, mutable=["cache"]), params)
  with pytest.raises(ValueError, match="one position per call, got 2"):
    jax.eval_shape(lambda p, c: module.apply({"params": p, "cache": c}, ids[:, :2], enc,
                                             method=T5Model.decode, mutable=["cache"]),
                   params, variables["cache"])
