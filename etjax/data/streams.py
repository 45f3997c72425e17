"""Several named streams as one batch pytree, for methods that read more than one set.

RTL/MGTL read {'source', 'target', 'dev'}, distillation a transfer set beside the
labelled one, meta-learning episodes per domain. `named_streams` builds one iterator
whose batches are {name: batch dict}; every stream is an `ArrayStream` (shuffled epochs
of in-memory arrays, each its own seed), and the position of all of them checkpoints
and resumes exactly through the Trainer (`get_state` / `set_state`).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import numpy as np


class ArrayStream:
  """Endless batches of `batch_size` rows of a dict of arrays [N, ...], reshuffled
  every epoch by (seed, epoch); an epoch's incomplete tail is skipped. In a
  multi-process job each process gets its contiguous share of every global batch.

  Deterministic: the batches depend only on (data, batch_size, seed), and
  `get_state()` -> {'epoch', 'index'} (JSON) restores a position exactly.
  """

  def __init__(self, data: Mapping[str, np.ndarray], batch_size: int, *, seed: Any,
               name: str = "stream", process_index: Optional[int] = None,
               process_count: Optional[int] = None):
    self.data = {k: np.asarray(v) for k, v in data.items()}
    sizes = {k: len(v) for k, v in self.data.items()}
    self.num = len(next(iter(self.data.values()))) if self.data else 0
    if not self.data or len(set(sizes.values())) != 1:
      raise ValueError(f"{name}: arrays must share their number of rows, got {sizes}")
    if not 0 < batch_size <= self.num:
      raise ValueError(f"{name}: batch_size must be in 1..{self.num} (its examples), "
                       f"got {batch_size}")
    self.process_index = (jax.process_index() if process_index is None
                          else process_index)
    self.process_count = (jax.process_count() if process_count is None
                          else process_count)
    if batch_size % self.process_count:
      raise ValueError(f"{name}: batch_size {batch_size} does not divide over "
                       f"{self.process_count} processes")
    self.batch_size, self.seed, self.name = batch_size, seed, name
    self.epoch, self.index = 0, 0

  def _order(self) -> np.ndarray:
    seed = list(np.atleast_1d(self.seed)) + [self.epoch]
    return np.random.default_rng(seed).permutation(self.num)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self.index + self.batch_size > self.num:
      self.epoch, self.index = self.epoch + 1, 0
    rows = self._order()[self.index:self.index + self.batch_size]
    self.index += self.batch_size
    share = self.batch_size // self.process_count
    rows = rows[self.process_index * share:(self.process_index + 1) * share]
    return {k: v[rows] for k, v in self.data.items()}

  def get_state(self) -> dict:
    return {"epoch": self.epoch, "index": self.index}

  def set_state(self, state: Mapping) -> None:
    if not isinstance(state, Mapping) or set(state) != {"epoch", "index"}:
      raise ValueError(f"{self.name}: not an ArrayStream position (expected keys "
                       f"['epoch', 'index']): {state!r}")
    self.epoch, self.index = int(state["epoch"]), int(state["index"])


class NamedStreams:
  """{name: stream} as one iterator of {name: batch}; the position is every stream's."""

  def __init__(self, streams: Mapping[str, Any]):
    if not streams:
      raise ValueError("NamedStreams needs at least one stream")
    self.streams = dict(streams)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return {name: next(stream) for name, stream in self.streams.items()}

  def get_state(self) -> dict:
    return {name: stream.get_state() for name, stream in self.streams.items()}

  def set_state(self, state: Mapping) -> None:
    if not isinstance(state, Mapping) or set(state) != set(self.streams):
      raise ValueError(f"a saved data position has streams "
                       f"{sorted(state) if isinstance(state, Mapping) else state!r}; "
                       f"this iterator has {sorted(self.streams)}")
    for name, stream in self.streams.items():
      stream.set_state(state[name])


def named_streams(data: Mapping[str, Mapping[str, np.ndarray]],
                  batch_sizes: Mapping[str, int], *, seed: int, **process) -> NamedStreams:
  """One iterator of {name: batch} over several datasets.

  Args:
    data: {name: encoded data (dict of arrays [N, ...])}.
    batch_sizes: {name: GLOBAL rows per batch of that stream}; the same names.
    seed: stream i shuffles with seed (seed, i), i in the order of `data`.
    **process: process_index / process_count (default: jax's).
  """
  if set(batch_sizes) != set(data):
    raise ValueError(f"batch_sizes names {sorted(batch_sizes)} differ from the "
                     f"streams {sorted(data)}")
  return NamedStreams({
      name: ArrayStream(arrays, batch_sizes[name], seed=(seed, i), name=name, **process)
      for i, (name, arrays) in enumerate(data.items())})
