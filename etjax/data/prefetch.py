"""Batches prepared ahead on a background thread, with an exact data position.

    batches = Prefetcher(train_iter, transform=put_on_devices, depth=2)
    for batch in batches: ...          # transform(item) of the source's items, in order
    batches.get_state()                # the source's position after the last item taken

The thread pulls items from the source, applies `transform` (e.g. gathering and
`jax.make_array_from_process_local_data`, so the host-to-device copy overlaps the
step) and keeps up to `depth` results ready. The source runs ahead of what was
consumed, so its own `get_state()` would skip the queued items: the prefetcher
records the source's position right after producing each item and reports the one
of the last item handed out, which is what a checkpoint must hold to resume exactly.
depth=0 does everything inline on the caller's thread (same results, no thread).
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator, Optional

_END = object()


class _Failure:
  def __init__(self, error: BaseException):
    self.error = error


class Prefetcher:
  """An iterator over transform(item) of `source`, `depth` items ahead (see module)."""

  def __init__(self, source: Iterator, transform: Callable[[Any], Any] = lambda x: x,
               depth: int = 2):
    if depth < 0:
      raise ValueError(f"Prefetcher: depth must be >= 0, got {depth}")
    self._source, self._transform, self._depth = source, transform, depth
    self._has_state = hasattr(source, "get_state")
    self._state: Optional[dict] = source.get_state() if self._has_state else None
    self._done = False
    self._thread = None
    if depth:
      self._queue: queue.Queue = queue.Queue(maxsize=depth)
      self._stop = threading.Event()
      self._thread = threading.Thread(target=self._run, name="etjax-prefetch",
                                      daemon=True)
      self._thread.start()

  def _produce(self):
    item = next(self._source)
    state = self._source.get_state() if self._has_state else None
    return self._transform(item), state

  def _put(self, value) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(value, timeout=0.05)
        return True
      except queue.Full:
        continue
    return False

  def _run(self) -> None:
    try:
      while not self._stop.is_set():
        try:
          value = self._produce()
        except StopIteration:
          self._put(_END)
          return
        if not self._put(value):
          return
    except BaseException as e:  # pylint: disable=broad-except
      # Raised again on the consumer's thread, where the caller can see it.
      self._put(_Failure(e))

  def __iter__(self) -> "Prefetcher":
    return self

  def __next__(self):
    if self._done:
      raise StopIteration
    if not self._depth:
      try:
        value = self._produce()
      except StopIteration:
        self._done = True
        raise
    else:
      value = self._queue.get()
      if value is _END:
        self._done = True
        raise StopIteration
      if isinstance(value, _Failure):
        self._done = True
        raise value.error
    result, self._state = value
    return result

  def get_state(self) -> Optional[dict]:
    """The source's position after the last item handed out (None: the source has
    no get_state)."""
    return self._state

  def close(self) -> None:
    """Stops the thread (queued items are dropped; the source stays wherever the
    thread left it, ahead of `get_state()`)."""
    if self._thread is not None:
      self._stop.set()
      while True:  # unblock a pending put
        try:
          self._queue.get_nowait()
        except queue.Empty:
          break
      self._thread.join(timeout=10)
      self._thread = None
    self._done = True

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass
