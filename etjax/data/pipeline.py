"""Input pipeline: encode once, then batch for training (grain) and evaluation.

Examples are tokenized once into a dict of numpy arrays (`encode_examples`), the
"encoded data"; batches index into it, so no step tokenizes. Every batch is a dict
with DESIGN.md's names and static shapes:

  input_ids, attention_mask, token_type_ids  int32   [B, L]
  labels, domain                             int32   [B]
  weight                                     float32 [B]
  index (only with include_index=True)       int32   [B]  row in the encoded data

Training batches (`train_iterator`) are shuffled by seed, repeat, and are sharded by
process: each global batch of `batch_size` rows is cut into `process_count` disjoint
contiguous parts, one per process, so the processes' batches laid side by side are the
batch a single process would see. The iterator's position is a small JSON-able dict
(`get_state` / `set_state`) that a checkpoint can hold.

Evaluation batches (`eval_batches`) make one pass in order; the last batch is filled
to full size with copies of a real row given weight 0, so shapes stay static and the
filler cannot produce NaNs (an all-padding row could).
"""

from __future__ import annotations

import math
from typing import Iterator, Mapping, Sequence

import grain
import numpy as np

from etjax.data import readers
from etjax.data import tokenizers

BATCH_KEYS = ('input_ids', 'attention_mask', 'token_type_ids', 'labels', 'domain',
              'weight')
_DTYPES = {'input_ids': np.int32, 'attention_mask': np.int32,
           'token_type_ids': np.int32, 'labels': np.int32, 'domain': np.int32,
           'weight': np.float32}

Arrays = dict[str, np.ndarray]


def encode_examples(
    examples: Sequence[readers.Example],
    tokenizer: tokenizers.Tokenizer,
    max_length: int,
    *,
    weight: np.ndarray | None = None,
) -> Arrays:
  """Tokenizes examples once into the encoded data.

  Args:
    examples: all single texts (text_b None) or all pairs.
    tokenizer: the tokenizer; pairs are truncated 'longest_first'.
    max_length: L; every row is truncated and padded to it.
    weight: optional per-example weights [N] (default ones).

  Returns:
    {input_ids, attention_mask, token_type_ids: int32 [N, L]; labels, domain: int32
    [N]; weight: float32 [N]}.
  """
  if not examples:
    raise ValueError('encode_examples got no examples')
  is_pair = examples[0].text_b is not None
  for i, ex in enumerate(examples):
    if (ex.text_b is not None) != is_pair:
      raise ValueError(f'example {i} is {"a pair" if ex.text_b is not None else "single"}'
                       f' but example 0 is {"a pair" if is_pair else "single"}; '
                       'encode single texts and pairs separately')
  text_b = [ex.text_b for ex in examples] if is_pair else None
  data = tokenizer.encode([ex.text_a for ex in examples], text_b,
                          max_length=max_length, padding='max_length')
  data['labels'] = np.asarray([ex.label for ex in examples], np.int32)
  data['domain'] = np.asarray([ex.domain for ex in examples], np.int32)
  if weight is None:
    data['weight'] = np.ones(len(examples), np.float32)
  else:
    data['weight'] = np.asarray(weight, np.float32)
  num_examples(data)
  return data


def num_examples(data: Mapping[str, np.ndarray]) -> int:
  """Returns N after checking that `data` has every batch key, dtype and length N."""
  missing = [k for k in BATCH_KEYS if k not in data]
  if missing:
    raise ValueError(f'encoded data lacks {missing}; it needs {list(BATCH_KEYS)}')
  n = len(data['labels'])
  for k, v in data.items():
    if len(v) != n:
      raise ValueError(f'encoded data: {k!r} has {len(v)} rows, labels has {n}')
    if k in _DTYPES and v.dtype != _DTYPES[k]:
      raise ValueError(f'encoded data: {k!r} is {v.dtype}, expected '
                       f'{np.dtype(_DTYPES[k]).name}')
  if n == 0:
    raise ValueError('encoded data has no rows')
  return n


def take(data: Mapping[str, np.ndarray], indices: Sequence[int] | np.ndarray) -> Arrays:
  """Returns the rows `indices` of the encoded data (e.g. one domain's examples)."""
  indices = np.asarray(indices)
  return {k: v[indices] for k, v in data.items()}


def concatenate(datas: Sequence[Mapping[str, np.ndarray]]) -> Arrays:
  """Returns the encoded datas stacked row-wise (e.g. source and target together)."""
  if not datas:
    raise ValueError('concatenate got nothing')
  keys = set(datas[0])
  for i, d in enumerate(datas):
    if set(d) != keys:
      raise ValueError(f'encoded data #{i} has keys {sorted(d)}, #0 has {sorted(keys)}')
  return {k: np.concatenate([d[k] for d in datas]) for k in datas[0]}


