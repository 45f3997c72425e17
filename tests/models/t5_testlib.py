"""Shared helpers for the T5 tests: tiny configs, fixture paths, error checks."""

from __future__ import annotations

import os

import numpy as np

from etjax.models.t5_configs import T5Config

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
FLAVOURS = ("t5_v1_0", "t5_v1_1")


def fixture_dir(name: str) -> str:
  return os.path.join(FIXTURES, name)


def expected(name: str) -> dict:
  """The inputs and transformers' outputs stored by make_t5_fixtures.py."""
  with np.load(os.path.join(FIXTURES, name, "expected.npz")) as data:
    return dict(data)


def tiny_config(**overrides) -> T5Config:
  """A small T5 1.1-style config whose dims divide 4-way tensor/fsdp meshes."""
  values = dict(vocab_size=128, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
                num_decoder_layers=2, relative_attention_num_buckets=8,
                relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
                tie_word_embeddings=False, dropout_rate=0.0)
  values.update(overrides)
  return T5Config(**values)


def assert_close(got, want, *, rel=1e-5, atol=1e-4, what=""):
  """float32 parity: max |got - want| <= atol and <= rel * max |want| (+ 1e-6)."""
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
  err = float(np.abs(got - want).max())
  scale = float(np.abs(want).max())
  assert err <= atol and err <= rel * scale + 1e-6, (
      f"{what}: max abs error {err:.3g} (reference max {scale:.3g})")


def rng_key(seed: int):
  """A typed PRNG key on the 'rbg' generator: XLA's RngBitGenerator compiles in about
  half the time of threefry on CPU, which dominates these tiny models' init and dropout."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.random.key(seed, impl="rbg")
