"""Metrics of the AppZoo's tasks, in plain Python/numpy.

- SQuAD exact match and F1 with the official script's answer normalisation
  (lowercase, punctuation removed, articles a/an/the removed, whitespace collapsed),
  the maximum over the gold answers of each question;
- entity-level precision/recall/F1 of tag sequences as seqeval computes them
  (default, conlleval-style chunking of IOB/IOBES tags; micro-averaged);
- multi-label micro- and macro-F1 of 0/1 indicator matrices.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Sequence

import numpy as np

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
  """The official SQuAD v1.1 normalisation of an answer string."""
  text = text.lower()
  text = "".join(ch for ch in text if ch not in _PUNCTUATION)
  text = _ARTICLES.sub(" ", text)
  return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
  """1.0 when the normalised strings are equal, else 0.0."""
  return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
  """F1 of the bag-of-tokens overlap of the normalised strings."""
  pred_tokens = normalize_answer(prediction).split()
  gold_tokens = normalize_answer(gold).split()
  common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
  overlap = sum(common.values())
  if overlap == 0:
    return 0.0
  precision, recall = overlap / len(pred_tokens), overlap / len(gold_tokens)
  return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> dict:
  """{'exact_match', 'f1'} in percent, averaged over questions; each question scores
  its best gold answer (as the official evaluate-v1.1.py)."""
  if len(predictions) != len(golds):
    raise ValueError(f"squad_scores: {len(predictions)} predictions for {len(golds)} "
                     "questions")
  if not golds:
    raise ValueError("squad_scores: no questions")
  em = [max(exact_match(p, g) for g in gs) for p, gs in zip(predictions, golds)]
  f1 = [max(token_f1(p, g) for g in gs) for p, gs in zip(predictions, golds)]
  return {"exact_match": 100.0 * float(np.mean(em)), "f1": 100.0 * float(np.mean(f1))}


# --- entity-level scores (seqeval's default mode) ----------------------------------------


def _split_tag(tag: str) -> tuple[str, str]:
  # seqeval: the prefix is the first character, the type what follows the first '-'.
  return tag[:1], tag[1:].split("-", maxsplit=1)[-1] or "_"


def _end_of_chunk(prev_tag, tag, prev_type, type_) -> bool:
  return (prev_tag in ("E", "S")
          or (prev_tag in ("B", "I") and tag in ("B", "S", "O"))
          or (prev_tag not in ("O", ".") and prev_type != type_))


def _start_of_chunk(prev_tag, tag, prev_type, type_) -> bool:
  return (tag in ("B", "S")
          or (prev_tag in ("E", "S", "O") and tag in ("E", "I"))
          or (tag not in ("O", ".") and prev_type != type_))


def get_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
  """(type, first index, last index) of every chunk of one tag sequence."""
  chunks = []
  prev_tag, prev_type, begin = "O", "", 0
  for i, tag in enumerate(list(tags) + ["O"]):
    tag_prefix, type_ = _split_tag(tag)
    if _end_of_chunk(prev_tag, tag_prefix, prev_type, type_):
      chunks.append((prev_type, begin, i - 1))
    if _start_of_chunk(prev_tag, tag_prefix, prev_type, type_):
      begin = i
    prev_tag, prev_type = tag_prefix, type_
  return chunks


def entity_scores(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]
                  ) -> dict:
  """Micro-averaged entity {'precision', 'recall', 'f1'} over sentences (0 when
  undefined, as seqeval), plus the counts 'num_gold', 'num_predicted', 'num_correct'."""
  if len(gold) != len(predicted):
    raise ValueError(f"entity_scores: {len(gold)} gold and {len(predicted)} predicted "
                     "sentences")
  true_set, pred_set = set(), set()
  for i, (g, p) in enumerate(zip(gold, predicted)):
    if len(g) != len(p):
      raise ValueError(f"entity_scores: sentence {i} has {len(g)} gold and {len(p)} "
                       "predicted tags")
    true_set.update((i,) + e for e in get_entities(g))
    pred_set.update((i,) + e for e in get_entities(p))
  correct = len(true_set & pred_set)
  precision = correct / len(pred_set) if pred_set else 0.0
  recall = correct / len(true_set) if true_set else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return {"precision": precision, "recall": recall, "f1": f1,
          "num_gold": len(true_set), "num_predicted": len(pred_set),
          "num_correct": correct}


# --- multi-label ----------------------------------------------------------------------------


def multilabel_f1(gold: np.ndarray, predicted: np.ndarray) -> dict:
  """Micro- and macro-F1 of indicator matrices [N, K] (as scikit-learn's f1_score
  with average='micro'/'macro': a label never gold nor predicted has F1 0)."""
  gold = np.asarray(gold).astype(bool)
  predicted = np.asarray(predicted).astype(bool)
  if gold.shape != predicted.shape or gold.ndim != 2:
    raise ValueError(f"multilabel_f1: gold {gold.shape} and predicted "
                     f"{predicted.shape} must be the same [N, K]")
  tp = (gold & predicted).sum(0).astype(np.float64)
  fp = (~gold & predicted).sum(0).astype(np.float64)
  fn = (gold & ~predicted).sum(0).astype(np.float64)
  denom = 2 * tp + fp + fn
  per_label = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
  micro_denom = 2 * tp.sum() + fp.sum() + fn.sum()
  micro = 2 * tp.sum() / micro_denom if micro_denom else 0.0
  return {"micro_f1": float(micro), "macro_f1": float(per_label.mean()),
          "exact_set_accuracy": float(np.mean(np.all(gold == predicted, axis=1)))}