def _process(process_index: int | None, process_count: int | None,
             batch_size: int) -> tuple[int, int, int]:
  """Returns (process_index, process_count, rows per process), defaulting to jax's."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is outside [0, {process_count})')
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(f'batch_size {batch_size} must be a positive multiple of '
                     f'process_count {process_count}')
  return process_index, process_count, batch_size // process_count


def _gather(data: Arrays, include_index: bool):
  """Returns rows -> batch dict; extra per-example arrays in `data` ride along."""
  def gather(rows: np.ndarray) -> Arrays:
    batch = {k: v[rows] for k, v in data.items()}
    if include_index:
      batch['index'] = rows.astype(np.int32)
    return batch
  return gather


class TrainIterator:
  """Endless (or `num_epochs`-long) shuffled training batches with a savable position.

  Iterating yields batch dicts of `per_process_batch` rows. `get_state()` returns a
  JSON-serialisable dict; `set_state(state)` on an iterator built with the same
  arguments continues exactly where the saved one stood.
  """

  def __init__(self, data: Mapping[str, np.ndarray], batch_size: int, *, seed: int,
               process_index: int | None = None, process_count: int | None = None,
               num_epochs: int | None = None, shuffle: bool = True,
               include_index: bool = False):
    n = num_examples(data)
    if not 0 <= seed < 2**32:
      raise ValueError(f'seed must be in [0, 2**32), got {seed}')
    if batch_size > n:
      raise ValueError(f'batch_size {batch_size} exceeds the {n} examples')
    pi, pc, per_process = _process(process_index, process_count, batch_size)
    self.per_process_batch = per_process
    self.num_examples = n
    self._config = {'num_examples': n, 'batch_size': batch_size, 'seed': seed,
                    'process_index': pi, 'process_count': pc,
                    'num_epochs': num_epochs, 'shuffle': shuffle}
    ds = grain.MapDataset.range(n)
    if shuffle:
      # shuffle before repeat: grain reseeds the permutation every epoch.
      ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs).batch(batch_size, drop_remainder=True)
    lo, hi = pi * per_process, (pi + 1) * per_process
    ds = ds.map(lambda rows: rows[lo:hi]).map(_gather(dict(data), include_index))
    # The gathers are cheap numpy indexing: threads would only add contention.
    options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    self._iter = ds.to_iter_dataset(options).__iter__()

  def __iter__(self) -> Iterator[Arrays]:
    return self

  def __next__(self) -> Arrays:
    return next(self._iter)

  def get_state(self) -> dict:
    """Returns the position and the configuration it belongs to (JSON-serialisable)."""
    return {'grain': dict(self._iter.get_state()), 'config': dict(self._config)}

  def set_state(self, state: Mapping) -> None:
    """Moves to a position from `get_state` of an identically configured iterator."""
    if not isinstance(state, Mapping) or set(state) != {'grain', 'config'}:
      raise ValueError(f'not a TrainIterator state: {state!r}')
    diff = {k: (state['config'].get(k), v) for k, v in self._config.items()
            if state['config'].get(k) != v}
    if diff:
      raise ValueError('the saved data position belongs to another pipeline; '
                       f'(saved, now) differ in {diff}')
    self._iter.set_state(dict(state['grain']))


def train_iterator(data: Mapping[str, np.ndarray], batch_size: int, *, seed: int,
                   process_index: int | None = None, process_count: int | None = None,
                   num_epochs: int | None = None, shuffle: bool = True,
                   include_index: bool = False) -> TrainIterator:
  """Returns a `TrainIterator` over the encoded data.

  Args:
    data: encoded data from `encode_examples`.
    batch_size: GLOBAL batch size; each process gets batch_size // process_count rows.
    seed: shuffling seed in [0, 2**32); each epoch is a different permutation.
    process_index, process_count: this process's shard (default: jax's).
    num_epochs: None repeats forever; else stops after that many epochs (the
      incomplete last batch is dropped).
    shuffle: False keeps file order (still repeated and sharded).
    include_index: add 'index' (int32 [B], row of each example in `data`).

  Returns:
    An iterator of batch dicts, arrays [per_process_batch, ...].
  """
  return TrainIterator(data, batch_size, seed=seed, process_index=process_index,
                       process_count=process_count, num_epochs=num_epochs,
                       shuffle=shuffle, include_index=include_index)


class EvalBatches:
  """One ordered pass over the encoded data in static-shape batches (see module doc)."""

  def __init__(self, data: Mapping[str, np.ndarray], batch_size: int, *,
               process_index: int | None = None, process_count: int | None = None,
               include_index: bool = False):
    n = num_examples(data)
    pi, _, per_process = _process(process_index, process_count, batch_size)
    self.num_examples = n
    self.per_process_batch = per_process
    self._num_batches = math.ceil(n / batch_size)
    # Global row ids in order, then -1 fillers up to whole global batches; every
    # process therefore runs the same number of steps.
    rows = np.full(self._num_batches * batch_size, -1, np.int64)
    rows[:n] = np.arange(n)
    rows = rows.reshape(self._num_batches, batch_size)
    self._rows = rows[:, pi * per_process:(pi + 1) * per_process]
    self._data = dict(data)
    self._include_index = include_index

  def __len__(self) -> int:
    return self._num_batches

  def __iter__(self) -> Iterator[Arrays]:
    gather = _gather(self._data, include_index=False)
    for rows in self._rows:
      real = rows >= 0
      batch = gather(np.where(real, rows, self.num_examples - 1))
      batch['weight'] = np.where(real, batch['weight'], 0).astype(np.float32)
      if self._include_index:
        batch['index'] = rows.astype(np.int32)
      yield batch


def eval_batches(data: Mapping[str, np.ndarray], batch_size: int, *,
                 process_index: int | None = None, process_count: int | None = None,
                 include_index: bool = False) -> EvalBatches:
  """Returns ceil(N / batch_size) evaluation batches, in order, padded with weight 0.

  Args:
    data: encoded data from `encode_examples`.
    batch_size: GLOBAL batch size; each process gets batch_size // process_count rows
      of each global batch (a contiguous part).
    process_index, process_count: this process's shard (default: jax's).
    include_index: add 'index' (int32 [B]; -1 on filler rows).

  Returns:
    An `EvalBatches` (iterable any number of times, with len) of batch dicts, arrays
    [per_process_batch, ...].
  """
  return EvalBatches(data, batch_size, process_index=process_index,
                     process_count=process_count, include_index=include_index)
