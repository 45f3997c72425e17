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

from etjax.data import bucketing
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

  With `buckets`, each batch's sequence columns are cut to the smallest bucket length
  holding its longest row (over the global batch, so all processes agree); with
  `group_batches` = k > 1, each window of k shuffled batches is regrouped by length
  (etjax.data.bucketing). Both are off by default.
  """

  def __init__(self, data: Mapping[str, np.ndarray], batch_size: int, *, seed: int,
               process_index: int | None = None, process_count: int | None = None,
               num_epochs: int | None = None, shuffle: bool = True,
               include_index: bool = False, buckets: Sequence[int] | None = None,
               group_batches: int = 1):
    n = num_examples(data)
    if not 0 <= seed < 2**32:
      raise ValueError(f'seed must be in [0, 2**32), got {seed}')
    if batch_size > n:
      raise ValueError(f'batch_size {batch_size} exceeds the {n} examples')
    if group_batches < 1:
      raise ValueError(f'group_batches must be >= 1, got {group_batches}')
    pi, pc, per_process = _process(process_index, process_count, batch_size)
    self.per_process_batch = per_process
    self.num_examples = n
    self._config = {'num_examples': n, 'batch_size': batch_size, 'seed': seed,
                    'process_index': pi, 'process_count': pc,
                    'num_epochs': num_epochs, 'shuffle': shuffle}
    self._full_length = data[bucketing.SEQUENCE_KEY].shape[1]
    self._buckets = (bucketing.check_buckets(buckets, self._full_length)
                     if buckets else None)
    if self._buckets or group_batches > 1:
      # Only non-default settings enter the config: older saved positions stay valid.
      self._config.update(buckets=list(self._buckets or ()), group_batches=group_batches)
    self._lengths = bucketing.row_lengths(data)
    self._group, self._batch_size, self._seed = group_batches, batch_size, seed
    self._slice = slice(pi * per_process, (pi + 1) * per_process)
    self._gather = _gather(dict(data), include_index)
    ds = grain.MapDataset.range(n)
    if shuffle:
      # shuffle before repeat: grain reseeds the permutation every epoch.
      ds = ds.shuffle(seed=seed)
    # One grain element is a window of `group_batches` global batches of row ids.
    ds = ds.repeat(num_epochs).batch(batch_size * group_batches, drop_remainder=True)
    # The gathers are cheap numpy indexing: threads would only add contention.
    options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    self._iter = ds.to_iter_dataset(options).__iter__()
    self._batches: list[np.ndarray] = []  # global row ids of the current window's batches
    self._offset = 0  # batches of the window already yielded
    self._windows = 0  # windows fetched so far (seeds each window's batch order)
    self._window_state = dict(self._iter.get_state())  # grain position before the window

  def __iter__(self) -> Iterator[Arrays]:
    return self

  def _fetch_window(self) -> None:
    self._window_state = dict(self._iter.get_state())
    rows = np.asarray(next(self._iter))
    if self._group == 1:
      self._batches = [rows]
    else:
      rng = np.random.default_rng([self._seed, self._windows])
      self._batches = bucketing.group_by_length(rows, self._lengths, self._batch_size,
                                                rng)
    self._windows += 1
    self._offset = 0

  def __next__(self) -> Arrays:
    if self._offset >= len(self._batches):
      self._fetch_window()
    rows = self._batches[self._offset]
    self._offset += 1
    batch = self._gather(rows[self._slice])
    if self._buckets:
      length = bucketing.bucket_for(int(self._lengths[rows].max()), self._buckets)
      batch = bucketing.trim(batch, length, self._full_length)
    return batch

  def get_state(self) -> dict:
    """Returns the position and the configuration it belongs to (JSON-serialisable)."""
    if self._offset >= len(self._batches):  # between windows
      state = {'grain': dict(self._iter.get_state()), 'config': dict(self._config)}
      window, offset = self._windows, 0
    else:
      state = {'grain': dict(self._window_state), 'config': dict(self._config)}
      window, offset = self._windows - 1, self._offset
    if self._group > 1:
      state.update(window=window, offset=offset)
    return state

  def set_state(self, state: Mapping) -> None:
    """Moves to a position from `get_state` of an identically configured iterator."""
    keys = {'grain', 'config'} | ({'window', 'offset'} if self._group > 1 else set())
    if not isinstance(state, Mapping) or set(state) != keys:
      raise ValueError(f'not a TrainIterator state (expected keys {sorted(keys)}): '
                       f'{state!r}')
    diff = {k: (state['config'].get(k), v) for k, v in self._config.items()
            if state['config'].get(k) != v}
    if diff:
      raise ValueError('the saved data position belongs to another pipeline; '
                       f'(saved, now) differ in {diff}')
    self._iter.set_state(dict(state['grain']))
    self._batches, self._offset = [], 0
    self._windows = int(state.get('window', 0))
    if state.get('offset', 0):
      self._fetch_window()
      self._offset = int(state['offset'])


def train_iterator(data: Mapping[str, np.ndarray], batch_size: int, *, seed: int,
                   process_index: int | None = None, process_count: int | None = None,
                   num_epochs: int | None = None, shuffle: bool = True,
                   include_index: bool = False, buckets: Sequence[int] | None = None,
                   group_batches: int = 1) -> TrainIterator:
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
    buckets: sequence lengths (see etjax.data.bucketing.bucket_lengths); each batch's
      [B, L] columns are cut to the smallest one holding its longest row. None: every
      batch keeps the encoded length.
    group_batches: k > 1 regroups each window of k shuffled batches by length, so
      rows of similar length share a batch (then the incomplete last window of a
      finite run is dropped).

  Returns:
    An iterator of batch dicts, arrays [per_process_batch, ...] ([..., bucket] for
    the sequence columns when bucketing).
  """
  return TrainIterator(data, batch_size, seed=seed, process_index=process_index,
                       process_count=process_count, num_epochs=num_epochs,
                       shuffle=shuffle, include_index=include_index, buckets=buckets,
                       group_batches=group_batches)


