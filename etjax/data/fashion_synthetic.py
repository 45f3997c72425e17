"""Synthetic image-text pairs for FashionBERT, deterministic per seed.

There is no real fashion image data offline, so this module renders small products
and captions that name them. A product has three attributes drawn uniformly and
independently:

  colour  (8): red, green, blue, yellow, purple, orange, pink, brown
  shape   (4): circle, square, triangle, diamond
  pattern (4): plain, striped, dotted, checked

and is rendered as an RGB image [size, size, 3] in [0, 1]: a filled shape of the colour
on a light grey background, the pattern drawn as darker pixels inside the shape, with
the shape's centre and size jittered and Gaussian pixel noise added, so no two images
are alike. Its caption names the three attributes in one of four templates (chosen
uniformly, independently of the image), e.g. "a red striped circle" or "this circle is
red and striped".

A pair is matched (label 1) when the caption describes its image; a mismatched pair
(label 0) takes the caption of another attribute triple, drawn uniformly among the
127 triples that differ from the image's. Because every attribute and template is
drawn independently and uniformly, a caption's words say nothing about the match label,
nothing about the other attributes, and nothing about neighbouring examples: only the
image content tells whether a caption fits (tests/data/test_fashion_synthetic.py checks
this with chi-square tests and a decoder that reads colour and pattern off the pixels).

Text is encoded with a fixed word-level vocabulary (`VOCAB`: BERT's five special tokens,
then the words) as [CLS] words [SEP] padding. `generate_pairs` returns the encoded data
the input pipeline (etjax.data.pipeline) batches, with 'pixels' [N, size, size, 3]
riding along; `retrieval_candidates` builds text-to-image retrieval lists.
"""

from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np

COLOURS = ('red', 'green', 'blue', 'yellow', 'purple', 'orange', 'pink', 'brown')
SHAPES = ('circle', 'square', 'triangle', 'diamond')
PATTERNS = ('plain', 'striped', 'dotted', 'checked')
ATTRIBUTES = (COLOURS, SHAPES, PATTERNS)
NUM_TRIPLES = len(COLOURS) * len(SHAPES) * len(PATTERNS)

# RGB of each colour; all far from the grey background and from each other.
RGB = np.array([(0.85, 0.12, 0.12), (0.12, 0.65, 0.18), (0.12, 0.25, 0.85),
                (0.92, 0.85, 0.10), (0.52, 0.15, 0.68), (0.98, 0.52, 0.05),
                (0.98, 0.45, 0.70), (0.45, 0.25, 0.08)], np.float32)
# Pattern pixels keep this fraction of the colour (darker), so patterns stay visible.
PATTERN_SHADE = 0.4
BACKGROUND = (0.72, 0.92)  # grey level range of the background
NOISE_STD = 0.03

TEMPLATES = ('a {c} {p} {s}', '{p} {s} in {c}', '{c} {s} with a {p} pattern',
             'this {s} is {c} and {p}')
SPECIALS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(len(SPECIALS))
_WORDS = ('a', 'in', 'with', 'pattern', 'this', 'is', 'and')
VOCAB = SPECIALS + _WORDS + COLOURS + SHAPES + PATTERNS
WORD_IDS = {w: i for i, w in enumerate(VOCAB)}
MAX_CAPTION_WORDS = max(len(t.split()) for t in TEMPLATES)
MAX_LENGTH = MAX_CAPTION_WORDS + 2  # [CLS] ... [SEP]

# The keys of `generate_pairs` that a model step consumes (the rest describe the data).
MODEL_KEYS = ('input_ids', 'attention_mask', 'token_type_ids', 'labels', 'domain',
              'weight', 'pixels')


def _rng(seed: int, *names: str) -> np.random.Generator:
  """An independent stream per (seed, names): changing one split leaves the others."""
  key = zlib.crc32('/'.join(names).encode())
  return np.random.default_rng([seed, key])


def caption(triple: Sequence[int], template: int) -> str:
  """The caption of attribute triple (colour, shape, pattern) in template `template`."""
  c, s, p = (names[i] for names, i in zip(ATTRIBUTES, triple))
  return TEMPLATES[template].format(c=c, s=s, p=p)


