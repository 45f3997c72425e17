"""Synthetic multi-domain text classification in English words, deterministic per seed.

Four product-review domains as in the paper's Amazon data: books, dvd, electronics,
kitchen. A review is a few clauses: neutral ones (what was bought, when, for whom,
about which part) and sentiment ones whose adjective (or phrase) is a cue of the
review's polarity. Cues come from four pools, which is what makes transfer help while
the domains still differ:

- shared: positive/negative everywhere ("excellent", "i returned it");
- group: shared by the two similar domains of a group, media (books, dvd) or goods
  (electronics, kitchen), so domain relationships exist to be learnt;
- domain: one domain's own cues ("gripping" for books, "laggy" for electronics);
- flip: words whose polarity depends on the domain ("unpredictable" is positive for a
  plot and negative for a gadget; "heavy" is good for a skillet and bad for a laptop);
  where a flip word is neutral it appears in neutral clauses of both classes.

Some sentiment clauses are negated ("the plot is not boring"), and reviews after the
first sentiment clause may add a clause of the other polarity, so a bag of words does
well but not perfectly; `label_noise` flips a fraction of labels on top.

Generators: `generate_reviews` (sentiment, 2 classes), `generate_sentiment3`
(negative / neutral / positive), `generate_paraphrase_pairs` (label 1 if both texts
give the same opinion of the same product; the paper's Table 8) and `generate_nli` (a
premise review and a one-clause claim: 3-way entailment / neutral / contradiction or
2-way entails / neutral, like MNLI and SciTail). `multi_domain_splits`,
`source_target_splits`, `cross_task_splits` (nli3 and nli2) and
`sentiment_transfer_splits` (3-way sentiment to 2-way polarity in other domains, a
cross-task pair that small encoders learn) return train/dev/test per domain or task. Every (task, domain,
split) draws from its own seed stream, so changing one size leaves the others' data
unchanged. Examples are `etjax.data.readers.Example`s with domain = DOMAINS index.
"""

from __future__ import annotations

import functools
import zlib
from typing import Callable, Mapping, Sequence

import numpy as np

from etjax.data.readers import Example

DOMAINS = ('books', 'dvd', 'electronics', 'kitchen')
GROUPS = {'books': 'media', 'dvd': 'media', 'electronics': 'goods', 'kitchen': 'goods'}
SENTIMENT_LABELS = ('negative', 'positive')
SENTIMENT3_LABELS = ('negative', 'neutral', 'positive')
PARAPHRASE_LABELS = ('different', 'paraphrase')
NLI3_LABELS = ('entailment', 'neutral', 'contradiction')
NLI2_LABELS = ('entails', 'neutral')

# Polarity pools: index 0 negative, 1 positive.
_SHARED_ADJ = (('terrible', 'awful', 'bad', 'poor', 'horrible', 'disappointing'),
               ('excellent', 'great', 'wonderful', 'perfect', 'amazing', 'fantastic'))
_SHARED_PHRASE = (('i returned it', 'a waste of money', 'i want my money back',
                   'avoid it'),
                  ('i love it', 'worth every penny', 'i would buy it again',
                   'highly recommended'))
