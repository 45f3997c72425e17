"""Named streams as one batch pytree: deterministic per seed, positions resume exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from etjax.data.streams import ArrayStream, named_streams


def _data(n, offset=0):
  return {"x": np.arange(offset, offset + n, dtype=np.float32)[:, None] * np.ones((1, 2)),
          "labels": np.arange(n, dtype=np.int32) % 2}


def _take(it, k):
  return [next(it) for _ in range(k)]


def test_deterministic_per_seed_and_every_row_once_per_epoch():
  a = _take(named_streams({"source": _data(10), "dev": _data(6, 100)},
                          {"source": 4, "dev": 3}, seed=7), 5)
  b = _take(named_streams({"source": _data(10), "dev": _data(6, 100)},
                          {"source": 4, "dev": 3}, seed=7), 5)
  c = _take(named_streams({"source": _data(10), "dev": _data(6, 100)},
                          {"source": 4, "dev": 3}, seed=8), 5)
  for x, y in zip(a, b):
    assert set(x) == {"source", "dev"}
    np.testing.assert_array_equal(x["source"]["x"], y["source"]["x"])
  assert any(not np.array_equal(x["source"]["x"], z["source"]["x"]) for x, z in zip(a, c))
  # dev: 6 rows in batches of 3 -> each epoch (2 batches) sees every row once.
  epoch = np.concatenate([a[0]["dev"]["x"][:, 0], a[1]["dev"]["x"][:, 0]])
  assert sorted(epoch) == list(range(100, 106))
  # source: 10 rows in batches of 4 -> 2 per epoch, the 2-row tail skipped.
  assert len(set(np.concatenate([a[0]["source"]["x"][:, 0],
                                 a[1]["source"]["x"][:, 0]]))) == 8


def test_position_resumes_exactly_through_json():
  make = lambda: named_streams({"source": _data(10), "target": _data(8, 50)},
                               {"source": 4, "target": 2}, seed=1)
  straight = make()
  _take(straight, 3)
  state = json.loads(json.dumps(straight.get_state()))
  want = _take(straight, 6)
  resumed = make()
  resumed.set_state(state)
  for w, g in zip(want, _take(resumed, 6)):
    for name in w:
      np.testing.assert_array_equal(w[name]["x"], g[name]["x"])


def test_process_shares_make_the_global_batch():
  full = next(ArrayStream(_data(12), 6, seed=3))
  parts = [next(ArrayStream(_data(12), 6, seed=3, process_index=i, process_count=3))
           for i in range(3)]
  np.testing.assert_array_equal(np.concatenate([p["x"] for p in parts]), full["x"])


def test_bad_inputs_name_the_stream():
  with pytest.raises(ValueError, match=r"dev: batch_size must be in 1..6"):
    named_streams({"dev": _data(6)}, {"dev": 7}, seed=0)
  with pytest.raises(ValueError, match="batch_sizes names"):
    named_streams({"dev": _data(6)}, {"target": 2}, seed=0)
  with pytest.raises(ValueError, match=r"source: arrays must share"):
    ArrayStream({"x": np.zeros(3), "y": np.zeros(4)}, 1, seed=0, name="source")
  it = named_streams({"dev": _data(6)}, {"dev": 2}, seed=0)
  with pytest.raises(ValueError, match=r"streams \['target'\]; this iterator has "
                     r"\['dev'\]"):
    it.set_state({"target": {"epoch": 0, "index": 0}})