class EvalBatches:
  """One ordered pass over the encoded data in static-shape batches (see module doc)."""

  def __init__(self, data: Mapping[str, np.ndarray], batch_size: int, *,
               process_index: int | None = None, process_count: int | None = None,
               include_index: bool = False, buckets: Sequence[int] | None = None,
               sort_by_length: bool = False):
    n = num_examples(data)
    pi, _, per_process = _process(process_index, process_count, batch_size)
    self.num_examples = n
    self.per_process_batch = per_process
    self._num_batches = math.ceil(n / batch_size)
    self._full_length = data[bucketing.SEQUENCE_KEY].shape[1]
    self._buckets = (bucketing.check_buckets(buckets, self._full_length)
                     if buckets else None)
    self._lengths = bucketing.row_lengths(data)
    order = (np.argsort(self._lengths, kind='stable') if sort_by_length else
             np.arange(n))
    # Global row ids in order, then -1 fillers up to whole global batches; every
    # process therefore runs the same number of steps.
    rows = np.full(self._num_batches * batch_size, -1, np.int64)
    rows[:n] = order
    self._global_rows = rows.reshape(self._num_batches, batch_size)
    self._slice = slice(pi * per_process, (pi + 1) * per_process)
    self._data = dict(data)
    self._include_index = include_index

  def __len__(self) -> int:
    return self._num_batches

  def __iter__(self) -> Iterator[Arrays]:
    gather = _gather(self._data, include_index=False)
    for global_rows in self._global_rows:
      rows = global_rows[self._slice]
      real = rows >= 0
      # Fillers copy the global batch's last real row, so they fit its bucket.
      batch = gather(np.where(real, rows, global_rows[global_rows >= 0][-1]))
      batch['weight'] = np.where(real, batch['weight'], 0).astype(np.float32)
      if self._include_index:
        batch['index'] = rows.astype(np.int32)
      if self._buckets:
        longest = int(self._lengths[global_rows[global_rows >= 0]].max())
        batch = bucketing.trim(batch, bucketing.bucket_for(longest, self._buckets),
                               self._full_length)
      yield batch


def eval_batches(data: Mapping[str, np.ndarray], batch_size: int, *,
                 process_index: int | None = None, process_count: int | None = None,
                 include_index: bool = False, buckets: Sequence[int] | None = None,
                 sort_by_length: bool = False) -> EvalBatches:
  """Returns ceil(N / batch_size) evaluation batches, in order, padded with weight 0.

  Args:
    data: encoded data from `encode_examples`.
    batch_size: GLOBAL batch size; each process gets batch_size // process_count rows
      of each global batch (a contiguous part).
    process_index, process_count: this process's shard (default: jax's).
    include_index: add 'index' (int32 [B]; -1 on filler rows).
    buckets: as for `train_iterator`: sequence columns cut per batch.
    sort_by_length: visit rows shortest first (then most batches fit a small bucket);
      outputs come in that order, not the data's (metrics do not care; use
      include_index to map rows back).

  Returns:
    An `EvalBatches` (iterable any number of times, with len) of batch dicts, arrays
    [per_process_batch, ...].
  """
  return EvalBatches(data, batch_size, process_index=process_index,
                     process_count=process_count, include_index=include_index,
                     buckets=buckets, sort_by_length=sort_by_length)
