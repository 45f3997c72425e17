"""Tests of etjax.data.synthetic: determinism, learnability and a real domain shift.

The learnability checks fit a bag-of-words logistic regression in numpy (full-batch
gradient descent), independent of etjax's models.
"""

from __future__ import annotations

import numpy as np
import pytest

from etjax.data import synthetic as syn


class _Bow:
  """Binary bag-of-words features over the words of the texts it was built on."""

  def __init__(self, texts):
    self.vocab = {}
    for t in texts:
      for w in t.split():
        self.vocab.setdefault(w, len(self.vocab))

  def matrix(self, texts):
    x = np.zeros((len(texts), len(self.vocab)))
    for i, t in enumerate(texts):
      x[i, [self.vocab[w] for w in t.split() if w in self.vocab]] = 1.0
    return x


def _fit(x, y, num_classes, iters=12, l2=1.0):
  """One-vs-rest L2 logistic regressions by Newton's method; returns weights [D+1, C].

  Newton converges in a dozen steps, far cheaper than gradient descent here.
  """
  x = np.concatenate([x, np.ones((len(x), 1))], axis=1)
  w = np.zeros((x.shape[1], num_classes))
  for c in range(num_classes):
    t = (y == c).astype(float)
    for _ in range(iters):
      p = 1.0 / (1.0 + np.exp(-x @ w[:, c]))
      grad = x.T @ (p - t) + l2 * w[:, c]
      hess = (x * (p * (1 - p))[:, None]).T @ x + l2 * np.eye(x.shape[1])
      w[:, c] -= np.linalg.solve(hess, grad)
  return w


def _accuracy(w, x, y):
  x = np.concatenate([x, np.ones((len(x), 1))], axis=1)
  return float(((x @ w).argmax(1) == y).mean())


def _labels(examples):
  return np.array([e.label for e in examples])


def test_same_seed_same_data_other_seed_differs():
  a = syn.multi_domain_splits({'books': (20, 5, 5), 'kitchen': (3, 2, 2)}, seed=4)
  b = syn.multi_domain_splits({'books': (20, 5, 5), 'kitchen': (3, 2, 2)}, seed=4)
  c = syn.multi_domain_splits({'books': (20, 5, 5), 'kitchen': (3, 2, 2)}, seed=5)
  assert a == b and a['books']['train'] != c['books']['train']
  assert a['books']['train'] != a['books']['test']
  # Each (domain, split) has its own stream: other sizes leave it unchanged.
  d = syn.multi_domain_splits({'books': (20, 50, 5)}, seed=4)
  assert d['books']['train'] == a['books']['train']
  for gen in (syn.generate_paraphrase_pairs, syn.generate_nli):
    assert gen('dvd', 8, seed=1) == gen('dvd', 8, seed=1) != gen('dvd', 8, seed=2)


def test_examples_are_well_formed():
  data = syn.source_target_splits('books', ('electronics',), source_sizes=(300, 10, 10),
                                  target_sizes=(20, 10, 10), seed=0)
  assert set(data) == {'books', 'electronics'}
  assert [len(data['electronics'][s]) for s in syn.SPLITS] == [20, 10, 10]
  train = data['books']['train']
  assert {e.domain for e in train} == {syn.DOMAINS.index('books')}
  assert all(e.text_b is None and syn.SENTIMENT_LABELS[e.label] == e.label_str
             for e in train)
  assert 0.4 < _labels(train).mean() < 0.6
  assert all(w.isalpha() or w == '.' for e in train for w in e.text_a.split())
  pairs = syn.generate_paraphrase_pairs('dvd', 200, seed=0)
  assert all(e.text_b and syn.PARAPHRASE_LABELS[e.label] == e.label_str for e in pairs)
  assert 0.4 < _labels(pairs).mean() < 0.6


def test_flip_cues_and_groups_define_the_shift():
  assert syn.cue_polarity('unpredictable', 'books') == 1
  assert syn.cue_polarity('unpredictable', 'electronics') == -1
  assert syn.cue_polarity('heavy', 'kitchen') == 1
  assert syn.cue_polarity('heavy', 'books') == 0
  assert syn.cue_polarity('gripping', 'dvd') == 1  # media group cue
  assert syn.cue_polarity('gripping', 'kitchen') == 0
  assert syn.cue_polarity('laggy', 'electronics') == -1
  assert syn.cue_polarity('excellent', 'kitchen') == 1
  with pytest.raises(ValueError, match='unknown synthetic domain'):
    syn.cue_polarity('good', 'toys')
  # Positive kitchen reviews use 'heavy' as a cue; books use it in both classes.
  kitchen = syn.generate_reviews('kitchen', 600, seed=0, label_noise=0.0)
  with_heavy = [e.label for e in kitchen if ' heavy' in e.text_a and ' not ' not in
                e.text_a]
  assert np.mean(with_heavy) > 0.7


