"""Layer maps: PKD-Skip/Last and TinyBERT's m -> m N / M, explicit maps, gathering."""

from __future__ import annotations

import numpy as np
import pytest

from etjax.algorithms import layer_map as lm


def test_skip_and_last_match_the_papers():
  assert lm.layer_map("skip", 6, 12) == (2, 4, 6, 8, 10, 12)  # PKD-Skip (+ last)
  assert lm.layer_map("last", 6, 12) == (7, 8, 9, 10, 11, 12)  # PKD-Last (+ last)
  assert lm.layer_map("skip", 4, 12) == (3, 6, 9, 12)  # TinyBERT-4
  assert lm.layer_map("skip", 3, 8) == (2, 5, 8)  # floor(m N / M)
  assert lm.layer_map("skip", 5, 5) == (1, 2, 3, 4, 5)
  assert lm.layer_map([1, 1, 12], 3, 12) == (1, 1, 12)


@pytest.mark.parametrize("args, match", [
    (("middle", 2, 4), "unknown strategy 'middle'"),
    (("skip", 5, 4), "at most as many student"),
    (("last", 0, 4), "num_student_layers must be a positive int"),
    (([1, 2], 3, 4), "explicit map has 2 entries"),
    (([1, 5, 2], 3, 4), r"entry 1 \(student layer 2\) is 5; expected a teacher layer in 1..4"),
    (([1, 2.0, 3], 3, 4), "entry 1"),
])
def test_bad_maps_raise(args, match):
  with pytest.raises(ValueError, match=match):
    lm.layer_map(*args)


def test_pairs_and_stacking():
  mapping = lm.layer_map("skip", 2, 4)
  assert lm.mapped_pairs(mapping) == ((1, 2), (2, 4))
  assert lm.mapped_pairs(mapping, include_embeddings=True,
                         include_last=False) == ((0, 0), (1, 2))
  student = [np.full((2, 3), i, np.float32) for i in range(3)]  # embeddings + 2 layers
  teacher = [np.full((2, 3), 10 + i, np.float32) for i in range(5)]
  s, t = lm.stack_pairs(student, teacher, lm.mapped_pairs(mapping, include_embeddings=True))
  assert s.shape == (3, 2, 3)
  np.testing.assert_array_equal(s[:, 0, 0], [0, 1, 2])
  np.testing.assert_array_equal(t[:, 0, 0], [10, 12, 14])
  # Attentions have no embedding entry: layer m sits at index m - 1.
  s, t = lm.stack_pairs(student[1:], teacher[1:], lm.mapped_pairs(mapping),
                        embeddings_first=False)
  np.testing.assert_array_equal(t[:, 0, 0], [12, 14])
  with pytest.raises(ValueError, match="teacher layer 4 is not in the 3 given states"):
    lm.stack_pairs(student, teacher[:3], lm.mapped_pairs(mapping))
