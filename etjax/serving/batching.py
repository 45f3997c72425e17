"""The served model and the dynamic micro-batcher of the prediction service.

`ModelStore` holds the export version being served and swaps in a newer complete one
(loaded, verified and compiled off the event loop) when one appears; requests already
queued are then answered by the new version and none is dropped, since each batch takes
the current model when it starts.

`Batcher` groups the instances of concurrent requests: it takes what is queued, waits up
to `max_wait_s` for more while the batch is smaller than `max_batch_size`, and runs the
batch in one worker thread (XLA:CPU parallelises inside each call). Rows are padded to
the smallest exported length that fits them, so a batch is split by length bucket.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
from typing import Optional, Sequence

import numpy as np

from etjax.serving import loader

log = logging.getLogger("etjax.serving")


class ModelStore:
  """The newest complete, loadable version under `export_dir`.

  Args:
    export_dir: the export root (versions 1, 2, ...).
    max_batch_size: the batcher's limit; shapes up to it are compiled at load.
    warm_up: compile every (batch, length) shape before a version is served.
  """

  def __init__(self, export_dir: str, *, max_batch_size: int, warm_up: bool = True):
    self.export_dir = export_dir
    self.max_batch_size, self.warm_up = max_batch_size, warm_up
    self.current: Optional[loader.Export] = None
    self.refused: dict[int, str] = {}  # version -> why it could not be loaded
    self._lock = threading.Lock()
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None
    if not self.refresh():
      why = "; ".join(f"version {v}: {e}" for v, e in sorted(self.refused.items()))
      raise loader.ExportError(f"{export_dir}: no loadable export version"
                               + (f" ({why})" if why else ""))

  def refresh(self) -> bool:
    """Loads the newest complete version newer than the one served, if any; a version
    that fails to load is logged, remembered and skipped (the older one keeps
    serving). Returns whether a new version is now served."""
    with self._lock:
      served = self.current.version if self.current is not None else 0
      for version in reversed(loader.complete_versions(self.export_dir)):
        if version <= served:
          return False
        if version in self.refused:
          continue
        try:
          model = loader.load_export(os.path.join(self.export_dir, str(version)))
          if self.warm_up:
            model.warm_up(self.max_batch_size)
        except loader.ExportError as e:
          self.refused[version] = str(e)
          log.error("not serving export version %d: %s", version, e)
          continue
        self.current = model
        log.info("serving export version %d from %s", version, self.export_dir)
        return True
      return False

  def start_polling(self, interval_s: float) -> None:
    """Checks for a new version every `interval_s` seconds in a daemon thread."""
    def poll():
      while not self._stop.wait(interval_s):
        try:
          self.refresh()
        except Exception:  # pylint: disable=broad-except
          log.exception("checking %s for new versions failed", self.export_dir)
    self._thread = threading.Thread(target=poll, name="etjax-export-poll", daemon=True)
    self._thread.start()

  def stop(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=30)


class Result:
  """One request's answer: probabilities float32 [n, classes], truncated bool [n], and
  the export version that computed them."""

  def __init__(self, probabilities: np.ndarray, truncated: np.ndarray, model):
    self.probabilities, self.truncated, self.model = probabilities, truncated, model


def run_rows(model: loader.Export, texts_a: Sequence[str],
             texts_b: Sequence[Optional[str]], max_batch_size: int
             ) -> tuple[np.ndarray, np.ndarray]:
  """(probabilities [N, C], truncated [N]) of N rows, run in chunks of at most
  `max_batch_size` rows per length bucket."""
  batch, truncated = model.encode(texts_a, texts_b)
  lengths = batch["attention_mask"].sum(axis=1)
  probabilities = np.zeros((len(texts_a), len(model.label_names)), np.float32)
  lower = 0
  for bucket in model.lengths:
    rows = np.flatnonzero((lengths > lower) & (lengths <= bucket))
    lower = bucket
    for start in range(0, len(rows), max_batch_size):
      chunk = rows[start:start + max_batch_size]
      # Padding sits at the end, so the first `bucket` columns are the shorter padding.
      sub = {k: v[chunk, :bucket] for k, v in batch.items()}
      probabilities[chunk] = model.run(sub)["probabilities"]
  return probabilities, truncated


class Batcher:
  """Micro-batches the instances of concurrent requests (see the module docstring).

  Attributes:
    stats: {'batches', 'rows', 'largest_batch'} counted since start.
  """

  def __init__(self, store: ModelStore, *, max_batch_size: int, max_wait_s: float):
    if max_batch_size < 1 or max_wait_s < 0:
      raise ValueError(f"max_batch_size must be >= 1 and max_wait >= 0, got "
                       f"{max_batch_size} and {max_wait_s}")
    self.store, self.max_batch_size, self.max_wait_s = store, max_batch_size, max_wait_s
    self.stats = {"batches": 0, "rows": 0, "largest_batch": 0}
    self._queue: Optional[asyncio.Queue] = None
    self._task: Optional[asyncio.Task] = None
    self._executor = concurrent.futures.ThreadPoolExecutor(
        1, thread_name_prefix="etjax-predict")

  def _ensure_started(self) -> asyncio.Queue:
    if self._task is None or self._task.done():
      self._queue = asyncio.Queue()
      self._task = asyncio.get_running_loop().create_task(self._run())
    return self._queue

  async def submit(self, texts_a: Sequence[str],
                   texts_b: Sequence[Optional[str]]) -> Result:
    """Queues one request's rows and waits for their answer."""
    future = asyncio.get_running_loop().create_future()
    self._ensure_started().put_nowait((list(texts_a), list(texts_b), future))
    return await future

  async def _run(self) -> None:
    loop = asyncio.get_running_loop()
    while True:
      items = [await self._queue.get()]
      rows = len(items[0][0])
      deadline = time.monotonic() + self.max_wait_s
      while rows < self.max_batch_size:
        if self._queue.empty():
          remaining = deadline - time.monotonic()
          if remaining <= 0:
            break
          try:
            item = await asyncio.wait_for(self._queue.get(), remaining)
          except asyncio.TimeoutError:
            break
        else:
          item = self._queue.get_nowait()
        items.append(item)
        rows += len(item[0])
      await self._answer(loop, items, rows)

  async def _answer(self, loop, items, rows: int) -> None:
    model = self.store.current  # each batch uses the version current when it starts
    texts_a = [t for item in items for t in item[0]]
    texts_b = [t for item in items for t in item[1]]
    try:
      probabilities, truncated = await loop.run_in_executor(
          self._executor, run_rows, model, texts_a, texts_b, self.max_batch_size)
    except Exception as e:  # pylint: disable=broad-except
      log.exception("a batch of %d rows failed", rows)
      for *_, future in items:
        if not future.done():
          future.set_exception(e)
      return
    self.stats["batches"] += 1
    self.stats["rows"] += rows
    self.stats["largest_batch"] = max(self.stats["largest_batch"], rows)
    start = 0
    for a, _, future in items:
      end = start + len(a)
      if not future.done():  # the client may have gone
        future.set_result(Result(probabilities[start:end], truncated[start:end], model))
      start = end

  async def close(self) -> None:
    if self._task is not None:
      self._task.cancel()
      try:
        await self._task
      except (asyncio.CancelledError, Exception):  # pylint: disable=broad-except
        pass
    self._executor.shutdown(wait=False)
