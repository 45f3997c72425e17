"""Span extraction for reading comprehension: windows over long contexts and n-best
answer decoding, merged back to the original text (BERT's run_squad procedure).

A context longer than one window is cut into windows of at most `max_tokens` context
tokens that start `doc_stride` tokens apart (the last one ends at the context's end).
A token seen in several windows is scored only in the window where it has the most
context on both sides (`max_context`). Each window's start/end logits propose the
`n_best` best starts and ends; a span is kept when it lies inside the window's context,
end >= start, it has at most `max_answer_length` tokens and its start has max context
there. The best span over all windows (score = start logit + end logit) is the
answer, cut from the original text by the tokens' character offsets.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Window:
  """A run of context tokens [start, start + length) placed at `offset` in the model's
  input (after [CLS] question [SEP])."""
  start: int
  length: int
  offset: int


def make_windows(num_tokens: int, max_tokens: int, doc_stride: int,
                 offset: int) -> list[Window]:
  """Windows covering `num_tokens` context tokens (at least one, possibly empty)."""
  if max_tokens < 1 or doc_stride < 1:
    raise ValueError(f"window of {max_tokens} tokens and stride {doc_stride}: both "
                     "must be positive (is the question longer than sequenceLength?)")
  windows, start = [], 0
  while True:
    length = min(num_tokens - start, max_tokens)
    windows.append(Window(start, length, offset))
    if start + length >= num_tokens:
      return windows
    start += min(length, doc_stride)


def max_context(windows: Sequence[Window], index: int, token: int) -> bool:
  """Whether window `index` gives context token `token` its most context
  (min(left, right) + 0.01 * length; the first such window wins ties)."""
  best_score, best_index = None, None
  for i, w in enumerate(windows):
    if not w.start <= token < w.start + w.length:
      continue
    score = min(token - w.start, w.start + w.length - 1 - token) + 0.01 * w.length
    if best_score is None or score > best_score:
      best_score, best_index = score, i
  return best_index == index


@dataclasses.dataclass(frozen=True)
class Span:
  """A candidate answer: context token range [start, end] (inclusive) and its score."""
  score: float
  start: int
  end: int


def window_spans(start_logits: np.ndarray, end_logits: np.ndarray,
                 windows: Sequence[Window], index: int, n_best: int,
                 max_answer_length: int) -> list[Span]:
  """The legal candidate spans of window `index` from its logits [L] (positions in the
  model input), as context token indices."""
  w = windows[index]
  if w.length == 0:
    return []
  lo, hi = w.offset, w.offset + w.length
  order = lambda x: [int(i) for i in np.argsort(-x[lo:hi], kind="stable")[:n_best] + lo]
  spans = []
  for s in order(start_logits):
    for e in order(end_logits):
      if e < s or e - s + 1 > max_answer_length:
        continue
      token_s = s - w.offset + w.start
      if not max_context(windows, index, token_s):
        continue
      spans.append(Span(float(start_logits[s] + end_logits[e]), token_s,
                        e - w.offset + w.start))
  return spans


def best_answer(start_logits_wl: Sequence[np.ndarray], end_logits_wl: Sequence[np.ndarray],
                windows: Sequence[Window], offsets: Sequence[tuple[int, int]],
                text: str, n_best: int = 20, max_answer_length: int = 30
                ) -> tuple[str, list[Span]]:
  """The answer text and the n-best spans (best first) of one question.

  Args:
    start_logits_wl, end_logits_wl: per window, logits over model positions [L].
    windows: the question's windows (from make_windows).
    offsets: (char start, char end) of each context token in `text`.
    text: the original context.
  """
  spans = []
  for i in range(len(windows)):
    spans += window_spans(np.asarray(start_logits_wl[i]), np.asarray(end_logits_wl[i]),
                          windows, i, n_best, max_answer_length)
  spans.sort(key=lambda s: -s.score)
  spans = spans[:n_best]
  if not spans:
    return "", []
  best = spans[0]
  return text[offsets[best.start][0]:offsets[best.end][1]], spans


def answer_token_span(offsets: Sequence[tuple[int, int]], char_start: int,
                      char_end: int) -> tuple[int, int]:
  """The context tokens [first, last] covering characters [char_start, char_end)."""
  first = last = None
  for i, (s, e) in enumerate(offsets):
    if e > char_start and s < char_end:
      first = i if first is None else first
      last = i
  if first is None:
    raise ValueError(f"no token covers characters [{char_start}, {char_end})")
  return first, last
