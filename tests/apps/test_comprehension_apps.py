"""Reading comprehension apps train a few steps and predict through the runner; long
contexts are cut into strided windows and the answers mapped back to the text."""

import pytest

from etjax.apps import runner
from tests.apps import apps_testlib as lib

CONTEXT = ("curl is a command line tool for transferring data with url syntax . it "
           "supports http , https , ftp and many more protocols . the current release "
           "is version 8.1 and it is maintained at https://curl.se by many people")
ROWS = [("which version is current ?", CONTEXT, "8.1", "curl"),
        ("where is it maintained ?", CONTEXT, "https://curl.se", "8.1"),
        ("what is curl ?", CONTEXT, "a command line tool", "https://curl.se||8.1")]


@pytest.mark.slow
@pytest.mark.parametrize("app", ["text_comprehension_bert", "text_comprehension_bert_hae"])
def test_comprehension_app_trains_evaluates_and_predicts(tmp_path, app):
  train = lib.write(tmp_path / "train.tsv", ROWS * 4)
  advanced = lib.TINY_BERT + " doc_stride=8 max_query_length=8 max_answer_length=6"
  if app.endswith("hae"):
    advanced += " history_column=history"
  flags = lib.flags(tmp_path, modelName=app, inputTable=train, sequenceLength=32,
                    inputSchema="question:str:1,context:str:1,answer:str:1,history:str:1",
                    firstSequence="question", secondSequence="context", labelName="answer",
                    advancedParameters=advanced)
  metrics = runner.run_app(flags)
  assert metrics["step"] >= 2
  ckpt = flags["checkpointDir"]
  if app == "text_comprehension_bert":  # one evaluate run keeps the suite short
    scores = runner.run_app({"mode": "evaluate", "checkpointDir": ckpt,
                             "inputTable": train})
    assert 0 <= scores["exact_match"] <= scores["f1"] <= 100
  out = str(tmp_path / "out.tsv")
  runner.run_app({"mode": "predict", "checkpointDir": ckpt, "inputTable": train,
                  "outputTable": out, "appendCols": "answer"})
  rows = lib.read(out)
  assert len(rows) == 12
  for row in rows:
    assert row[0] in CONTEXT and len(row[0].split()) <= 6
    assert 0 < float(row[1]) <= 1
