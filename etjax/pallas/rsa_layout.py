"""Block layouts for Random Sparse Attention (RSA).

The attention matrix of a sequence of `seq_len` tokens is cut into square blocks of
`block_size` tokens: `n = seq_len // block_size` query blocks by `n` key blocks. A
layout is an int32 array `[heads, n, n // k]`: row `layout[h, i]` lists the key blocks
that query block `i` attends to in head `h`. Every head keeps the same number of
slots, `width = n // k`, so memory and FLOPs are 1/k of dense attention.

Rules followed by `make_layout` (tests/pallas/test_rsa_layout.py checks each):

1. Diagonal: every head of every query block holds its own block `i` (local context).
2. Dealing: for query block `i`, one random permutation of the other candidate key
   blocks is drawn; head `h` takes `width - 1` consecutive entries of it starting at
   `h * (width - 1)`, wrapping around. The heads therefore see disjoint blocks as long
   as the permutation lasts, and together they cover every candidate key block
   whenever `heads * (width - 1) >= candidates`. For a non-causal layout that is
   `heads * (n // k - 1) >= n - 1`; it holds for all `heads >= k + 1` when
   `n >= k * k`, and for all `heads >= 2 * k` when `n // k >= 2`. (With exactly
   `heads == k` it cannot hold for k > 1: keeping the diagonal in every head spends
   k - 1 slots on copies of it.)
3. Causal: only key blocks `j <= i` are candidates. A query block with fewer
   candidates than slots takes all of them and fills the remaining slots with -1.
4. Rows are sorted ascending with the -1 fillers last; no block appears twice in a row.
5. Same arguments, same layout: the permutations come from `numpy.random.default_rng(seed)`.

With k = 1 every head attends to every block (or every block at or before the
diagonal when causal), which is dense (causal) attention.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def num_blocks(length: int, block_size: int, what: str = "sequence length") -> int:
  """Returns `length // block_size`, or raises ValueError if it does not divide."""
  if block_size <= 0:
    raise ValueError(f"RSA block_size must be positive, got {block_size}")
  if length % block_size:
    raise ValueError(
        f"RSA: {what} {length} is not divisible by block_size {block_size}; pad the "
        f"inputs to a multiple of {block_size} (and mask the padding) or pick a "
        f"block size that divides {length}")
  return length // block_size


def make_layout(num_heads: int, seq_len: int, block_size: int, k: int, seed: int,
                causal: bool = False) -> np.ndarray:
  """Draws a random sparse block layout (rules in the module docstring).

  Args:
    num_heads: attention heads.
    seq_len: tokens; must be a multiple of `block_size`.
    block_size: tokens per block.
    k: sparsity; each query block attends to `n // k` of the `n` key blocks.
    seed: seed of the random permutations.
    causal: only pick key blocks at or before the diagonal.

  Returns:
    int32 numpy array [num_heads, n, n // k] of key-block indices, -1 for an empty
    slot (only in causal layouts).
  """
  n = num_blocks(seq_len, block_size)
  if num_heads <= 0:
    raise ValueError(f"RSA make_layout: num_heads must be positive, got {num_heads}")
  if k < 1 or k > n:
    raise ValueError(f"RSA make_layout: k must be in [1, {n}] (the number of blocks "
                     f"of {seq_len} tokens in blocks of {block_size}), got {k}")
  width = n // k
  rng = np.random.default_rng(seed)
  layout = np.full((num_heads, n, width), -1, np.int32)
  for i in range(n):
    others = np.arange(i) if causal else np.delete(np.arange(n), i)
    perm = rng.permutation(others)
    take = min(width - 1, len(perm))
    for h in range(num_heads):
      start = h * (width - 1)
      picks = perm[(start + np.arange(take)) % len(perm)] if take else perm[:0]
      row = np.sort(np.concatenate([[i], picks]))
      layout[h, i, :len(row)] = row
  return layout


def expand_layout(layout, block_size: int, kv_len: int) -> jax.Array:
  """Returns the bool block mask [heads, q_len, kv_len] a layout selects."""
  layout = jnp.asarray(layout)
  nk = kv_len // block_size
  hit_hqk = (layout[..., None] == jnp.arange(nk)).any(axis=2)   # [H, nq, nk]
  hit_hqk = jnp.repeat(jnp.repeat(hit_hqk, block_size, axis=1), block_size, axis=2)
  return hit_hqk


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def validate_layout(layout, num_heads: int, q_blocks: int, kv_blocks: int) -> None:
  """Raises ValueError if `layout` does not fit the attention it is used with."""
  shape = tuple(np.shape(layout))
  if len(shape) != 3 or shape[0] != num_heads or shape[1] != q_blocks:
    raise ValueError(f"RSA layout: expected shape [heads={num_heads}, "
                     f"q_blocks={q_blocks}, width], got {list(shape)}")
  if not 1 <= shape[2] <= kv_blocks:
    raise ValueError(f"RSA layout: width {shape[2]} must be in [1, {kv_blocks}]")
  if not jnp.issubdtype(np.asarray(layout).dtype if _is_concrete(layout)
                        else layout.dtype, jnp.integer):
    raise ValueError("RSA layout: must hold integer block indices")
  if not _is_concrete(layout):
    return
  lay = np.asarray(layout)
  if lay.min() < -1 or lay.max() >= kv_blocks:
    raise ValueError(f"RSA layout: block indices must be in [-1, {kv_blocks}), got "
                     f"values in [{lay.min()}, {lay.max()}]")
  srt = np.sort(lay, axis=-1)
  if np.any((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)):
    raise ValueError("RSA layout: a key block appears twice in one row")


class Tables(NamedTuple):
  """Block tables a kernel reads.

  layout: int32 [H, nq, w], each row's valid blocks first (ascending), then -1.
  counts: int32 [H, nq, 1], valid slots per row.
  inverse: int32 [H, nk, wi], for each key block the query blocks that chose it.
  inverse_counts: int32 [H, nk, 1], valid entries per inverse row.
  """
  layout: jax.Array
  counts: jax.Array
  inverse: jax.Array
  inverse_counts: jax.Array


def make_tables(layout, kv_blocks: int) -> Tables:
  """Builds the forward and inverse block tables of a layout.

  With a concrete layout (numpy, or a jax array outside a trace) the tables are
  computed with numpy and the inverse is trimmed to its longest row; inside a trace
  they are computed with jnp and the inverse keeps the worst-case width (all query
  blocks).

  Returns:
    A `Tables` (see its docstring for shapes).
  """
  xp = np if _is_concrete(layout) else jnp
  lay = xp.asarray(layout).astype(xp.int32)
  _, nq, _ = lay.shape
  big = np.int32(np.iinfo(np.int32).max)
  lay = xp.sort(xp.where(lay < 0, big, lay), axis=-1)
  lay = xp.where(lay == big, -1, lay).astype(xp.int32)
  counts = (lay >= 0).sum(axis=-1, keepdims=True).astype(xp.int32)
  # member[h, j, i]: query block i selected key block j in head h.
  member = (lay[:, None, :, :] == xp.arange(kv_blocks)[None, :, None, None]).any(-1)
  qidx = xp.arange(nq, dtype=xp.int32)
  order = xp.sort(xp.where(member, qidx, nq + qidx), axis=-1)
  inverse = xp.where(order < nq, order, -1).astype(xp.int32)
  inv_counts = member.sum(axis=-1, keepdims=True).astype(xp.int32)
  if xp is np:
    width = max(int(inv_counts.max()), 1)
    inverse = inverse[..., :width]
    return Tables(*(jnp.asarray(t) for t in (lay, counts, inverse, inv_counts)))
  return Tables(lay, counts, inverse, inv_counts)
