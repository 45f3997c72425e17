"""`etjax app`: EasyTransfer flags through the command line, gin run files, --help."""

import glob
import os

import pytest

from etjax import main
from etjax.apps import config, registry
from etjax.cli import configurables
from tests.apps import apps_testlib as lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
APP_RUNS = sorted(glob.glob(os.path.join(ROOT, "gin", "runs", "apps", "*.gin")))


def test_every_app_has_a_run_file():
  assert {os.path.basename(p)[:-4] for p in APP_RUNS} == set(registry.APPS)


@pytest.mark.parametrize("path", APP_RUNS, ids=[os.path.basename(p) for p in APP_RUNS])
def test_app_run_files_parse_and_say_their_command(path):
  with open(path) as f:
    header = f.read().split("\n\n")[0]
  assert header.startswith("#") and "etjax app --gin_file=gin/runs/apps/" in header
  main.bind_gin([os.path.relpath(path, ROOT)], [])
  bound = configurables.appzoo()
  assert set(bound) <= set(config.FLAG_NAMES)
  assert bound["modelName"] == os.path.basename(path)[:-4]
  app = registry.get_app(bound["modelName"])
  mode = "train" if app.trainable else "predict"
  cfg = config.AppConfig.from_flags({**bound, "mode": mode})
  app.check_flags(cfg)
  app.resolve_advanced(cfg.advanced_parameters)


def test_app_help_lists_every_app(capsys):
  assert main.run(["app", "--help"]) == 0
  out = capsys.readouterr().out
  for name in registry.APPS:
    assert f"  {name} " in out


def test_app_errors_exit_2_naming_the_flag(capsys, tmp_path):
  assert main.run(["app", "--mode=train", "--modelName=text_clasify_cnn",
                   f"--checkpointDir={tmp_path}"]) == 2
  assert "known apps: " in capsys.readouterr().err


@pytest.mark.slow
def test_app_trains_and_predicts_through_the_command_line(tmp_path, capsys):
  train = lib.write(tmp_path / "train.tsv", lib.sentiment_rows(2))
  ckpt = str(tmp_path / "ckpt")
  gin_file = tmp_path / "run.gin"
  gin_file.write_text("appzoo.modelName = 'text_classify_cnn'\n"
                      "appzoo.inputSchema = 'content:str:1,label:str:1'\n"
                      "appzoo.firstSequence = 'content'\n"
                      "appzoo.advancedParameters = 'embed_dim=16 filters=8 vocab_size=200'\n")
  assert main.run(["app", f"--gin_file={gin_file}", "--mode=train",
                   f"--inputTable={train}", "--labelName=label", "--batchSize=8",
                   "--sequenceLength=16", "--numEpochs=1", "--learningRate=0.01",
                   "--optimizerType=lamb", "--distributionStrategy=data=4,fsdp=2:fsdp",
                   f"--checkpointDir={ckpt}"]) == 0
  assert '"step": 2' in capsys.readouterr().out
  out = str(tmp_path / "out.tsv")
  assert main.run(["app", "--mode=predict", f"--checkpointDir={ckpt}",
                   f"--inputTable={train}", f"--outputTable={out}",
                   "--outputSchema=predictions", "--appendCols=label"]) == 0
  rows = lib.read(out)
  assert len(rows) == 16 and all(r[0] in ("neg", "pos") for r in rows)
  assert [r[1] for r in rows] == [l for _, l in lib.sentiment_rows(2)]
