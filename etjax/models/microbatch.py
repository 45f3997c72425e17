"""Splitting a batch into microbatches, shared by gradient accumulation and pipelining.

Microbatch i holds examples i, i + M, i + 2M, ... (a strided split): reshaping [B, ...]
to [B/M, M, ...] keeps the batch sharding on the leading B/M dimension, so every
microbatch is spread over all data-parallel devices, each of which splits its own
examples. A contiguous split ([M, B/M, ...]) would put whole microbatches on a few
devices instead.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def check_divisible(batch_size: int, num_microbatches: int, what: str = "batch") -> None:
  """Raises ValueError unless num_microbatches >= 1 divides batch_size."""
  if num_microbatches < 1 or batch_size % num_microbatches:
    raise ValueError(f"{what} of {batch_size} examples does not split into "
                     f"{num_microbatches} equal microbatches")


def split_microbatches(tree: Any, num_microbatches: int) -> Any:
  """[B, ...] leaves -> [M, B/M, ...] leaves (microbatch i = examples i, i+M, ...)."""
  def split(x):
    check_divisible(x.shape[0], num_microbatches)
    x = jnp.reshape(x, (x.shape[0] // num_microbatches, num_microbatches) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree.map(split, tree)


def merge_microbatches(tree: Any) -> Any:
  """Inverse of `split_microbatches`: [M, B/M, ...] leaves -> [B, ...] leaves."""
  def merge(x):
    x = jnp.swapaxes(x, 0, 1)
    return jnp.reshape(x, (x.shape[0] * x.shape[1],) + x.shape[2:])
  return jax.tree.map(merge, tree)
