"""Where training metrics go: a JSONL file, TensorBoard event files, a progress bar.

Only process 0 writes; other processes get no-op sinks, so multi-host runs log once.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
import time
from typing import Iterator, Mapping, Optional

import jax
import tqdm


def _jsonable(value) -> float | int | str | None:
  if isinstance(value, (int, str)):
    return value
  value = float(value)
  # JSON has no NaN/inf; keep them readable instead of writing invalid JSON.
  return value if math.isfinite(value) else str(value)


def _summary_writer_class():
  """tensorboardX.SummaryWriter, imported without dragging in torch.

  tensorboardX imports torch when it can (only to accept torch tensors), which costs
  seconds and breaks etjax's promise not to load torch. While torch is not loaded
  already, its import is made to fail for the duration.
  """
  if "torch" in sys.modules or "tensorboardX" in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    return SummaryWriter
  sys.modules["torch"] = None  # makes `import torch` raise ImportError
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules["torch"]
  return SummaryWriter


class MetricsWriter:
  """Appends metrics to `workdir/metrics.jsonl` and TensorBoard events in `workdir/tb`.

  Each JSONL line is {"step": int, "split": "train"|"eval"|..., "time": float, <name>:
  value, ...}; TensorBoard scalars are named '<split>/<name>'.
  """

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self.tb_dir = os.path.join(workdir, "tb")
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      if tensorboard:
        self._tb = _summary_writer_class()(self.tb_dir)

  def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
    """Records scalar `metrics` of `split` at `step`."""
    if not self.enabled:
      return
    record = {"step": int(step), "split": split, "time": time.time()}
    record.update({k: _jsonable(v) for k, v in metrics.items()})
    with open(self.jsonl_path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for name, value in metrics.items():
        if isinstance(value, (int, float)) or hasattr(value, "__float__"):
          self._tb.add_scalar(f"{split}/{name}", float(value), int(step))
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_jsonl(path: str) -> list[dict]:
  """All records of a metrics.jsonl file, in order."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def read_tensorboard_scalars(tb_dir: str) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value), ...]} from every event file in `tb_dir` (no TensorFlow
  needed: TFRecord framing parsed here, events through tensorboardX's protos)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  scalars: dict[str, list[tuple[int, float]]] = {}
  for name in sorted(os.listdir(tb_dir)):
    if "tfevents" not in name:
      continue
    for record in _tfrecords(os.path.join(tb_dir, name)):
      event = event_pb2.Event.FromString(record)
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def _tfrecords(path: str) -> Iterator[bytes]:
  # Each record: uint64 length, uint32 masked crc of length, data, uint32 crc of data.
  with open(path, "rb") as f:
    while header := f.read(12):
      if len(header) < 12:
        raise ValueError(f"{path}: truncated TFRecord header")
      (length,) = struct.unpack("<Q", header[:8])
      data = f.read(length)
      if len(data) < length or len(f.read(4)) < 4:
        raise ValueError(f"{path}: truncated TFRecord")
      yield data


class Progress:
  """A tqdm bar over steps showing the loss and examples/s (silent off process 0)."""

  def __init__(self, total: int, initial: int = 0, enabled: bool = True):
    self._bar: Optional[tqdm.tqdm] = None
    if enabled and jax.process_index() == 0:
      self._bar = tqdm.tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

  def update(self, steps: int, **postfix) -> None:
    if self._bar is not None:
      self._bar.update(steps)
      if postfix:
        self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v)
                               for k, v in postfix.items()}, refresh=False)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


class NonFiniteValue(Exception):
  """A non-finite loss seen by `ThroughputWindow.add` at `step`."""

  def __init__(self, step, loss):
    super().__init__(step, loss)
    self.step, self.loss = step, loss


class ThroughputWindow:
  """Host-side sums of update metrics between two log points, and the throughput."""

  def __init__(self):
    self.count, self.examples, self.sums = 0, 0, {}
    self.started = None
    self.excluded = 0.0  # seconds spent evaluating and saving, not training
    self.created = time.perf_counter()
    self.first_step_s = None  # compilation + the first update, written once

  def add(self, step: int, metrics, examples: int, bar: Progress) -> None:
    """Fetches one update's metrics; raises NonFiniteValue on a NaN/inf loss."""
    host = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if "loss" not in host:
      raise ValueError(f"TrainStep.update must return a 'loss' metric; got {sorted(host)}")
    if not math.isfinite(host["loss"]):
      raise NonFiniteValue(step, host["loss"])
    if self.started is None:
      # The first update includes compilation; throughput is timed from its end.
      self.started = time.perf_counter()
      self.first_step_s = self.started - self.created
    else:
      self.count += 1
      self.examples += examples
      for k, v in host.items():
        self.sums[k] = self.sums.get(k, 0.0) + v
    bar.update(1, loss=host["loss"])

  def means(self) -> dict:
    """{metric: mean over the window} ({} when empty)."""
    return {k: v / self.count for k, v in self.sums.items()} if self.count else {}

  def flush(self, writer: MetricsWriter, step: int, bar: Progress) -> dict:
    """Writes the window's means plus examples_per_s and steps_per_s (and, the first
    time, first_step_s: compilation plus one update) at `step`, starts a new window,
    and returns what it wrote."""
    result = self.means()
    if self.first_step_s is not None:
      result["first_step_s"] = self.first_step_s
    if self.count:
      elapsed = max(time.perf_counter() - self.started - self.excluded, 1e-9)
      result["examples_per_s"] = self.examples / elapsed
      result["steps_per_s"] = self.count / elapsed
      writer.write(step, "train", result)
      self.first_step_s = None
      bar.update(0, loss=result.get("loss", float("nan")),
                 ex_per_s=result["examples_per_s"])
    self.count, self.examples, self.sums = 0, 0, {}
    self.started, self.excluded = time.perf_counter(), 0.0
    return result
