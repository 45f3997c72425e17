"""Prefetcher: order, exact positions, end, errors and shutdown (the Trainer's resume
with prefetch: tests/train/test_prefetch_resume.py)."""

from __future__ import annotations

import pytest

from etjax.data.prefetch import Prefetcher


class _Counter:
  """0, 1, 2, ... up to `stop` (exclusive); its state is the next number; raises at
  `fail`."""

  def __init__(self, stop=None, fail=None):
    self.i, self.stop, self.fail = 0, stop, fail

  def __next__(self):
    if self.i == self.fail:
      raise KeyError("bad row")
    if self.stop is not None and self.i >= self.stop:
      raise StopIteration
    self.i += 1
    return self.i - 1

  def get_state(self):
    return {"next": self.i}


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetcher_order_positions_end_and_errors(depth):
  source = _Counter(stop=6)
  batches = Prefetcher(source, lambda x: x * 10, depth)
  assert batches.get_state() == {"next": 0}
  got = []
  for value in batches:
    got.append(value)
    # The position is the one right after the item handed out, though the thread
    # may have pulled more from the source already.
    assert batches.get_state() == {"next": len(got)}
    if depth and len(got) == 2:
      assert source.i >= 2
  assert got == [0, 10, 20, 30, 40, 50]
  with pytest.raises(StopIteration):
    next(batches)
  failing = Prefetcher(_Counter(fail=2), depth=depth)
  assert [next(failing), next(failing)] == [0, 1]
  with pytest.raises(KeyError, match="bad row"):
    next(failing)
  endless = Prefetcher(_Counter(), depth=depth)
  next(endless)
  thread = endless._thread  # pylint: disable=protected-access
  endless.close()
  assert thread is None or not thread.is_alive()
  with pytest.raises(StopIteration):
    next(endless)
  with pytest.raises(ValueError, match="depth must be >= 0"):
    Prefetcher(_Counter(), depth=-1)
