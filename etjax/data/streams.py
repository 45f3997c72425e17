"""Several named streams as one batch pytree, for methods that read more than one set.

RTL/MGTL read {'source', 'target', 'dev'}, distillation a transfer set beside the
labelled one, meta-learning episodes per domain. `named_streams` builds one iterator
whose batches are {name: batch dict}; every stream is an `ArrayStream` (shuffled epochs
of in-memory arrays, each its own seed), and the position of all of them checkpoints
and resumes exactly through the Trainer (`get_state` / `set_state`).

`domain_blocked_stream` builds batches of K equal contiguous blocks, block k holding
rows of domain k (each domain its own stream), for models that run a per-domain
module on its own domain's block only (the shared/private feature-based methods).
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

  wrap=True lets a batch run on into the next epoch's order instead of skipping the
  tail, so every row is used and batch_size may exceed the rows (a small domain
  repeats by epochs).
  """

  def __init__(self, data: Mapping[str, np.ndarray], batch_size: int, *, seed: Any,
               name: str = "stream", process_index: Optional[int] = None,
               process_count: Optional[int] = None, wrap: bool = False):
    self.data = {k: np.asarray(v) for k, v in data.items()}
    sizes = {k: len(v) for k, v in self.data.items()}
    self.num = len(next(iter(self.data.values()))) if self.data else 0
    if not self.data or len(set(sizes.values())) != 1:
      raise ValueError(f"{name}: arrays must share their number of rows, got {sizes}")
    most = self.num if not wrap or not self.num else batch_size
    if not 0 < batch_size <= most:
      raise ValueError(f"{name}: batch_size must be in 1..{self.num} (its examples), "
                       f"got {batch_size}")
    self.process_index = (jax.process_index() if process_index is None
                          else process_index)
    self.process_count = (jax.process_count() if process_count is None
                          else process_count)
    if batch_size % self.process_count:
      raise ValueError(f"{name}: batch_size {batch_size} does not divide over "
                       f"{self.process_count} processes")
    self.batch_size, self.seed, self.name, self.wrap = batch_size, seed, name, wrap
    self.epoch, self.index = 0, 0

  def _order(self) -> np.ndarray:
    seed = list(np.atleast_1d(self.seed)) + [self.epoch]
    return np.random.default_rng(seed).permutation(self.num)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self.wrap:
      rows = self._wrapped_rows()
    else:
      if self.index + self.batch_size > self.num:
        self.epoch, self.index = self.epoch + 1, 0
      rows = self._order()[self.index:self.index + self.batch_size]
      self.index += self.batch_size
    share = self.batch_size // self.process_count
    rows = rows[self.process_index * share:(self.process_index + 1) * share]
    return {k: v[rows] for k, v in self.data.items()}

  def _wrapped_rows(self) -> np.ndarray:
    parts, need = [], self.batch_size
    while need:
      if self.index >= self.num:
        self.epoch, self.index = self.epoch + 1, 0
      take = min(need, self.num - self.index)
      parts.append(self._order()[self.index:self.index + take])
      self.index, need = self.index + take, need - take
    return np.concatenate(parts)

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


class DomainBlockedStream:
  """Batches of K equal contiguous blocks, block k = the next rows of domain k's own
  stream; the position is every domain's (see `domain_blocked_stream`)."""

  def __init__(self, streams: list, process_index: int, process_count: int):
    self.streams = streams
    self.process_index, self.process_count = process_index, process_count

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    blocks = [next(stream) for stream in self.streams]
    batch = {name: np.concatenate([b[name] for b in blocks]) for name in blocks[0]}
    # Each process takes its contiguous share of the GLOBAL blocked batch, so the
    # global batch the model sees keeps the blocks contiguous.
    share = len(batch["domain"]) // self.process_count
    rows = slice(self.process_index * share, (self.process_index + 1) * share)
    return {name: v[rows] for name, v in batch.items()}

  def get_state(self) -> dict:
    return {"domains": [stream.get_state() for stream in self.streams]}

  def set_state(self, state: Mapping) -> None:
    if (not isinstance(state, Mapping) or set(state) != {"domains"}
        or len(state["domains"]) != len(self.streams)):
      raise ValueError(f"a saved data position {state!r} is not that of domain-blocked "
                       f"batches of {len(self.streams)} domains")
    for stream, position in zip(self.streams, state["domains"]):
      stream.set_state(position)


def check_block_size(batch_size: int, num_domains: int,
                     batch_size_name: str = "batch_size") -> None:
  """Raises ValueError naming `batch_size_name` unless batch_size splits into
  num_domains equal blocks of at least one row."""
  if num_domains < 1 or batch_size % num_domains or batch_size < num_domains:
    raise ValueError(f"{batch_size_name} = {batch_size} does not split into "
                     f"{num_domains} equal blocks, one per domain of the training rows "
                     f"(the private encoders each run on their own domain's block): "
                     f"give a multiple of {num_domains}")


def domain_blocked_stream(data: Mapping[str, np.ndarray], batch_size: int, *,
                          num_domains: int, seed: int,
                          batch_size_name: str = "batch_size",
                          process_index: Optional[int] = None,
                          process_count: Optional[int] = None) -> DomainBlockedStream:
  """Endless, resumable domain-blocked batches of encoded data with a 'domain' column.

  Block k (rows k * b .. (k + 1) * b - 1, b = batch_size / num_domains) holds rows of
  domain k, drawn from domain k's own stream (shuffled epochs with seed (seed, k)
  that run on into the next epoch, so a domain with fewer rows than b repeats).

  Args:
    data: encoded data (dict of arrays [N, ...]) with 'domain' (int [N], in [0, K)).
    batch_size: GLOBAL rows per batch; a multiple of num_domains (and of the
      processes).
    num_domains: K; every domain must have rows.
    seed: the shuffling seed.
    batch_size_name: what the user calls batch_size, for messages (a flag name).
    process_index, process_count: this process's share (default: jax's).

  Returns:
    An iterator of batch dicts [batch_size / process_count, ...] with get_state /
    set_state ({'domains': [each domain's ArrayStream position]}).
  """
  if "domain" not in data:
    raise ValueError("domain-blocked batches need a 'domain' column in the data")
  check_block_size(batch_size, num_domains, batch_size_name)
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if batch_size % process_count:
    raise ValueError(f"{batch_size_name} = {batch_size} does not divide over "
                     f"{process_count} processes")
  domain = np.asarray(data["domain"])
  counts = np.bincount(domain[(domain >= 0) & (domain < num_domains)],
                       minlength=num_domains)
  bad = sorted(set(domain.tolist()) - set(range(num_domains)))
  if bad or not counts.all():
    raise ValueError(f"domain-blocked batches of {num_domains} domains: 'domain' ids "
                     f"{bad} out of [0, {num_domains})" if bad else
                     f"domain-blocked batches of {num_domains} domains: domains "
                     f"{np.flatnonzero(counts == 0).tolist()} have no training rows")
  streams = [ArrayStream({name: np.asarray(v)[domain == k] for name, v in data.items()},
                         batch_size // num_domains, seed=(seed, k), name=f"domain {k}",
                         process_index=0, process_count=1, wrap=True)
             for k in range(num_domains)]
  return DomainBlockedStream(streams, process_index, process_count)
