"""Length bucketing: bucket choice, exact coverage and resumption of grouped batches,
and a BERT's loss, logits and gradients on a bucketed batch equal the padded ones."""

from __future__ import annotations

import importlib
import json

import jax
import numpy as np
import pytest

from etjax import algorithms, data as etdata, models
from etjax.data import bucketing

# etjax.algorithms re-exports a function named `finetune`, hiding the module.
finetune_lib = importlib.import_module('etjax.algorithms.finetune')

FULL = 32


def _data(n=40, seed=0, full=FULL, vocab=50):
  """Rows of random lengths in [3, full]; input_ids[i, 0] == i + 100 identifies row i."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(3, full + 1, n)
  lengths[0] = full  # some row always needs the top bucket
  mask = (np.arange(full)[None] < lengths[:, None]).astype(np.int32)
  ids = rng.integers(1, vocab, (n, full)).astype(np.int32) * mask
  ids[:, 0] = np.arange(n) + 100
  return {'input_ids': ids, 'attention_mask': mask,
          'token_type_ids': np.zeros((n, full), np.int32),
          'labels': (np.arange(n) % 3).astype(np.int32),
          'domain': np.zeros(n, np.int32), 'weight': np.ones(n, np.float32)}, lengths


def test_bucket_lengths_and_validation():
  assert bucketing.bucket_lengths(128, 4) == (32, 64, 96, 128)
  assert bucketing.bucket_lengths(48, 3) == (16, 32, 48)
  assert bucketing.bucket_lengths(50, 4) == (16, 32, 40, 50)
  assert bucketing.bucket_lengths(10, 1) == (10,)
  assert bucketing.check_buckets([16, 8], 32) == (8, 16, 32)
  with pytest.raises(ValueError, match=r'must lie in \[1, 32\]'):
    bucketing.check_buckets([64], 32)
  with pytest.raises(ValueError, match='num_buckets >= 1'):
    bucketing.bucket_lengths(32, 0)
  data, lengths = _data()
  # Brute force: one past the last nonzero mask entry.
  brute = [max(j for j in range(FULL) if data['attention_mask'][i, j]) + 1
           for i in range(len(lengths))]
  np.testing.assert_array_equal(bucketing.row_lengths(data), brute)
  assert [bucketing.bucket_for(m, (8, 16, 32)) for m in (1, 8, 9, 16, 17, 32)] == \
      [8, 8, 16, 16, 32, 32]


@pytest.mark.parametrize('group', [1, 4])
def test_bucketed_batches_cover_each_epoch_once_with_minimal_width(group):
  data, lengths = _data(n=48)
  buckets = (8, 16, 24, 32)
  it = etdata.train_iterator(data, 4, seed=3, process_index=0, process_count=1,
                             num_epochs=2, buckets=buckets, group_batches=group)
  batches = list(it)
  assert len(batches) == 24
  for epoch in (batches[:12], batches[12:]):
    rows = sorted(r - 100 for b in epoch for r in b['input_ids'][:, 0])
    assert rows == list(range(48))
  for b in batches:
    rows = b['input_ids'][:, 0] - 100
    width = b['input_ids'].shape[1]
    assert width == min(x for x in buckets if x >= lengths[rows].max())
    for key in ('input_ids', 'attention_mask', 'token_type_ids'):
      np.testing.assert_array_equal(b[key], data[key][rows, :width])
    assert (data['attention_mask'][rows, width:] == 0).all()  # only padding was cut
  if group > 1:  # grouping makes batches narrower than random batches on average
    plain = list(etdata.train_iterator(data, 4, seed=3, process_index=0, process_count=1,
                                       num_epochs=2, buckets=buckets))
    assert (np.mean([b['input_ids'].shape[1] for b in batches]) <
            np.mean([b['input_ids'].shape[1] for b in plain]))


def test_grouped_iterator_resumes_exactly_mid_window_and_shards_by_process():
  data, _ = _data(n=48)
  kw = dict(seed=5, buckets=(8, 16, 32), group_batches=3)
  it = etdata.train_iterator(data, 4, process_index=0, process_count=1, **kw)
  for _ in range(7):  # 7 = two windows of 3, then one batch into the third
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  assert state['offset'] == 1 and state['window'] == 2
  expected = [next(it) for _ in range(8)]
  resumed = etdata.train_iterator(data, 4, process_index=0, process_count=1, **kw)
  resumed.set_state(state)
  for a, b in zip(expected, [next(resumed) for _ in range(8)]):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  # Two processes' halves side by side are the single process's batch, same width.
  halves = [etdata.train_iterator(data, 4, process_index=p, process_count=2, **kw)
            for p in range(2)]
  single = etdata.train_iterator(data, 4, process_index=0, process_count=1, **kw)
  for _ in range(6):
    whole, a, b = next(single), next(halves[0]), next(halves[1])
    for k in whole:
      np.testing.assert_array_equal(whole[k], np.concatenate([a[k], b[k]]))
  other = etdata.train_iterator(data, 4, process_index=0, process_count=1, seed=5)
  with pytest.raises(ValueError, match='expected keys'):
    other.set_state(state)


def test_sorted_bucketed_eval_covers_everything_once():
  data, lengths = _data(n=21)
  batches = list(etdata.eval_batches(data, 4, process_index=0, process_count=1,
                                     include_index=True, buckets=(8, 16, 32),
                                     sort_by_length=True))
  assert len(batches) == 6
  index = np.concatenate([b['index'] for b in batches])
  assert sorted(index[index >= 0].tolist()) == list(range(21))
  assert (index[21:] == -1).all()
  widths = [b['input_ids'].shape[1] for b in batches]
  assert widths == sorted(widths) and widths[0] < FULL
  for b in batches:
    real = b['index'] >= 0
    np.testing.assert_array_equal(b['weight'] > 0, real)
    assert b['input_ids'].shape[1] >= lengths[b['index'][real]].max()


def test_bert_loss_logits_and_gradients_equal_on_bucketed_and_padded_batches():
  config = models.get_config('bert-tiny', vocab_size=64, hidden_size=32, num_layers=2,
                             num_heads=4, intermediate_size=64, max_position_embeddings=FULL)
  model = models.SequenceClassifier(models.module_for(config), num_labels=3)
  data, lengths = _data(n=8, vocab=64)
  data['input_ids'][:, 0] = 2  # token ids must stay inside the vocabulary
  data['attention_mask'][0, 10:] = 0  # the longest row now has 10 tokens
  data['input_ids'][0, 10:] = 0
  data['attention_mask'][1:, 10:] = 0
  data['input_ids'][1:, 10:] = 0
  batch = {k: data[k] for k in ('input_ids', 'attention_mask', 'token_type_ids',
                                'labels', 'weight')}
  width = bucketing.bucket_for(int(bucketing.row_lengths(data).max()), (8, 16, FULL))
  assert width == 16
  short = bucketing.trim(batch, width, FULL)
  assert short['input_ids'].shape == (8, 16) and short['labels'].shape == (8,)
  params = jax.jit(lambda b: finetune_lib.init_params(model, jax.random.key(0), b))(batch)
  loss_fn = finetune_lib.classifier_loss(model)

  @jax.jit
  def loss_and_grads(b):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, b, jax.random.key(1), True)
    return loss, aux['logits'], grads

  loss_full, logits_full, grads_full = loss_and_grads(batch)
  loss_short, logits_short, grads_short = loss_and_grads(short)
  np.testing.assert_allclose(loss_short, loss_full, rtol=1e-5)
  np.testing.assert_allclose(logits_short, logits_full, rtol=1e-5, atol=1e-6)
  flat_full = jax.tree.leaves(algorithms.unbox(grads_full))
  flat_short = jax.tree.leaves(algorithms.unbox(grads_short))
  # Position embeddings past the bucket get no gradient either way.
  for a, b in zip(flat_short, flat_full):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