_GROUP_ADJ = {
    'media': (('boring', 'predictable', 'forgettable', 'tedious'),
              ('gripping', 'moving', 'captivating', 'memorable')),
    'goods': (('flimsy', 'defective', 'broken', 'cheaply made'),
              ('durable', 'sturdy', 'solid', 'dependable')),
}
_DOMAIN_ADJ = {
    'books': (('shallow', 'wordy', 'clumsy', 'repetitive'),
              ('insightful', 'eloquent', 'thoughtful', 'inspiring')),
    'dvd': (('overacted', 'grainy', 'choppy', 'cheesy'),
            ('hilarious', 'stunning', 'suspenseful', 'charming')),
    'electronics': (('laggy', 'glitchy', 'buggy', 'dim'),
                    ('fast', 'crisp', 'responsive', 'intuitive')),
    'kitchen': (('rusty', 'leaky', 'warped', 'greasy'),
                ('nonstick', 'roomy', 'effortless', 'versatile')),
}
# Polarity of each flip word per domain (books, dvd, electronics, kitchen).
FLIP_CUES = {
    'unpredictable': (1, 1, -1, -1),
    'dark': (1, 1, -1, 0),
    'simple': (-1, -1, 1, 1),
    'long': (0, -1, 1, 0),
    'heavy': (0, 0, -1, 1),
    'light': (1, 0, 1, -1),
    'quiet': (0, -1, 1, 1),
    'hot': (0, 0, -1, 1),
}
_PRODUCTS = {
    'books': ('novel', 'biography', 'cookbook', 'memoir', 'textbook', 'anthology'),
    'dvd': ('movie', 'documentary', 'series', 'comedy', 'cartoon', 'concert'),
    'electronics': ('headphones', 'charger', 'laptop', 'camera', 'speaker', 'router'),
    'kitchen': ('blender', 'skillet', 'kettle', 'toaster', 'knife', 'mixer'),
}
_ASPECTS = {
    'books': ('plot', 'author', 'ending', 'characters', 'prose', 'chapters'),
    'dvd': ('acting', 'director', 'soundtrack', 'picture', 'cast', 'script'),
    'electronics': ('battery', 'screen', 'sound', 'cable', 'buttons', 'software'),
    'kitchen': ('handle', 'blade', 'lid', 'motor', 'surface', 'bowl'),
}
_PLURAL = frozenset({'characters', 'chapters', 'buttons', 'headphones'})
_WHEN = ('last week', 'last month', 'as a gift', 'on sale', 'for a trip', 'yesterday')
_PEOPLE = ('sister', 'friend', 'husband', 'wife', 'son', 'daughter', 'mother',
           'father', 'neighbor', 'roommate')
_COLORS = ('red', 'blue', 'green', 'black', 'white', 'brown')
_INTENSIFIERS = ('', '', '', 'very ', 'really ', 'quite ', 'so ')


def _check_domain(domain: str) -> int:
  if domain not in DOMAINS:
    raise ValueError(f'unknown synthetic domain {domain!r}; expected one of {DOMAINS}')
  return DOMAINS.index(domain)


def cue_polarity(word: str, domain: str) -> int:
  """Returns the ground-truth polarity (+1, 0, -1) of a cue word in a domain.

  0 for words that are no cue there (neutral words, other domains' own cues).
  """
  d = _check_domain(domain)
  if word in FLIP_CUES:
    return FLIP_CUES[word][d]
  pools = [_SHARED_ADJ, _GROUP_ADJ[GROUPS[domain]], _DOMAIN_ADJ[domain]]
  for pool in pools:
    for polarity, words in zip((-1, 1), pool):
      if word in words:
        return polarity
  return 0


def _rng(seed: int, *names: str) -> np.random.Generator:
  # crc32, unlike hash(), is the same in every Python process.
  return np.random.default_rng([seed] + [zlib.crc32(n.encode()) for n in names])


def _pick(rng: np.random.Generator, items: Sequence[str]) -> str:
  return items[int(rng.integers(len(items)))]


def _cue(rng: np.random.Generator, domain: str, polarity: int) -> str:
  """Samples a sentiment adjective of `polarity` (+1/-1) from the domain's pools."""
  k = int(polarity > 0)
  source = rng.choice(4, p=(0.35, 0.2, 0.3, 0.15))
  if source == 3:
    d = DOMAINS.index(domain)
    flips = [w for w, pol in FLIP_CUES.items() if pol[d] == polarity]
    if flips:
      return _pick(rng, flips)
    source = 2
  pool = (_SHARED_ADJ, _GROUP_ADJ[GROUPS[domain]], _DOMAIN_ADJ[domain])[source]
  return _pick(rng, pool[k])


