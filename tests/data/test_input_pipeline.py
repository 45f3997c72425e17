"""Tests of etjax.data.pipeline: encoding, shuffling, sharding, resumable iteration, eval."""

from __future__ import annotations

import json

import numpy as np
import pytest

from etjax import data as etdata


def _arrays(n, length=4):
  """Encoded data whose row i is recognisable: input_ids[i] == i."""
  return {
      'input_ids': np.repeat(np.arange(n, dtype=np.int32)[:, None], length, 1),
      'attention_mask': np.ones((n, length), np.int32),
      'token_type_ids': np.zeros((n, length), np.int32),
      'labels': (np.arange(n) % 2).astype(np.int32),
      'domain': (np.arange(n) % 3).astype(np.int32),
      'weight': np.ones(n, np.float32),
  }


def _rows(batch):
  return batch['input_ids'][:, 0].tolist()


def test_encode_examples_once_matches_tokenizer():
  examples = etdata.synthetic.generate_reviews('kitchen', 30, seed=1)
  tok = etdata.build_wordpiece_tokenizer([e.text_a for e in examples], 300)
  data = etdata.encode_examples(examples, tok, max_length=24)
  direct = tok.encode([e.text_a for e in examples], max_length=24)
  for key in ('input_ids', 'attention_mask', 'token_type_ids'):
    assert data[key].dtype == np.int32 and data[key].shape == (30, 24)
    np.testing.assert_array_equal(data[key], direct[key])
  np.testing.assert_array_equal(data['labels'], [e.label for e in examples])
  assert data['domain'].dtype == np.int32 and set(data['domain']) == {3}
  assert data['weight'].dtype == np.float32 and (data['weight'] == 1).all()
  pairs = etdata.synthetic.generate_paraphrase_pairs('kitchen', 5, seed=1)
  pair_data = etdata.encode_examples(pairs, tok, max_length=40)
  assert pair_data['token_type_ids'].max() == 1
  with pytest.raises(ValueError, match='example 5 is a pair but example 0 is single'):
    etdata.encode_examples(examples[:5] + pairs[:1], tok, max_length=8)


def test_shuffle_is_deterministic_per_seed_and_per_epoch():
  data = _arrays(12)
  first = [_rows(b) for b in etdata.train_iterator(data, 4, seed=7, process_index=0,
                                                   process_count=1, num_epochs=2)]
  again = [_rows(b) for b in etdata.train_iterator(data, 4, seed=7, process_index=0,
                                                   process_count=1, num_epochs=2)]
  other = [_rows(b) for b in etdata.train_iterator(data, 4, seed=8, process_index=0,
                                                   process_count=1, num_epochs=2)]
  assert first == again and first != other and len(first) == 6
  epoch1, epoch2 = sum(first[:3], []), sum(first[3:], [])
  assert sorted(epoch1) == sorted(epoch2) == list(range(12))
  assert epoch1 != epoch2 and epoch1 != list(range(12))
  plain = etdata.train_iterator(data, 4, seed=0, process_index=0, process_count=1,
                                shuffle=False)
  assert [_rows(next(plain)) for _ in range(4)] == [[0, 1, 2, 3], [4, 5, 6, 7],
                                                    [8, 9, 10, 11], [0, 1, 2, 3]]


def test_batch_dict_and_index():
  it = etdata.train_iterator(_arrays(10, length=6), 4, seed=0, process_index=0,
                             process_count=1, include_index=True)
  batch = next(it)
  assert set(batch) == set(etdata.BATCH_KEYS) | {'index'}
  assert batch['input_ids'].shape == (4, 6) and batch['input_ids'].dtype == np.int32
  assert batch['labels'].shape == (4,) and batch['weight'].dtype == np.float32
  np.testing.assert_array_equal(batch['index'], _rows(batch))
  np.testing.assert_array_equal(batch['domain'], batch['index'] % 3)


def test_process_shards_are_disjoint_parts_of_the_global_batch():
  data = _arrays(24)
  whole = etdata.train_iterator(data, 8, seed=3, process_index=0, process_count=1)
  parts = [etdata.train_iterator(data, 8, seed=3, process_index=p, process_count=4)
           for p in range(4)]
  for _ in range(6):  # two epochs
    shards = [_rows(next(it)) for it in parts]
    assert all(len(s) == 2 for s in shards)
    assert len(set(sum(shards, []))) == 8
    assert sum(shards, []) == _rows(next(whole))


