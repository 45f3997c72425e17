"""Reading comprehension apps train a few steps and predict through the runner; long
contexts are cut into strided windows and the answers mapped back to the text."""

import numpy as np
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


def _context(app_name, advanced):
  from etjax.apps import base, config, registry  # pylint: disable=g-import-not-at-top
  from etjax.data import tokenizers  # pylint: disable=g-import-not-at-top
  cfg = config.AppConfig.from_flags({
      "mode": "train", "modelName": app_name, "checkpointDir": "unused",
      "inputTable": "t.tsv", "sequenceLength": 24,
      "inputSchema": "question:str:1,context:str:1,answer:str:1,history:str:1",
      "firstSequence": "question", "secondSequence": "context", "labelName": "answer",
      "advancedParameters": advanced})
  app = registry.get_app(app_name)
  tok = tokenizers.build_wordpiece_tokenizer([CONTEXT] + [q for q, *_ in ROWS], 300)
  return app, base.Context(cfg, app.resolve_advanced(cfg.advanced_parameters), tok)


def _rows():
  from etjax.apps.table import Row  # pylint: disable=g-import-not-at-top
  names = ("question", "context", "answer", "history")
  return [Row("t.tsv", i + 1, dict(zip(names, r)), dict(zip(names, r)))
          for i, r in enumerate(ROWS)]


def test_windows_point_at_the_answer_tokens_or_cls():
  app, ctx = _context("text_comprehension_bert", "doc_stride=6 max_query_length=8")
  data = app.encode(_rows(), ctx, with_labels=True)
  tok = ctx.tokenizer
  assert (np.bincount(data["feature_row"]) > 1).all()  # long contexts: several windows
  for i, (_, _, answer, _) in enumerate(ROWS):
    feats = np.flatnonzero(data["feature_row"] == i)
    found = [f for f in feats if data["labels"][f, 0] > 0]
    assert found  # some window holds the whole answer
    for f in feats:
      s, e = data["labels"][f]
      if s == 0:
        assert e == 0
        continue
      assert data["token_type_ids"][f, s] == 1  # inside the context part
      assert tok.decode(data["input_ids"][f, s:e + 1]).replace(" ", "") == \
          answer.replace(" ", "")


def test_hae_marks_tokens_of_earlier_answers():
  app, ctx = _context("text_comprehension_bert_hae",
                      "doc_stride=6 max_query_length=8 history_column=history")
  data = app.encode(_rows(), ctx, with_labels=True)
  tok = ctx.tokenizer
  for i, (_, _, _, history) in enumerate(ROWS):
    marked = set()
    for f in np.flatnonzero(data["feature_row"] == i):
      types = data["token_type_ids"][f]
      assert set(types[data["attention_mask"][f] > 0]) <= {0, 1, 3}
      marked |= {tok.decode([t]) for t in data["input_ids"][f][types == 3]}
    want = {p for h in history.split("||") for p in tok.tokenize(h)}
    assert {m.replace("##", "") for m in marked} == {w.replace("##", "") for w in want}