def _sentiment_clause(rng: np.random.Generator, domain: str, product: str,
                      polarity: int, negation_rate: float) -> str:
  if rng.random() < 0.2:
    return _pick(rng, _SHARED_PHRASE[int(polarity > 0)])
  negate = rng.random() < negation_rate
  adj = _cue(rng, domain, -polarity if negate else polarity)
  adj = ('not ' if negate else _pick(rng, _INTENSIFIERS)) + adj
  noun = product if rng.random() < 0.3 else _pick(rng, _ASPECTS[domain])
  subject = _this(noun) if noun == product else f'the {noun}'
  verb = _be(noun)
  return _pick(rng, (f'{subject} {verb} {adj}', f'i found {subject} {adj}',
                     f'{subject} {verb} {adj} overall'))


def _be(noun: str) -> str:
  return 'are' if noun in _PLURAL else 'is'


def _this(noun: str) -> str:
  return f'these {noun}' if noun in _PLURAL else f'this {noun}'


def _neutral_clause(rng: np.random.Generator, domain: str, product: str) -> str:
  d = DOMAINS.index(domain)
  neutral_flips = [w for w, pol in FLIP_CUES.items() if pol[d] == 0]
  aspect = _pick(rng, _ASPECTS[domain])
  options = [
      f'i bought {_this(product)} {_pick(rng, _WHEN)}',
      f'my {_pick(rng, _PEOPLE)} uses the {product} every week',
      f'it came in a {_pick(rng, _COLORS)} box',
      f'the {aspect} {_be(aspect)} {_pick(rng, _COLORS)}',
      f'this is my {_pick(rng, ("first", "second", "third"))} {product}',
  ]
  if neutral_flips:
    options.append(f'the {aspect} {_be(aspect)} {_pick(rng, neutral_flips)}')
  return _pick(rng, options)


def _review(rng: np.random.Generator, domain: str, product: str, polarity: int, *,
            max_sentiment: int = 3, max_neutral: int = 3, mixed_rate: float = 0.25,
            negation_rate: float = 0.15) -> str:
  """Returns one review text: a product mention, neutral and sentiment clauses."""
  n_sent = int(rng.integers(1, max_sentiment + 1))
  polarities = [polarity] + [(-polarity if rng.random() < mixed_rate else polarity)
                             for _ in range(n_sent - 1)]
  clauses = [_sentiment_clause(rng, domain, product, p, negation_rate)
             for p in polarities]
  clauses += [_neutral_clause(rng, domain, product)
              for _ in range(int(rng.integers(0, max_neutral + 1)))]
  return _join(rng, product, clauses)


def _join(rng: np.random.Generator, product: str, clauses: Sequence[str]) -> str:
  """The clauses in random order after a first clause naming the product."""
  order = rng.permutation(len(clauses))
  # Always name the product first, so pair tasks can match it.
  head = f'i bought {_this(product)} {_pick(rng, _WHEN)}'
  return ' . '.join([head] + [clauses[i] for i in order]) + ' .'


def _neutral_review(rng: np.random.Generator, domain: str, product: str,
                    mixed_rate: float) -> str:
  """A review with no overall opinion: 1-3 neutral clauses, and with probability
  `mixed_rate` one positive and one negative sentiment clause that cancel out."""
  clauses = [_neutral_clause(rng, domain, product)
             for _ in range(int(rng.integers(1, 4)))]
  if rng.random() < mixed_rate:
    clauses += [_sentiment_clause(rng, domain, product, p, 0.15) for p in (1, -1)]
  return _join(rng, product, clauses)


def _noisy(rng: np.random.Generator, label: int, num_classes: int, noise: float) -> int:
  # Both draws happen at every noise level, so the texts do not depend on it.
  flip, shift = rng.random() < noise, int(rng.integers(1, num_classes))
  return (label + shift) % num_classes if flip else label


def _check_common(n: int, label_noise: float):
  if n < 0:
    raise ValueError(f'number of examples must be >= 0, got {n}')
  if not 0.0 <= label_noise < 1.0:
    raise ValueError(f'label_noise must be in [0, 1), got {label_noise}')


