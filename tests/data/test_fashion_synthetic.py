"""Synthetic FashionBERT pairs: determinism, encoding, and that captions are
predictable from the image content and from nothing else."""

import numpy as np
import pytest
from scipy.stats import chi2_contingency

from etjax.data import fashion_synthetic as fs
from etjax.data import pipeline


@pytest.fixture(scope="module")
def data():
  return fs.generate_pairs(3000, seed=11)


def test_same_seed_same_pairs_other_seed_or_split_differs():
  a = fs.generate_pairs(40, seed=1)
  b = fs.generate_pairs(40, seed=1)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  for other in (fs.generate_pairs(40, seed=2), fs.generate_pairs(40, seed=1, split="test")):
    assert not np.array_equal(a["pixels"], other["pixels"])
    assert not np.array_equal(a["input_ids"], other["input_ids"])


def test_encoding_and_labels(data):
  n = len(data["labels"])
  assert pipeline.num_examples(fs.model_arrays(data)) == n
  assert data["pixels"].shape == (n, 32, 32, 3) and data["pixels"].dtype == np.float32
  assert 0 <= data["pixels"].min() and data["pixels"].max() <= 1
  assert data["labels"].sum() == n // 2  # exactly half mismatched
  words = np.array(fs.VOCAB)
  for i in range(0, n, 97):
    ids = data["input_ids"][i][data["attention_mask"][i] == 1]
    assert ids[0] == fs.CLS_ID and ids[-1] == fs.SEP_ID
    assert " ".join(words[ids[1:-1]]) == fs.caption(data["caption_attrs"][i],
                                                    data["template"][i])
  same = (data["caption_attrs"] == data["image_attrs"]).all(1)
  np.testing.assert_array_equal(same, data["labels"] == 1)


def _p_value(a, b):
  table = np.zeros((a.max() + 1, b.max() + 1))
  np.add.at(table, (a, b), 1)
  return chi2_contingency(table[table.sum(1) > 0][:, table.sum(0) > 0])[1]


def test_nothing_but_the_image_predicts_the_caption_or_the_label(data):
  labels, cap, img = data["labels"], data["caption_attrs"], data["image_attrs"]
  template = data["template"]
  independent = [(labels, cap[:, j]) for j in range(3)]         # caption alone -> label
  independent += [(labels, img[:, j]) for j in range(3)]        # image alone -> label
  independent += [(labels, template)]
  independent += [(cap[:, i], cap[:, j]) for i in range(3) for j in range(i + 1, 3)]
  independent += [(template, cap[:, j]) for j in range(3)]
  independent += [(cap[1:, j], cap[:-1, j]) for j in range(3)]  # neighbours
  independent += [(cap[:, j], np.arange(len(labels)) % 7) for j in range(3)]  # position
  for a, b in independent:
    assert _p_value(a, b) > 1e-3
  # The same test does see the one real dependence: caption and image attributes.
  matched = labels == 1
  for j in range(3):
    assert _p_value(cap[matched, j], img[matched, j]) < 1e-100


def _decode(image):
  """Colour, shape and pattern read off the pixels by hand-written rules."""
  border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
  fg = np.abs(image - np.median(border, 0)).max(-1) > 0.18  # 6 noise sigmas from grey
  rows, cols = np.flatnonzero(fg.any(1)), np.flatnonzero(fg.any(0))
  r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
  box = fg[r0:r1, c0:c1]
  bright = fg & (image.max(-1) > 0.7 * image[fg].max(-1).max())
  colour = int(np.argmin(((fs.RGB - np.median(image[bright], 0)) ** 2).sum(1)))
  # Bounding-box fill: square 1, circle pi/4, triangle and diamond 1/2; a triangle
  # has most of its area in its lower half.
  fill, h = box.mean(), box.shape[0]
  upper = box[:h // 2].sum() / max(box[h - h // 2:].sum(), 1)
  if fill > 0.9:
    shape = "square"
  elif fill > 0.65:
    shape = "circle"
  else:
    shape = "triangle" if upper < 0.6 else "diamond"
  dark = (fg & ~bright)[r0:r1, c0:c1]
  inner = box.copy()  # away from the edge, where shapes are cut
  for shift in (2, -2):
    for axis in (0, 1):
      inner &= np.roll(box, shift, axis)
  frac = dark[inner].mean()
  row_frac = np.array([dark[r][inner[r]].mean() for r in range(h) if inner[r].sum() > 2])
  if frac < 0.1:
    pattern = "plain"
  elif frac < 0.37:
    pattern = "dotted"  # a quarter of the pixels
  else:  # stripes are whole rows, checks half of every row
    pattern = "striped" if np.mean(np.minimum(row_frac, 1 - row_frac)) < 0.15 else \
        "checked"
  return colour, fs.SHAPES.index(shape), fs.PATTERNS.index(pattern)


def test_the_image_content_determines_the_caption(data):
  decoded = np.array([_decode(im) for im in data["pixels"][:600]])
  accuracy = (decoded == data["image_attrs"][:600]).mean(0)
  assert np.all(accuracy > 0.99), accuracy


def test_retrieval_candidates_hold_one_correct_image():
  d = fs.generate_pairs(600, seed=5)
  queries, candidates, positive = fs.retrieval_candidates(d, 50, seed=5, num_queries=40)
  assert candidates.shape == (40, 50)
  triple = fs.triple_index(d["image_attrs"])
  for q, row, pos in zip(queries, candidates, positive):
    assert d["labels"][q] == 1 and row[pos] == q
    assert np.all(d["labels"][row] == 1) and len(set(row)) == 50
    assert np.sum(triple[row] == triple[q]) == 1  # only its own product fits
  again = fs.retrieval_candidates(d, 50, seed=5, num_queries=40)
  for x, y in zip((queries, candidates, positive), again):
    np.testing.assert_array_equal(x, y)


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="negative_fraction"):
    fs.generate_pairs(10, seed=0, negative_fraction=1.5)
  with pytest.raises(ValueError, match="vocabulary"):
    fs.encode_caption("a red hat")
  with pytest.raises(ValueError, match="num_candidates"):
    fs.retrieval_candidates(fs.generate_pairs(20, seed=0), 200, seed=0)
