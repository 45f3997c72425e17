"""Flag errors of the AppZoo name what is wrong (no training runs here)."""

import pytest

from etjax.apps import config, registry, runner
from tests.apps import apps_testlib as lib


def _train_flags(tmp_path, **changes):
  train = lib.write(tmp_path / "train.tsv", lib.sentiment_rows(1))
  flags = lib.flags(tmp_path, modelName="text_classify_bert", inputTable=train,
                    inputSchema="content:str:1,label:str:1", firstSequence="content",
                    labelName="label", labelEnumerateValues="neg,pos")
  flags.update(changes)
  return flags


def test_unknown_model_name_lists_the_known_apps(tmp_path):
  with pytest.raises(ValueError, match="text_clasify_bert.*known apps: .*"
                     "text_classify_bert.*text_match_dam"):
    runner.run_app(_train_flags(tmp_path, modelName="text_clasify_bert"))


def test_schema_column_not_in_the_file_is_named(tmp_path):
  with pytest.raises(ValueError, match="--firstSequence='text' is not a column of "
                     "--inputSchema \\(content, label\\)"):
    runner.run_app(_train_flags(tmp_path, firstSequence="text"))
  with pytest.raises(ValueError, match="--labelName='y'"):
    runner.run_app(_train_flags(tmp_path, labelName="y"))
  # A file with fewer columns than the schema names file and line.
  with pytest.raises(ValueError, match="train.tsv:1: 2 columns, but --inputSchema has 3"):
    runner.run_app(_train_flags(tmp_path, inputSchema="id:str:1,content:str:1,label:str:1"))


def test_label_absent_from_label_enumerate_values_names_file_and_line(tmp_path):
  with pytest.raises(ValueError, match="train.tsv:5: label 'neg' .*not in "
                     "--labelEnumerateValues \\(pos,other\\)"):
    runner.run_app(_train_flags(tmp_path, labelEnumerateValues="pos,other"))


def test_second_sequence_for_a_single_sentence_app(tmp_path):
  with pytest.raises(ValueError, match="sequence_labeling_bert takes single sentences: "
                     "--secondSequence='label'"):
    runner.run_app(_train_flags(tmp_path, modelName="sequence_labeling_bert",
                                secondSequence="label"))
  with pytest.raises(ValueError, match="text_match_dam .* needs --secondSequence"):
    runner.run_app(_train_flags(tmp_path, modelName="text_match_dam"))


def test_unknown_advanced_parameter_and_flag_are_named(tmp_path):
  with pytest.raises(ValueError, match="unknown keys \\['lstm_sise'\\]"):
    runner.run_app(_train_flags(tmp_path, modelName="sequence_labeling_bert_bilstm_crf",
                                advancedParameters="lstm_sise=4"))
  with pytest.raises(ValueError, match="unknown app flags \\['learning_rate'\\]"):
    config.AppConfig.from_flags({"mode": "train", "modelName": "x",
                                 "learning_rate": 1})
  with pytest.raises(ValueError, match="--optimizerType='sgd'"):
    runner.run_app(_train_flags(tmp_path, optimizerType="sgd"))
  with pytest.raises(ValueError, match="--inputSchema='content:string:1,label:str:1': column 'content' has type 'string'"):
    runner.run_app(_train_flags(tmp_path, inputSchema="content:string:1,label:str:1"))


def test_predict_without_a_trained_model_says_so(tmp_path):
  with pytest.raises(ValueError, match="train_config.json is missing"):
    runner.run_app({"mode": "predict", "checkpointDir": str(tmp_path / "none"),
                    "inputTable": "x.tsv", "outputTable": "y.tsv"})


def test_schema_and_advanced_parsing():
  cols = config.parse_schema("a:str:1, ids:int:3")
  assert [(c.name, c.type, c.length) for c in cols] == [("a", "str", 1), ("ids", "int", 3)]
  assert config.parse_advanced("x=1 y=0.5;z=abc w=True") == {"x": 1, "y": 0.5,
                                                              "z": "abc", "w": True}
  flags = {"mode": "train", "modelName": "m", "checkpointDir": "c", "inputTable": "t",
           "inputSchema": "a:str:1,b:str:1", "firstSequence": "a", "appendCols": "b"}
  cfg = config.AppConfig.from_flags(flags)
  assert config.AppConfig.from_flags(cfg.to_flags()) == cfg


def test_every_app_has_a_one_line_description():
  lines = registry.describe_apps().splitlines()
  assert len(lines) == len(registry.APPS) >= 15
  for name, line in zip(sorted(registry.APPS), lines):
    assert line.split()[0] == name and len(line.split()) > 4