def generate_reviews(domain: str, n: int, *, seed: int, label_noise: float = 0.05,
                     split: str = 'train') -> list[Example]:
  """Returns n single-text sentiment examples of one domain, classes balanced in law.

  Labels index SENTIMENT_LABELS (0 negative, 1 positive); label_noise of them are
  flipped. `split` only selects an independent seed stream.
  """
  d = _check_domain(domain)
  _check_common(n, label_noise)
  rng = _rng(seed, 'reviews', domain, split)
  out = []
  for _ in range(n):
    label = int(rng.integers(2))
    text = _review(rng, domain, _pick(rng, _PRODUCTS[domain]), 1 if label else -1)
    label = _noisy(rng, label, 2, label_noise)
    out.append(Example(text, None, label, d, SENTIMENT_LABELS[label]))
  return out


def generate_sentiment3(domain: str, n: int, *, seed: int, label_noise: float = 0.05,
                        mixed_rate: float = 0.3, split: str = 'train') -> list[Example]:
  """Returns n reviews of one domain for 3-way sentiment, classes balanced in law.

  Labels index SENTIMENT3_LABELS (0 negative, 1 neutral, 2 positive). Negative and
  positive reviews are drawn as in `generate_reviews`; a neutral review gives 1-3
  neutral clauses and, with probability `mixed_rate`, one positive and one negative
  sentiment clause, so neutral is not merely the absence of cue words. The source task
  of the sentiment cross-task pair (`sentiment_transfer_splits`); label_noise of the
  labels are moved to another class.
  """
  d = _check_domain(domain)
  _check_common(n, label_noise)
  if not 0.0 <= mixed_rate <= 1.0:
    raise ValueError(f'mixed_rate must be in [0, 1], got {mixed_rate}')
  rng = _rng(seed, 'sentiment3', domain, split)
  out = []
  for _ in range(n):
    label = int(rng.integers(3))
    product = _pick(rng, _PRODUCTS[domain])
    text = (_neutral_review(rng, domain, product, mixed_rate) if label == 1
            else _review(rng, domain, product, label - 1))
    label = _noisy(rng, label, 3, label_noise)
    out.append(Example(text, None, label, d, SENTIMENT3_LABELS[label]))
  return out


def generate_paraphrase_pairs(domain: str, n: int, *, seed: int,
                              label_noise: float = 0.05, split: str = 'train'
                              ) -> list[Example]:
  """Returns n review pairs; label 1 iff both give the same opinion of the same product.

  Half the pairs are paraphrases (a fresh review of the same product and polarity);
  the rest are split between the same product with the opposite opinion and another
  product with the same opinion. Labels index PARAPHRASE_LABELS.
  """
  d = _check_domain(domain)
  _check_common(n, label_noise)
  rng = _rng(seed, 'paraphrase', domain, split)
  products = _PRODUCTS[domain]
  out = []
  for _ in range(n):
    product = _pick(rng, products)
    polarity = 1 if rng.random() < 0.5 else -1
    label = int(rng.random() < 0.5)
    product_b, polarity_b = product, polarity
    if not label:
      if rng.random() < 0.5:
        polarity_b = -polarity
      else:
        product_b = _pick(rng, [p for p in products if p != product])
    kwargs = dict(max_sentiment=2, max_neutral=1, mixed_rate=0.0)
    text_a = _review(rng, domain, product, polarity, **kwargs)
    text_b = _review(rng, domain, product_b, polarity_b, **kwargs)
    label = _noisy(rng, label, 2, label_noise)
    out.append(Example(text_a, text_b, label, d, PARAPHRASE_LABELS[label]))
  return out


