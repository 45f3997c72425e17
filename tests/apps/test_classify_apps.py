"""text_classify_bert and its multi-label variant: train, evaluate, predict, export."""

import json
import os

import numpy as np
import pytest

from etjax.apps import runner
from tests.apps import apps_testlib as lib


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