def test_bag_of_words_learns_in_domain_and_suffers_from_shift():
  data = syn.multi_domain_splits(
      {'books': (1200, 0, 600), 'dvd': (0, 0, 600), 'electronics': (0, 0, 600)},
      seed=0, label_noise=0.05)
  bow = _Bow([e.text_a for e in data['books']['train']])
  x = bow.matrix([e.text_a for e in data['books']['train']])
  model = _fit(x, _labels(data['books']['train']), 2)
  acc = {}
  for domain in ('books', 'dvd', 'electronics'):
    test = data[domain]['test']
    acc[domain] = _accuracy(model, bow.matrix([e.text_a for e in test]),
                            _labels(test))
  # Learnable but not trivial in domain; clearly worse on shifted targets, and worse
  # on the other group (electronics) than on the related domain (dvd).
  assert 0.75 < acc['books'] < 0.97, acc
  assert acc['books'] - acc['electronics'] > 0.08, acc
  assert acc['dvd'] - acc['electronics'] > 0.03, acc
  assert acc['electronics'] > 0.55, acc  # shared cues still transfer


def test_label_noise_rate():
  clean = syn.generate_reviews('dvd', 2000, seed=3, label_noise=0.0)
  noisy = syn.generate_reviews('dvd', 2000, seed=3, label_noise=0.2)
  # Same texts (the noise draw comes after the text), labels flipped at the rate.
  assert [e.text_a for e in clean] == [e.text_a for e in noisy]
  rate = np.mean(_labels(clean) != _labels(noisy))
  assert abs(rate - 0.2) < 0.03
  assert all(e.label_str == syn.SENTIMENT_LABELS[e.label] for e in noisy)
  with pytest.raises(ValueError, match=r'label_noise must be in \[0, 1\)'):
    syn.generate_reviews('dvd', 2, seed=0, label_noise=1.0)


def _pair_features(bow, sentiment, examples):
  """[words in both texts, sentiment agreement]: what the pair labels depend on.

  `sentiment` is a single-text sentiment regression trained on reviews, so the pair
  model can compare opinions worded differently.
  """
  a = bow.matrix([e.text_a for e in examples])
  b = bow.matrix([e.text_b for e in examples])
  ones = np.ones((len(examples), 1))
  s_a = np.concatenate([a, ones], 1) @ sentiment[:, 1:] - np.concatenate(
      [a, ones], 1) @ sentiment[:, :1]
  s_b = np.concatenate([b, ones], 1) @ sentiment[:, 1:] - np.concatenate(
      [b, ones], 1) @ sentiment[:, :1]
  return np.concatenate([a * b, np.tanh(s_a) * np.tanh(s_b), s_a, s_b], axis=1)


@pytest.mark.parametrize('task', ['paraphrase', 'nli3', 'nli2'])
def test_pair_tasks_are_learnable(task):
  domains = ('books', 'kitchen')
  if task == 'paraphrase':
    data = syn.multi_domain_splits({d: (400, 0, 250) for d in domains}, seed=0,
                                   task='paraphrase')
    train = [e for d in domains for e in data[d]['train']]
    test = [e for d in domains for e in data[d]['test']]
    num_classes = 2
  else:
    splits = syn.cross_task_splits((800, 0, 500), (800, 0, 500), seed=0,
                                   domains3=domains, domains2=domains)[task]
    train, test = splits['train'], splits['test']
    num_classes = 3 if task == 'nli3' else 2
  reviews = [e for d in domains for e in syn.generate_reviews(d, 400, seed=9)]
  bow = _Bow([e.text_a for e in reviews + train] + [e.text_b for e in train])
  sentiment = _fit(bow.matrix([e.text_a for e in reviews]), _labels(reviews), 2)
  model = _fit(_pair_features(bow, sentiment, train), _labels(train), num_classes)
  acc = _accuracy(model, _pair_features(bow, sentiment, test), _labels(test))
  majority = np.bincount(_labels(test)).max() / len(test)
  assert acc > majority + 0.15, (acc, majority)