def generate_nli(domain: str, n: int, *, seed: int, num_classes: int = 3,
                 label_noise: float = 0.0, split: str = 'train') -> list[Example]:
  """Returns n (premise review, claim) pairs for 3-way or 2-way entailment.

  The claim states an opinion of a product ("the laptop is great"). It is entailed
  when the premise reviews that product with that opinion, contradicted when with the
  opposite one, neutral when the premise reviews another product. 3 classes index
  NLI3_LABELS (balanced); 2 classes index NLI2_LABELS (entails vs neutral, where
  neutral merges contradiction and neutral, as in SciTail; balanced).
  """
  d = _check_domain(domain)
  _check_common(n, label_noise)
  if num_classes not in (2, 3):
    raise ValueError(f'num_classes must be 2 or 3, got {num_classes}')
  rng = _rng(seed, f'nli{num_classes}', domain, split)
  products = _PRODUCTS[domain]
  out = []
  for _ in range(n):
    product = _pick(rng, products)
    polarity = 1 if rng.random() < 0.5 else -1
    if num_classes == 3:
      relation = int(rng.integers(3))  # 0 entailment, 1 neutral, 2 contradiction
    else:
      relation = 0 if rng.random() < 0.5 else int(rng.choice([1, 2]))
    claim_product = (_pick(rng, [p for p in products if p != product])
                     if relation == 1 else product)
    claim_polarity = -polarity if relation == 2 else polarity
    premise = _review(rng, domain, product, polarity, max_sentiment=2, mixed_rate=0.0)
    word = _pick(rng, _SHARED_ADJ[int(claim_polarity > 0)])
    claim = f'the {claim_product} {_be(claim_product)} {word} .'
    label = relation if num_classes == 3 else int(relation != 0)
    label = _noisy(rng, label, num_classes, label_noise)
    names = NLI3_LABELS if num_classes == 3 else NLI2_LABELS
    out.append(Example(premise, claim, label, d, names[label]))
  return out


_TASKS = {
    'sentiment': generate_reviews,
    'paraphrase': generate_paraphrase_pairs,
}
SPLITS = ('train', 'dev', 'test')


def multi_domain_splits(sizes: Mapping[str, Sequence[int]], *, seed: int,
                        task: str = 'sentiment', label_noise: float = 0.05
                        ) -> dict[str, dict[str, list[Example]]]:
  """Returns {domain: {'train', 'dev', 'test': examples}} with the given sizes.

  Args:
    sizes: domain -> (train, dev, test) sizes.
    seed: data seed.
    task: 'sentiment' (`generate_reviews`) or 'paraphrase'
      (`generate_paraphrase_pairs`).
    label_noise: applied to train and dev only; test labels are clean, so test
      accuracy measures the task, not the noise.
  """
  if task not in _TASKS:
    raise ValueError(f'unknown synthetic task {task!r}; expected one of {list(_TASKS)}')
  out = {}
  for domain, split_sizes in sizes.items():
    if len(split_sizes) != 3:
      raise ValueError(f'sizes[{domain!r}] must be (train, dev, test), got '
                       f'{split_sizes}')
    out[domain] = {
        split: _TASKS[task](domain, int(k), seed=seed, split=split,
                            label_noise=label_noise if split != 'test' else 0.0)
        for split, k in zip(SPLITS, split_sizes)}
  return out


def source_target_splits(source: str = 'books',
                         targets: Sequence[str] = ('dvd', 'electronics', 'kitchen'),
                         *, source_sizes: Sequence[int] = (2000, 200, 500),
                         target_sizes: Sequence[int] = (100, 200, 500), seed: int = 0,
                         task: str = 'sentiment', label_noise: float = 0.05
                         ) -> dict[str, dict[str, list[Example]]]:
  """A large source and small targets: `multi_domain_splits` with two size triples."""
  if source in targets:
    raise ValueError(f'source {source!r} is also a target')
  sizes = {source: tuple(source_sizes)} | {t: tuple(target_sizes) for t in targets}
  return multi_domain_splits(sizes, seed=seed, task=task, label_noise=label_noise)