def encode_caption(text: str, max_length: int = MAX_LENGTH) -> np.ndarray:
  """[CLS] word ids [SEP] padded with [PAD] to max_length: int32 [max_length].

  Raises ValueError naming the word when it is not in VOCAB, or when the caption does
  not fit in max_length."""
  words = text.split()
  unknown = [w for w in words if w not in WORD_IDS]
  if unknown:
    raise ValueError(f'caption {text!r}: words {unknown} are not in the vocabulary')
  if len(words) + 2 > max_length:
    raise ValueError(f'caption {text!r} needs {len(words) + 2} tokens > max_length '
                     f'{max_length}')
  ids = np.full(max_length, PAD_ID, np.int32)
  ids[:len(words) + 2] = [CLS_ID] + [WORD_IDS[w] for w in words] + [SEP_ID]
  return ids


def _shape_mask(shape: int, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float,
                radius: float) -> np.ndarray:
  dy, dx = yy - cy, xx - cx
  if SHAPES[shape] == 'circle':
    return dy ** 2 + dx ** 2 <= radius ** 2
  if SHAPES[shape] == 'square':
    side = radius * 0.85  # about the circle's area
    return (np.abs(dy) <= side) & (np.abs(dx) <= side)
  if SHAPES[shape] == 'triangle':
    # Apex up: rows widen linearly from the apex to the base.
    top, bottom = cy - radius, cy + radius * 0.8
    half_width = (yy - top) / (bottom - top) * radius * 1.1
    return (yy >= top) & (yy <= bottom) & (np.abs(dx) <= half_width)
  return np.abs(dy) + np.abs(dx) <= radius * 1.15  # diamond