def test_cross_task_label_sets():
  data = syn.cross_task_splits((30, 6, 9), (10, 4, 5), seed=0, domains2=('dvd',))
  assert [len(data['nli3'][s]) for s in syn.SPLITS] == [30, 6, 9]
  assert {e.label_str for e in data['nli3']['train']} == set(syn.NLI3_LABELS)
  assert {e.label_str for e in data['nli2']['train']} <= set(syn.NLI2_LABELS)
  assert {e.domain for e in data['nli2']['test']} == {syn.DOMAINS.index('dvd')}
  entail = [e for e in syn.generate_nli('kitchen', 60, seed=2) if e.label == 0]
  # An entailed claim names the premise's product.
  assert all(e.text_b.split()[1] in e.text_a.split() for e in entail)


def test_sentiment3_is_deterministic_balanced_and_well_formed():
  a = syn.generate_sentiment3('books', 900, seed=1)
  assert a == syn.generate_sentiment3('books', 900, seed=1)
  assert a != syn.generate_sentiment3('books', 900, seed=2)
  assert a != syn.generate_sentiment3('books', 900, seed=1, split='test')
  counts = np.bincount(_labels(a), minlength=3)
  assert np.all(np.abs(counts / 900 - 1 / 3) < 0.05), counts
  assert all(syn.SENTIMENT3_LABELS[e.label] == e.label_str and e.text_b is None
             and e.domain == 0 for e in a)
  # Without mixing, a clean neutral review holds no cue of the domain.
  plain = syn.generate_sentiment3('dvd', 200, seed=0, label_noise=0.0, mixed_rate=0.0)
  neutral = [e for e in plain if e.label == 1]
  assert neutral and all(syn.cue_polarity(w, 'dvd') == 0 for e in neutral
                         for w in e.text_a.split())
  with pytest.raises(ValueError, match=r'mixed_rate must be in \[0, 1\]'):
    syn.generate_sentiment3('dvd', 2, seed=0, mixed_rate=1.5)


def test_sentiment_transfer_pair_is_learnable_and_related():
  data = syn.sentiment_transfer_splits((900, 6, 600), (600, 4, 600), seed=0)
  source, target = data['sentiment3'], data['polarity']
  assert [len(source[s]) for s in syn.SPLITS] == [900, 6, 600]
  assert {e.label_str for e in source['train']} == set(syn.SENTIMENT3_LABELS)
  assert {e.label_str for e in target['train']} == set(syn.SENTIMENT_LABELS)
  assert {e.domain for e in source['test']} == {0, 1}  # books, dvd
  assert {e.domain for e in target['test']} == {2, 3}  # electronics, kitchen
  bow = _Bow([e.text_a for e in source['train'] + target['train']])
  model = _fit(bow.matrix([e.text_a for e in source['train']]), _labels(source['train']),
               3)
  x_test = bow.matrix([e.text_a for e in source['test']])
  # Measured: 0.70 on 3 balanced classes.
  assert _accuracy(model, x_test, _labels(source['test'])) > 0.6
  # The 3-way model's positive-vs-negative scores already classify the other domains'
  # polarity (measured 0.70): the source classes relate to the target's.
  x = bow.matrix([e.text_a for e in target['test']])
  scores = np.concatenate([x, np.ones((len(x), 1))], axis=1) @ model
  transfer = np.mean((scores[:, 2] > scores[:, 0]) == _labels(target['test']))
  assert transfer > 0.62, transfer
  # The target task alone is learnable too (measured 0.79 from 600 reviews).
  own = _fit(bow.matrix([e.text_a for e in target['train']]), _labels(target['train']), 2)
  assert _accuracy(own, x, _labels(target['test'])) > 0.7


def test_flip_labels_marks_what_it_changed():
  examples = syn.generate_reviews('books', 100, seed=0)
  flipped, mask = syn.flip_labels(examples, 0.5, seed=1)
  assert mask.sum() == 50
  changed = np.array([a.label != b.label for a, b in zip(examples, flipped)])
  np.testing.assert_array_equal(changed, mask)
  assert all(e.label_str == syn.SENTIMENT_LABELS[e.label] for e in flipped)