def _pooled_splits(name: str, generate: Callable[..., list[Example]],
                   sizes: Sequence[int], domains: Sequence[str], label_noise: float
                   ) -> dict[str, list[Example]]:
  """{'train', 'dev', 'test': examples} of one task, drawn in equal shares from its
  domains (the last domain takes the remainder) by generate(domain, n, split=...,
  label_noise=...); test labels are clean."""
  if len(sizes) != 3:
    raise ValueError(f'{name} sizes must be (train, dev, test), got {sizes}')
  if not domains:
    raise ValueError(f'{name}: no domains given')
  out = {}
  for split, k in zip(SPLITS, sizes):
    shares = [k // len(domains)] * len(domains)
    shares[-1] += k - sum(shares)
    noise = label_noise if split != 'test' else 0.0
    out[split] = [ex for domain, m in zip(domains, shares)
                  for ex in generate(domain, m, split=split, label_noise=noise)]
  return out


def cross_task_splits(sizes3: Sequence[int] = (1500, 200, 500),
                      sizes2: Sequence[int] = (100, 200, 500), *, seed: int = 0,
                      domains3: Sequence[str] = DOMAINS,
                      domains2: Sequence[str] = DOMAINS, label_noise: float = 0.0
                      ) -> dict[str, dict[str, list[Example]]]:
  """Two tasks over one kind of text with different label sets (MNLI/SciTail style).

  Returns {'nli3': {...}, 'nli2': {...}}, each {'train', 'dev', 'test': examples}
  drawn in equal shares from its domains (the last domain takes the remainder).
  Test labels are clean.
  """
  return {name: _pooled_splits(name, functools.partial(generate_nli, seed=seed,
                                                       num_classes=num_classes),
                               sizes, domains, label_noise)
          for name, num_classes, sizes, domains in (('nli3', 3, sizes3, domains3),
                                                    ('nli2', 2, sizes2, domains2))}


def sentiment_transfer_splits(sizes3: Sequence[int] = (1500, 200, 500),
                              sizes2: Sequence[int] = (100, 200, 500), *, seed: int = 0,
                              domains3: Sequence[str] = ('books', 'dvd'),
                              domains2: Sequence[str] = ('electronics', 'kitchen'),
                              label_noise: float = 0.05
                              ) -> dict[str, dict[str, list[Example]]]:
  """A learnable cross-task pair with different label sets, shaped like MNLI -> SciTail.

  The source task is 3-way sentiment (`generate_sentiment3`: negative / neutral /
  positive) on `domains3`, the target task 2-way polarity (`generate_reviews`) on
  `domains2`. By default the two tasks also differ in domain (media reviews to goods
  reviews, as SciTail's science text differs from MNLI's genres): only the shared cue
  pools carry over, and which source class relates to which target class (negative
  and positive do, neutral to neither) has to be learnt. Small encoders learn both
  tasks, unlike the synthetic NLI pairs of `cross_task_splits`.

  Returns:
    {'sentiment3': {...}, 'polarity': {...}}, each {'train', 'dev', 'test': examples}
    drawn in equal shares from its domains; test labels are clean.
  """
  return {
      'sentiment3': _pooled_splits('sentiment3', functools.partial(
          generate_sentiment3, seed=seed), sizes3, domains3, label_noise),
      'polarity': _pooled_splits('polarity', functools.partial(
          generate_reviews, seed=seed), sizes2, domains2, label_noise)}


def flip_labels(examples: Sequence[Example], fraction: float, *, seed: int,
                num_classes: int = 2, label_names: Sequence[str] = SENTIMENT_LABELS
                ) -> tuple[list[Example], np.ndarray]:
  """Corrupts a known subset of labels (for instance-selection tests).

  Returns:
    (examples with exactly round(fraction * N) labels changed to another class, bool
    mask [N] of the changed ones).
  """
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f'fraction must be in [0, 1], got {fraction}')
  rng = _rng(seed, 'flip')
  n = len(examples)
  flipped = np.zeros(n, bool)
  flipped[rng.permutation(n)[:round(fraction * n)]] = True
  out = []
  for ex, f in zip(examples, flipped):
    if f:
      label = int((ex.label + rng.integers(1, num_classes)) % num_classes)
      ex = Example(ex.text_a, ex.text_b, label, ex.domain, label_names[label])
    out.append(ex)
  return out, flipped
