"""SQuAD EM/F1, entity-level P/R/F1 and multi-label F1 against hand-computed values."""

import numpy as np
import pytest

from etjax.apps import metrics


def test_squad_normalisation_and_scores_by_hand():
  assert metrics.normalize_answer("  The Eiffel-Tower!  ") == "eiffeltower"
  assert metrics.normalize_answer("An apple, a day") == "apple day"
  preds = ["The Eiffel Tower!", "in the city of Paris", "an apple"]
  golds = [["eiffel tower"], ["Paris", "city of Paris"], ["banana"]]
  # Q1: equal after normalisation. Q2: "in city of paris" vs "city of paris": 3 common
  # tokens, P = 3/4, R = 1, F1 = 6/7 (better than "paris": F1 0.4); EM 0. Q3: 0.
  scores = metrics.squad_scores(preds, golds)
  assert scores["exact_match"] == pytest.approx(100 / 3, rel=1e-12)
  assert scores["f1"] == pytest.approx(100 * (1 + 6 / 7) / 3, rel=1e-12)
  assert metrics.token_f1("paris", "in the city of paris") == pytest.approx(0.4)


def test_entities_follow_seqeval_chunking():
  assert metrics.get_entities(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 1),
                                                                    ("LOC", 3, 3)]
  # An I- after O starts a chunk; a type change ends one.
  assert metrics.get_entities(["O", "I-MISC", "I-MISC", "O"]) == [("MISC", 1, 2)]
  assert metrics.get_entities(["B-X", "I-Y"]) == [("X", 0, 0), ("Y", 1, 1)]
  assert metrics.get_entities(["B-X", "B-X", "I-X"]) == [("X", 0, 0), ("X", 1, 2)]


def test_entity_scores_by_hand():
  gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "I-MISC", "I-MISC", "O", "B-PER"]]
  pred = [["B-PER", "I-PER", "O", "B-ORG"], ["O", "B-MISC", "I-MISC", "O", "O"]]
  # gold: PER, LOC, MISC, PER (4); predicted: PER, ORG, MISC (3); correct: PER, MISC.
  s = metrics.entity_scores(gold, pred)
  assert (s["num_gold"], s["num_predicted"], s["num_correct"]) == (4, 3, 2)
  assert s["precision"] == pytest.approx(2 / 3)
  assert s["recall"] == pytest.approx(1 / 2)
  assert s["f1"] == pytest.approx(4 / 7)
  with pytest.raises(ValueError, match="sentence 0"):
    metrics.entity_scores([["O"]], [["O", "O"]])


def test_multilabel_f1_by_hand():
  gold = np.array([[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 0, 0]])
  pred = np.array([[1, 0, 0, 0], [0, 1, 1, 0], [1, 0, 0, 0]])
  # label 0: tp 2 -> F1 1; label 1: tp 1, fn 1 -> 2/3; label 2: fp 1, fn 1 -> 0;
  # label 3 never gold nor predicted -> 0. micro: tp 3, fp 1, fn 2 -> 6/9.
  s = metrics.multilabel_f1(gold, pred)
  assert s["macro_f1"] == pytest.approx((1 + 2 / 3) / 4)
  assert s["micro_f1"] == pytest.approx(2 / 3)
  assert s["exact_set_accuracy"] == 0.0