def _pattern_mask(pattern: int, yy: np.ndarray, xx: np.ndarray, phase: int) -> np.ndarray:
  name = PATTERNS[pattern]
  if name == 'plain':
    return np.zeros(yy.shape, bool)
  if name == 'striped':
    return (yy + phase) % 4 < 2
  if name == 'dotted':
    return ((yy + phase) % 4 < 2) & ((xx + phase) % 4 < 2)
  return (((yy + phase) // 3) + ((xx + phase) // 3)) % 2 == 0  # checked


def render(triple: Sequence[int], rng: np.random.Generator, size: int = 32) -> np.ndarray:
  """Renders attribute triple (colour, shape, pattern): float32 [size, size, 3] in [0, 1].

  The centre moves by up to size/10 from the middle, the radius is size * [0.28, 0.38],
  the colour is jittered by +-0.04 per channel, the background grey level drawn from
  BACKGROUND, and pixel noise of std NOISE_STD added."""
  if size < 16:
    raise ValueError(f'image size {size} is too small to draw patterns; use >= 16')
  colour, shape, pattern = (int(v) for v in triple)
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
  jitter = size / 10
  cy, cx = size / 2 + rng.uniform(-jitter, jitter, 2)
  radius = size * rng.uniform(0.28, 0.38)
  rgb = np.clip(RGB[colour] + rng.uniform(-0.04, 0.04, 3), 0, 1)
  image = np.full((size, size, 3), rng.uniform(*BACKGROUND), np.float32)
  inside = _shape_mask(shape, yy, xx, cy, cx, radius)
  image[inside] = rgb
  shaded = inside & _pattern_mask(pattern, yy.astype(int), xx.astype(int),
                                  int(rng.integers(4)))
  image[shaded] = rgb * PATTERN_SHADE
  image += rng.normal(0, NOISE_STD, image.shape).astype(np.float32)
  return np.clip(image, 0, 1).astype(np.float32)


def _random_triples(rng: np.random.Generator, n: int) -> np.ndarray:
  return np.stack([rng.integers(len(a), size=n) for a in ATTRIBUTES], 1).astype(np.int32)


def triple_index(triples: np.ndarray) -> np.ndarray:
  """(colour, shape, pattern) [..., 3] -> one id in [0, NUM_TRIPLES): int [...]."""
  triples = np.asarray(triples)
  return (triples[..., 0] * len(SHAPES) + triples[..., 1]) * len(PATTERNS) + triples[..., 2]


def _triples_of(index: np.ndarray) -> np.ndarray:
  p = index % len(PATTERNS)
  s = (index // len(PATTERNS)) % len(SHAPES)
  c = index // (len(PATTERNS) * len(SHAPES))
  return np.stack([c, s, p], -1).astype(np.int32)


def generate_pairs(n: int, *, seed: int, split: str = 'train',
                   negative_fraction: float = 0.5, image_size: int = 32,
                   max_length: int = MAX_LENGTH) -> dict[str, np.ndarray]:
  """`n` image-caption pairs, a `negative_fraction` of them mismatched.

  Args:
    n: number of pairs.
    seed: the data seed; (seed, split) fixes every array.
    split: a name ('train', 'dev', 'test', ...) with its own random stream.
    negative_fraction: the fraction of mismatched pairs (exactly round(n * f)).
    image_size: images are [image_size, image_size, 3].
    max_length: token sequence length (>= MAX_LENGTH).

  Returns:
    The encoded data: input_ids, attention_mask, token_type_ids int32 [n, max_length];
    labels int32 [n] (1 matched, 0 mismatched); domain int32 [n] (zeros); weight
    float32 [n] (ones); pixels float32 [n, image_size, image_size, 3]; and, describing
    the data, image_attrs and caption_attrs int32 [n, 3] (colour, shape, pattern
    indices) and template int32 [n].
  """
  if n <= 0:
    raise ValueError(f'generate_pairs: n must be positive, got {n}')
  if not 0.0 <= negative_fraction <= 1.0:
    raise ValueError(f'generate_pairs: negative_fraction must be in [0, 1], got '
                     f'{negative_fraction}')
  rng = _rng(seed, 'fashion', split)
  image_attrs = _random_triples(rng, n)
  labels = np.ones(n, np.int32)
  labels[rng.permutation(n)[:int(round(n * negative_fraction))]] = 0
  # A mismatched caption names a uniformly drawn different triple: adding an offset
  # in [1, NUM_TRIPLES) modulo NUM_TRIPLES never returns the image's own triple.
  offset = rng.integers(1, NUM_TRIPLES, size=n)
  caption_index = np.where(labels == 1, triple_index(image_attrs),
                           (triple_index(image_attrs) + offset) % NUM_TRIPLES)
  caption_attrs = _triples_of(caption_index)
  template = rng.integers(len(TEMPLATES), size=n).astype(np.int32)
  texts = [caption(t, k) for t, k in zip(caption_attrs, template)]
  input_ids = np.stack([encode_caption(t, max_length) for t in texts])
  pixels = np.stack([render(t, rng, image_size) for t in image_attrs])
  return {'input_ids': input_ids,
          'attention_mask': (input_ids != PAD_ID).astype(np.int32),
          'token_type_ids': np.zeros_like(input_ids),
          'labels': labels, 'domain': np.zeros(n, np.int32),
          'weight': np.ones(n, np.float32), 'pixels': pixels,
          'image_attrs': image_attrs, 'caption_attrs': caption_attrs,
          'template': template}


def model_arrays(data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The arrays of `generate_pairs` that a training or predict step consumes."""
  return {k: data[k] for k in MODEL_KEYS}


def retrieval_candidates(data: dict[str, np.ndarray], num_candidates: int, *,
                         seed: int, num_queries: int | None = None
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Text-to-image retrieval lists over the matched pairs of `data`.

  Each query is the caption of a matched pair; its candidates are its own image and
  num_candidates - 1 images of other matched pairs whose attribute triple differs
  from the query's (another product: no second correct answer), in random order.

  Returns:
    (queries int [Q]: rows of `data` whose caption is the query; candidates int
    [Q, num_candidates]: rows whose image is a candidate; positive int [Q]: the column
    of the query's own image).
  """
  matched = np.flatnonzero(data['labels'] == 1)
  if num_candidates < 2:
    raise ValueError(f'num_candidates must be at least 2, got {num_candidates}')
  rng = _rng(seed, 'fashion', 'retrieval')
  queries = matched if num_queries is None else rng.permutation(matched)[:num_queries]
  triples = triple_index(data['image_attrs'])
  candidates = np.zeros((len(queries), num_candidates), np.int64)
  positive = rng.integers(num_candidates, size=len(queries))
  for qi, q in enumerate(queries):
    others = matched[triples[matched] != triples[q]]
    if len(others) < num_candidates - 1:
      raise ValueError(f'only {len(others)} images of other products for query {q}; '
                       f'num_candidates={num_candidates} needs more matched pairs')
    row = list(rng.choice(others, num_candidates - 1, replace=False))
    row.insert(int(positive[qi]), q)
    candidates[qi] = row
  return queries, candidates, positive
