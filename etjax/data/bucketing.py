"""Length bucketing: batches padded to one of a few lengths instead of max_length.

The encoded data is padded to L = max_length once. A batch whose longest row has
`m` tokens only needs its sequence columns up to the smallest bucket length >= m;
cutting the trailing columns off removes padding positions only (attention masks them
out and position ids count from the left), so a model computes the same outputs up to
float rounding while each step costs O(bucket) instead of O(L). Only the bucket
lengths ever appear as shapes, so a jitted step compiles at most len(buckets) times.

Random batches of texts with a long tail mostly still hit the top bucket; grouping
(`group_by_length`) sorts a window of several shuffled batches by length before
cutting it into batches, so rows of similar length share a batch (the same idea as
transformers' `group_by_length`). The window's batches are then visited in a
seeded random order, so long and short batches stay interleaved.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

SEQUENCE_KEY = 'attention_mask'


def bucket_lengths(max_length: int, num_buckets: int, multiple: int = 8) -> tuple[int, ...]:
  """`num_buckets` evenly spaced lengths up to `max_length`, each rounded up to a
  multiple of `multiple` (vector-friendly), the last one `max_length` itself.

  >>> bucket_lengths(128, 4)
  (32, 64, 96, 128)
  """
  if num_buckets < 1 or max_length < 1:
    raise ValueError(f'bucket_lengths: need num_buckets >= 1 and max_length >= 1, got '
                     f'{num_buckets} and {max_length}')
  lengths = {min(max_length, multiple * math.ceil(max_length * (i + 1) / num_buckets
                                                   / multiple))
             for i in range(num_buckets)}
  return tuple(sorted(lengths | {max_length}))


def check_buckets(buckets: Sequence[int], full_length: int) -> tuple[int, ...]:
  """Sorted buckets, validated against the encoded width; `full_length` is added when
  missing so every row fits some bucket."""
  buckets = sorted(int(b) for b in buckets)
  if not buckets or buckets[0] < 1 or buckets[-1] > full_length:
    raise ValueError(f'bucket lengths {buckets} must lie in [1, {full_length}] (the '
                     'encoded data\'s length)')
  if buckets[-1] != full_length:
    buckets.append(full_length)
  return tuple(buckets)


def row_lengths(data: Mapping[str, np.ndarray]) -> np.ndarray:
  """int64 [N]: one past each row's last unmasked position (at least 1)."""
  mask = np.asarray(data[SEQUENCE_KEY]) != 0
  width = mask.shape[1]
  last = width - np.argmax(mask[:, ::-1], axis=1)
  return np.where(mask.any(axis=1), last, 1)


def bucket_for(length: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= length (buckets sorted, the last one the full width)."""
  return buckets[int(np.searchsorted(buckets, length, side='left'))]


def trim(batch: dict, length: int, full_length: int) -> dict:
  """The batch with every sequence column ([B, full_length, ...] arrays) cut to
  `length`; other columns unchanged."""
  if length == full_length:
    return batch
  return {k: (v[:, :length] if np.ndim(v) >= 2 and np.shape(v)[1] == full_length else v)
          for k, v in batch.items()}


def group_by_length(rows: np.ndarray, lengths: np.ndarray, batch_size: int,
                    rng: np.random.Generator) -> list[np.ndarray]:
  """Cuts a window of row ids (a multiple of batch_size long) into batches of rows of
  similar length: stable sort by length, consecutive batches, shuffled order."""
  if len(rows) % batch_size:
    raise ValueError(f'window of {len(rows)} rows is not a multiple of {batch_size}')
  ordered = rows[np.argsort(lengths[rows], kind='stable')]
  batches = ordered.reshape(-1, batch_size)
  return [batches[i] for i in rng.permutation(len(batches))]
