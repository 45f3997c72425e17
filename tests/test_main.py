"""The `etjax` command line: gin parsing, errors, and train / eval / predict end to end."""

import glob
import os

import pytest

from etjax import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_FILES = sorted(glob.glob(os.path.join(ROOT, "gin", "runs", "*.gin")))

TINY = [
    "--gin.data.source='synthetic'", "--gin.data.train_size=24", "--gin.data.eval_size=8",
    "--gin.classifier.model='bert-tiny'", "--gin.classifier.pretrained=None",
    "--gin.classifier.vocab_size=400",
    "--gin.classifier.overrides={'num_layers': 1, 'hidden_size': 32, 'num_heads': 2, "
    "'intermediate_size': 64}",
    "--gin.train.num_steps=4", "--gin.train.batch_size=8", "--gin.train.max_length=24",
    "--gin.train.eval_batch_size=16", "--gin.train.progress=False",
    "--gin.mesh.spec='data=-1'", "--gin.mesh.rules='dp'",
]


@pytest.mark.parametrize("path", RUN_FILES, ids=[os.path.basename(p) for p in RUN_FILES])
def test_every_shipped_run_file_parses_and_says_its_command(path):
  with open(path) as f:
    header = f.read().split("\n\n")[0]
  assert "etjax " in header and header.startswith("#"), f"{path}: header lacks command"
  main.bind_gin([os.path.relpath(path, ROOT)], [])


ALGORITHM_FILES = sorted(glob.glob(os.path.join(ROOT, "gin", "algorithms", "*.gin")))


@pytest.mark.parametrize("path", ALGORITHM_FILES,
                         ids=[os.path.basename(p) for p in ALGORITHM_FILES])
def test_every_algorithm_file_binds_existing_parameters(path):
  # gin checks each binding against the registered function's signature.
  main.bind_gin([os.path.relpath(path, ROOT)], [])


def test_gin_args_are_split_t5x_style():
  files, bindings, rest = main.parse_gin_args(
      ["train", "--gin_file=a.gin", "--gin_file", "b.gin", "--gin.train.num_steps=3",
       "--input", "x"])
  assert files == ["a.gin", "b.gin"]
  assert bindings == ["train.num_steps = 3"]
  assert rest == ["train", "--input", "x"]


def test_misspelt_binding_is_named(capsys):
  assert main.run(["train", "--gin.trian.num_steps=3"]) == 2
  assert "trian" in capsys.readouterr().err
  assert main.run(["train", "--gin.train.num_stepz=3"]) == 2
  assert "num_stepz" in capsys.readouterr().err


def test_missing_gin_file_is_named(capsys):
  assert main.run(["train", "--gin_file=gin/runs/nope.gin"]) == 2
  assert "nope.gin" in capsys.readouterr().err


def test_train_eval_predict_end_to_end(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  args = TINY + [f"--gin.train.workdir='{workdir}'"]
  assert main.run(["train"] + args) == 0
  out = capsys.readouterr().out
  assert "step 4: accuracy=" in out
  assert os.path.exists(os.path.join(workdir, "config.gin"))
  assert "train.num_steps = 4" in open(os.path.join(workdir, "config.gin")).read()

  assert main.run(["eval"] + args) == 0
  eval_out = capsys.readouterr().out
  # Evaluating the restored checkpoint reproduces the end-of-training metrics.
  assert out.split("accuracy=")[1].split(",")[0] in eval_out

  inputs, outputs = tmp_path / "in.tsv", tmp_path / "out.tsv"
  inputs.write_text("the plot is gripping , i love it\nthe kettle is flimsy , avoid it\n")
  assert main.run(["predict", "--input", str(inputs), "--output", str(outputs)] + args) == 0
  lines = outputs.read_text().splitlines()
  # One row per input row, keyed by input line; the texts are not repeated.
  assert lines[0].split("\t") == ["line", "prediction", "probability"]
  assert len(lines) == 3
  assert [line.split("\t")[0] for line in lines[1:]] == ["1", "2"]
  assert all(line.split("\t")[1] in ("negative", "positive") for line in lines[1:])


def test_pipelined_training_reports_the_bubble_fraction(tmp_path, capsys):
  import json  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "pipe")
  overrides = ("--gin.classifier.overrides={'num_layers': 2, 'hidden_size': 32, "
               "'num_heads': 2, 'intermediate_size': 64, 'pipeline_stages': 2, "
               "'pipeline_microbatches': 2}")
  args = [a for a in TINY if "overrides" not in a and "mesh" not in a and
          "batch_size=" not in a]
  args += [overrides, "--gin.train.batch_size=16", "--gin.train.num_steps=2",
           "--gin.mesh.spec='stage=2,data=-1'", "--gin.mesh.rules='3d'",
           f"--gin.train.workdir='{workdir}'"]
  assert main.run(["train"] + args) == 0, capsys.readouterr().err
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  pipeline = [r for r in records if r["split"] == "pipeline"]
  assert pipeline and pipeline[0]["bubble_fraction"] == pytest.approx((2 - 1) / (2 + 2 - 1))


def test_plan_command_counts_the_real_models_parameters():
  """`etjax plan --json` for a zoo model (in a subprocess: it re-executes itself with the
  mesh's fake devices) against the parameters of the initialised model."""
  import json  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from etjax import models  # pylint: disable=g-import-not-at-top

  out = subprocess.run(
      [sys.executable, "-m", "etjax.main", "plan", "--model", "bert-mini",
       "--mesh", "data=2,fsdp=2", "--rules", "fsdp", "--batch", "4", "--length", "32",
       "--dtype", "float32", "--device_memory_gib", "1", "--json"],
      capture_output=True, text=True, check=True, cwd=ROOT)
  plan = json.loads(out.stdout.strip().splitlines()[-1])["plan"]
  classifier = models.SequenceClassifier(models.create_model("bert-mini"), num_labels=2)
  variables = jax.eval_shape(lambda: classifier.init(jax.random.PRNGKey(0),
                                                     np.zeros((1, 8), np.int32)))
  expected = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables))
  assert plan["parameter_count"] == expected
  # fsdp over 2 devices: every parameter byte is held once per 2 devices, except
  # dimensions left replicated; never more than the whole.
  assert plan["parameter_bytes"] <= 4 * expected
  assert plan["fits"] is True
