"""Dropout masks whose random bits come from Threefry-4x32.

The functional dropout the RSA kernels' XLA path and the models share (it lives here
because pallas imports nothing of etjax; etjax.models.dropout wraps it as a module).
Every dropout in etjax (hidden states, attention probabilities, classifier heads, RSA)
draws its keep-mask here, from a Threefry-4x32 key derived from the key it is given (a
threefry-2x32 key from `make_rng`, as flax hands out). Why not that key itself: XLA:CPU
lowers JAX's default threefry-2x32 through a rolled loop over whole arrays, and a
bert-base attention-dropout mask of [16, 12, 128, 128] took 30 ms that way against 4.8 ms
with Threefry-4x32 (benchmarks/RESULTS.md). Philox-4x32 is faster still on one device
(2.2 ms) but its 32-bit multiply-high does not pass XLA's SPMD partitioner on CPU, so
sharded steps could not use it. The change of generator only changes which positions
are dropped, not their distribution.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASK_IMPL = "threefry4x32"


def mask_key(rng: jax.Array) -> jax.Array:
  """The Threefry-4x32 key whose four words are random bits drawn with `rng`.

  rng: a raw uint32[2] key (jax.random.PRNGKey) or a typed key of any implementation.
  """
  if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.wrap_key_data(rng)
  words = jax.random.bits(rng, (4,), jnp.uint32)
  return jax.random.wrap_key_data(words, impl=MASK_IMPL)


def keep_mask(rng: jax.Array, keep_prob: float, shape: tuple[int, ...]) -> jax.Array:
  """bool [*shape], each element True with probability keep_prob, independently."""
  return jax.random.bernoulli(mask_key(rng), keep_prob, shape)


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  """Inverted dropout: zeroes each element of x with probability `rate` and scales the
  rest by 1 / (1 - rate), so that E[dropout(x)] = x. Identity when rate is 0 or rng is
  None. Same shape and dtype as x."""
  if rate == 0.0 or rng is None:
    return x
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"dropout rate must lie in [0, 1), got {rate}")
  keep = keep_mask(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)