@pytest.mark.parametrize('stop_after', [0, 2, 5, 7])
def test_saved_position_resumes_identically(stop_after):
  data = _arrays(10)
  kwargs = dict(seed=11, process_index=1, process_count=2)
  reference = etdata.train_iterator(data, 4, **kwargs)
  expected = [next(reference) for _ in range(stop_after + 6)]
  interrupted = etdata.train_iterator(data, 4, **kwargs)
  for _ in range(stop_after):
    next(interrupted)
  saved = json.loads(json.dumps(interrupted.get_state()))
  resumed = etdata.train_iterator(data, 4, **kwargs)
  resumed.set_state(saved)
  for want in expected[stop_after:]:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_state_of_another_pipeline_is_refused():
  state = etdata.train_iterator(_arrays(10), 4, seed=1, process_index=0,
                                process_count=1).get_state()
  other = etdata.train_iterator(_arrays(10), 4, seed=2, process_index=0,
                                process_count=1)
  with pytest.raises(ValueError, match=r"differ in \{'seed': \(1, 2\)\}"):
    other.set_state(state)
  with pytest.raises(ValueError, match='not a TrainIterator state'):
    other.set_state({'next_index': 3})


def test_eval_batches_pad_last_batch_with_zero_weight():
  data = _arrays(10)
  data['weight'][:] = 2.0
  batches = etdata.eval_batches(data, 4, process_index=0, process_count=1,
                                include_index=True)
  assert len(batches) == 3
  out = list(batches)
  assert list(batches)[2]['index'].tolist() == out[2]['index'].tolist()  # re-iterable
  assert all(b['input_ids'].shape == (4, 4) for b in out)
  index = np.concatenate([b['index'] for b in out])
  weight = np.concatenate([b['weight'] for b in out])
  np.testing.assert_array_equal(index, list(range(10)) + [-1, -1])
  np.testing.assert_array_equal(weight, [2.0] * 10 + [0.0, 0.0])
  # Fillers are copies of a real row (finite through any model), not zeros.
  np.testing.assert_array_equal(out[2]['input_ids'][2:], data['input_ids'][[9, 9]])
  np.testing.assert_array_equal(np.concatenate([b['labels'] for b in out])[:10],
                                data['labels'])


def test_eval_batches_sharded_cover_everything_once():
  data = _arrays(11)
  shards = [list(etdata.eval_batches(data, 4, process_index=p, process_count=2,
                                     include_index=True)) for p in range(2)]
  assert len(shards[0]) == len(shards[1]) == 3
  real = [i for s in shards for b in s for i in b['index'].tolist() if i >= 0]
  assert sorted(real) == list(range(11))
  for s in shards:
    for b in s:
      assert b['input_ids'].shape == (2, 4)
      np.testing.assert_array_equal(b['weight'] > 0, b['index'] >= 0)


def test_take_concatenate_and_bad_inputs():
  data = _arrays(6)
  both = etdata.concatenate([etdata.take(data, [4, 5]), etdata.take(data, [0])])
  assert _rows(both) == [4, 5, 0] and etdata.num_examples(both) == 3
  with pytest.raises(ValueError, match='batch_size 6 must be a positive multiple of '
                     'process_count 4'):
    etdata.train_iterator(data, 6, seed=0, process_index=0, process_count=4)
  with pytest.raises(ValueError, match=r'process_index 2 is outside \[0, 2\)'):
    etdata.eval_batches(data, 4, process_index=2, process_count=2)
  with pytest.raises(ValueError, match=r'seed must be in \[0, 2\*\*32\)'):
    etdata.train_iterator(data, 2, seed=-1, process_index=0, process_count=1)
  with pytest.raises(ValueError, match='batch_size 8 exceeds the 6 examples'):
    etdata.train_iterator(data, 8, seed=0, process_index=0, process_count=1)
  bad = dict(data, labels=data['labels'][:5])
  with pytest.raises(ValueError, match="'input_ids' has 6 rows, labels has 5"):
    etdata.num_examples(bad)
  with pytest.raises(ValueError, match=r"lacks \['weight'\]"):
    etdata.num_examples({k: v for k, v in data.items() if k != 'weight'})
  with pytest.raises(ValueError, match="'labels' is int64, expected int32"):
    etdata.num_examples(dict(data, labels=data['labels'].astype(np.int64)))


def test_default_process_is_jax_process():
  it = etdata.train_iterator(_arrays(8), 8, seed=0)
  assert it.get_state()['config']['process_count'] == 1
  assert it.per_process_batch == 8
