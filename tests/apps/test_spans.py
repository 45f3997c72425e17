"""Span decoding over strided windows against a hand-worked case."""

import numpy as np

from etjax.apps import spans

TEXT = "alpha beta gamma delta epsilon"
OFFSETS = [(0, 5), (6, 10), (11, 16), (17, 22), (23, 30)]


def test_windows_follow_the_doc_stride():
  assert [(w.start, w.length) for w in spans.make_windows(5, 3, 2, 3)] == [(0, 3), (2, 3)]
  assert [(w.start, w.length) for w in spans.make_windows(7, 3, 2, 3)] == [
      (0, 3), (2, 3), (4, 3)]
  assert [(w.start, w.length) for w in spans.make_windows(2, 3, 2, 3)] == [(0, 2)]


def _logits(values):
  # Model positions: [CLS] q q [SEP] c c c [SEP] -> context at 3, 4, 5.
  out = np.full(8, -50.0)
  out[3:6] = values
  return out


def test_n_best_spans_by_hand():
  windows = spans.make_windows(5, 3, 2, offset=3)   # tokens 0-2 and 2-4
  # Token 2 lies in both windows with equal context; the first window owns it.
  assert spans.max_context(windows, 0, 2) and not spans.max_context(windows, 1, 2)
  starts = [_logits([1, 0, 5]), _logits([6, 0, 1])]
  ends = [_logits([0, 2, 4]), _logits([0, 0, 3])]
  # Window 0 (n_best 2: starts tokens 2, 0; ends tokens 2, 1): (2,2)=9, (0,1)=3,
  # (0,2) too long. Window 1 (starts 2, 4; ends 4, 2): (2,*) has no max context
  # there (else (2,2)=6 would rank second), (4,4)=4.
  answer, best = spans.best_answer(starts, ends, windows, OFFSETS, TEXT, n_best=2,
                                   max_answer_length=2)
  assert answer == "gamma"
  assert [(s.start, s.end, s.score) for s in best] == [(2, 2, 9.0), (4, 4, 4.0)]
  # Longer answers allowed: window 0's (0,2) = 1 + 4 = 5 now ranks second.
  _, best = spans.best_answer(starts, ends, windows, OFFSETS, TEXT, n_best=2,
                              max_answer_length=3)
  assert [(s.start, s.end, s.score) for s in best] == [(2, 2, 9.0), (0, 2, 5.0)]


def test_answer_from_the_second_window_is_cut_from_the_original_text():
  windows = spans.make_windows(5, 3, 2, offset=3)
  starts = [_logits([1, 0, 5]), _logits([0, 8, 1])]
  ends = [_logits([0, 2, 4]), _logits([0, 0, 3])]
  answer, best = spans.best_answer(starts, ends, windows, OFFSETS, TEXT, n_best=3,
                                   max_answer_length=2)
  assert answer == "delta epsilon" and (best[0].start, best[0].end) == (3, 4)
  assert best[0].score == 11.0


def test_answer_token_span():
  assert spans.answer_token_span(OFFSETS, 17, 30) == (3, 4)
  assert spans.answer_token_span(OFFSETS, 12, 14) == (2, 2)
