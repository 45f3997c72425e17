"""Sequence labeling apps train a few steps and predict through the runner."""

import pytest

from etjax.apps import runner
from tests.apps import apps_testlib as lib

SENTENCES = [
    ("install libxml2 version 2.9 from http://xmlsoft.org now",
     "O B-PKG O B-VER O B-URL O"),
    ("the openssh server speaks ssh", "O B-PKG O O B-PROTO"),
    ("curl 8.1 fetches https://curl.se over http quickly",
     "B-PKG B-VER O B-URL O B-PROTO O"),
    ("upgrade python3 to 3.11 today", "O B-PKG O B-VER O"),
]


@pytest.mark.slow
@pytest.mark.parametrize("app", ["sequence_labeling_bert", "sequence_labeling_bert_crf",
                                 "sequence_labeling_bert_bilstm_crf"])
def test_tagging_app_trains_evaluates_and_predicts(tmp_path, app):
  train = lib.write(tmp_path / "train.tsv", SENTENCES * 4)
  flags = lib.flags(tmp_path, modelName=app, inputTable=train,
                    inputSchema="words:str:1,tags:str:1", firstSequence="words",
                    labelName="tags", advancedParameters=lib.TINY_BERT +
                    (" lstm_size=8" if "bilstm" in app else ""))
  metrics = runner.run_app(flags)
  assert metrics["step"] == 2
  ckpt = flags["checkpointDir"]
  if app == "sequence_labeling_bert_crf":  # one evaluate run keeps the suite short
    scores = runner.run_app({"mode": "evaluate", "checkpointDir": ckpt,
                             "inputTable": train})
    assert {"precision", "recall", "f1", "token_accuracy"} <= set(scores)
  out = str(tmp_path / "out.tsv")
  runner.run_app({"mode": "predict", "checkpointDir": ckpt, "inputTable": train,
                  "outputTable": out, "outputSchema": "predictions",
                  "appendCols": "words"})
  rows = lib.read(out)
  assert len(rows) == 16
  for (words, _), row in zip(SENTENCES * 4, rows):
    assert len(row[0].split()) == len(words.split()) and row[1] == words
    assert set(row[0].split()) <= {"O", "B-PKG", "B-VER", "B-URL", "B-PROTO"}
