"""Greedy decoding equals transformers' generate(do_sample=False, num_beams=1)."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from etjax.models import hf
from etjax.models.t5 import T5Encoder
from etjax.models.t5_decode import greedy_decode
from t5_testlib import FLAVOURS, expected, fixture_dir

MAX_LENGTH = 10  # make_t5_fixtures.MAX_NEW_TOKENS


def _padded(generated: np.ndarray, pad_id: int) -> np.ndarray:
  """transformers' ids without the start token, padded to MAX_LENGTH (generate stops
  early once every sequence has ended)."""
  ids = generated[:, 1:]
  return np.pad(ids, ((0, 0), (0, MAX_LENGTH - ids.shape[1])), constant_values=pad_id)


@pytest.mark.parametrize("name", FLAVOURS)
def test_greedy_matches_transformers_generate(name):
  module, params = hf.from_pretrained(fixture_dir(name))
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
