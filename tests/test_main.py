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


def test_a_job_assembles_from_plain_settings_as_from_gin(tmp_path):
  """etjax.jobs.runs needs no gin: the run of plain dicts is the run of the same
  settings bound through gin (steps, tokenizer, model config, Trainer options)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from etjax.cli import job_commands  # pylint: disable=g-import-not-at-top
  from etjax.jobs import runs, tasks  # pylint: disable=g-import-not-at-top
  bindings = [a[len("--gin."):].replace("=", " = ", 1) for a in TINY
              if "num_steps" not in a]
  main.bind_gin([], bindings + ["train.num_epochs = 2",
                                "train.compute_dtype = 'bfloat16'",
                                f"train.workdir = '{tmp_path / 'gin'}'"])
  from_gin = job_commands._job()  # pylint: disable=protected-access

  run = dict(workdir=str(tmp_path / "plain"), num_steps=None, num_epochs=2,
             batch_size=8, eval_batch_size=16, max_length=24, seed=0, eval_every=0,
             checkpoint_every=0, keep_best_metric="accuracy", log_every=10,
             progress=False, compute_dtype="bfloat16", length_buckets=4,
             group_by_length=16, compilation_cache="auto", prefetch=2)
  model = dict(model="bert-tiny", pretrained=None, random_init=False, dropout=0.1,
               vocab_size=400, overrides={"num_layers": 1, "hidden_size": 32,
                                          "num_heads": 2, "intermediate_size": 64})
  opt = dict(name="adamw", learning_rate=5e-5, warmup_fraction=0.1, weight_decay=0.01,
             max_grad_norm=1.0, new_params_learning_rate=None)
  splits = tasks.synthetic_splits(train_size=24, eval_size=8)
  plain = runs.assemble(runs.Settings(run=run, model=model, optimizer=opt,
                                      mesh=("data=-1", "dp"),
                                      transfer=dict(method=None, method_args={},
                                                    peft=None, teacher=None)), splits)

  # 24 rows in each of 4 domains: ceil(96 / 8) updates per epoch.
  assert plain.run["num_steps"] == from_gin.run["num_steps"] == 2 * 12
  assert plain.trainer.num_steps == from_gin.trainer.num_steps == 24
  assert plain.tokenizer.backend.get_vocab() == from_gin.tokenizer.backend.get_vocab()
  assert plain.module.encoder.config == from_gin.module.encoder.config
  assert plain.module.encoder.config.dtype == "bfloat16"  # train.compute_dtype
  assert [ex.text_a for ex in plain.splits.train] == [ex.text_a for ex in
                                                      from_gin.splits.train]
  batch = plain.encode(plain.splits.train[:2])
  np.testing.assert_array_equal(batch["input_ids"],
                                from_gin.encode(from_gin.splits.train[:2])["input_ids"])
  # The same Trainer options, and the same state (parameters and optimizer) to train.
  options = ("seed", "eval_every", "checkpoint_every", "log_every", "keep_best_metric",
             "progress", "prefetch", "pipeline", "rules")
  assert ([getattr(plain.trainer, o) for o in options] ==
          [getattr(from_gin.trainer, o) for o in options])
  assert plain.trainer.mesh.shape == from_gin.trainer.mesh.shape
  abstract = [jax.eval_shape(job.trainer.train_step.init, jax.random.key(0), batch)
              for job in (plain, from_gin)]
  assert jax.tree.structure(abstract[0]) == jax.tree.structure(abstract[1])
  assert jax.tree.leaves(abstract[0]) == jax.tree.leaves(abstract[1])


def test_predict_scores_with_the_model_that_trained(tmp_path, monkeypatch):
  """`etjax predict` runs the model in train.compute_dtype (bfloat16 here), as training
  and `etjax eval` do: its probabilities are the Trainer's predictions of the job the
  same bindings assemble, restored from the same checkpoint, not a float32 copy's."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from etjax.cli import job_commands  # pylint: disable=g-import-not-at-top
  from etjax.data import pipeline  # pylint: disable=g-import-not-at-top
  from etjax.data.readers import Example  # pylint: disable=g-import-not-at-top
  from etjax.jobs import runs  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  # A fast rate, so the probabilities leave 0.5 and a float32 copy's would differ.
  args = [a for a in TINY if "num_steps" not in a] + [
      f"--gin.train.workdir='{workdir}'", "--gin.train.compute_dtype='bfloat16'",
      "--gin.train.num_steps=30", "--gin.optimizer.learning_rate=0.01"]
  assert main.run(["train"] + args) == 0
  texts = ["the plot is gripping , i love it", "the kettle is flimsy , avoid it",
           "a calm , slow film", "it broke on day two"]
  inputs, outputs = tmp_path / "in.tsv", tmp_path / "out.tsv"
  inputs.write_text("".join(t + "\n" for t in texts))
  built = []
  classifier = runs.classifier
  monkeypatch.setattr(runs, "classifier", lambda num_labels, model, *a, **k: (
      built.append(model["overrides"].get("dtype")) or
      classifier(num_labels, model, *a, **k)))
  assert main.run(["predict", "--input", str(inputs), "--output", str(outputs)] + args) == 0
  assert built == ["bfloat16"]
  written = np.array([float(line.split("\t")[-1])
                      for line in outputs.read_text().splitlines()[1:]])

  main.bind_gin([], [a[len("--gin."):].replace("=", " = ", 1) for a in args])
  job = job_commands._job()  # pylint: disable=protected-access
  assert job.module.encoder.config.dtype == "bfloat16"
  examples = [Example(text_a=t, text_b=None, domain=0, label=0, label_str="")
              for t in texts]
  state = job.trainer.restore(job.encode(examples))
  out = job.trainer.predict(state, pipeline.eval_batches(job.encode(examples), 16))
  expected = out["probabilities"][np.arange(len(texts)), out["predictions"]]
  np.testing.assert_allclose(written, expected, atol=5e-5)  # written with 4 decimals
