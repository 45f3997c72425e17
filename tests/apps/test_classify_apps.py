"""text_classify_bert and its multi-label variant: train, evaluate, predict, export."""

import json
import os

import numpy as np
import pytest

from etjax.apps import runner
from tests.apps import apps_testlib as lib


@pytest.mark.slow
def test_text_classify_bert_train_evaluate_predict_export(tmp_path):
  train = lib.write(tmp_path / "train.tsv", lib.sentiment_rows(4))
  dev = lib.write(tmp_path / "dev.tsv", lib.sentiment_rows(1))
  base = lib.flags(tmp_path, modelName="text_classify_bert",
                   inputSchema="content:str:1,label:str:1", firstSequence="content",
                   labelName="label", labelEnumerateValues="neg,pos", numEpochs=2.0)
  metrics = runner.run_app({**base, "inputTable": f"{train},{dev}"})
  assert metrics["step"] == 8 and "eval_accuracy" in metrics
  ckpt = base["checkpointDir"]
  for name in ("train_config.json", "label_mapping.json", "tokenizer"):
    assert lib.exists(ckpt, name)
  assert json.load(open(os.path.join(ckpt, "label_mapping.json")))["labels"] == ["neg",
                                                                                 "pos"]
  # evaluate restates nothing about the model and reproduces the end-of-training score.
  again = runner.run_app({"mode": "evaluate", "checkpointDir": ckpt, "inputTable": dev})
  assert again["accuracy"] == pytest.approx(metrics["eval_accuracy"], abs=1e-9)

  inputs = lib.write(tmp_path / "in.tsv", [("7", t) for t in lib.POSITIVE[:3]])
  out = str(tmp_path / "out.tsv")
  runner.run_app({"mode": "predict", "checkpointDir": ckpt, "inputTable": inputs,
                  "inputSchema": "id:str:1,content:str:1", "outputTable": out,
                  "appendCols": "id,content"})
  rows = lib.read(out)
  assert len(rows) == 3
  for row, text in zip(rows, lib.POSITIVE):
    assert row[0] in ("neg", "pos")
    probs = np.array(row[1].split(","), float)
    logits = np.array(row[2].split(","), float)
    assert probs.shape == (2,) and abs(probs.sum() - 1) < 1e-4
    np.testing.assert_allclose(probs, np.exp(logits) / np.exp(logits).sum(), rtol=1e-4)
    assert row[0] == ["neg", "pos"][int(np.argmax(logits))]
    assert row[3:] == ["7", text]

  export_dir = runner.run_app({"mode": "export", "checkpointDir": ckpt,
                               "exportDirBase": str(tmp_path / "export")})
  assert os.path.basename(export_dir) == "1" and lib.exists(export_dir, "manifest.json")
  # The serving loader reproduces the app's predictions from the export.
  from etjax.serving import loader  # pylint: disable=g-import-not-at-top
  served = loader.load_export(export_dir).predict(lib.POSITIVE[:3])
  want = np.array([[float(v) for v in row[2].split(",")] for row in rows])
  np.testing.assert_allclose(served["logits"], want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_multilabel_app_trains_predicts_and_exports(tmp_path):
  rows = [(t, "pos,good") for t in lib.POSITIVE] + [(t, "neg") for t in lib.NEGATIVE]
  train = lib.write(tmp_path / "train.tsv", rows * 2)
  base = lib.flags(tmp_path, modelName="text_classify_bert_multilabel", inputTable=train,
                   inputSchema="content:str:1,labels:str:1", firstSequence="content",
                   labelName="labels")
  assert runner.run_app(base)["step"] == 2
  ckpt = base["checkpointDir"]
  assert json.load(open(os.path.join(ckpt, "label_mapping.json")))["labels"] == [
      "good", "neg", "pos"]
  scores = runner.run_app({"mode": "evaluate", "checkpointDir": ckpt, "inputTable": train})
  assert {"micro_f1", "macro_f1", "exact_set_accuracy"} <= set(scores)
  out = str(tmp_path / "out.tsv")
  runner.run_app({"mode": "predict", "checkpointDir": ckpt, "inputTable": train,
                  "outputTable": out})
  for row in lib.read(out):
    probs = np.array(row[1].split(","), float)
    logits = np.array(row[2].split(","), float)
    np.testing.assert_allclose(probs, 1 / (1 + np.exp(-logits)), rtol=1e-4)
    want = [l for l, p in zip(["good", "neg", "pos"], probs) if p >= 0.5]
    assert row[0] == ",".join(want)
  # Not a plain classifier: the app's own versioned export.
  first = runner.run_app({"mode": "export", "checkpointDir": ckpt,
                          "exportDirBase": str(tmp_path / "export")})
  second = runner.run_app({"mode": "export", "checkpointDir": ckpt,
                           "exportDirBase": str(tmp_path / "export")})
  assert [os.path.basename(first), os.path.basename(second)] == ["1", "2"]
  manifest = json.load(open(os.path.join(second, "manifest.json")))
  assert manifest["app"] == "text_classify_bert_multilabel"
  weights = np.load(os.path.join(second, "weights.npz"))
  assert manifest["num_parameters"] == sum(v.size for v in weights.values())
  assert lib.exists(second, "tokenizer", "tokenizer.json")
