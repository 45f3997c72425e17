"""Issue 16: the command line under faults and bad input. A tokenizer saved once and
reused, assets never overwritten, one writer per workdir, NaN stops that keep only
finite checkpoints, one-line errors, predict rows that line up with the input."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from etjax import main
from etjax.train import workdir as workdir_lib

from test_main import ROOT, TINY


def _args(workdir, *extra):
  return TINY + [f"--gin.train.workdir='{workdir}'", *extra]


def _snapshot(directory):
  """{relative path: bytes} of every file under `directory`."""
  out = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = f.read()
  return out


def _saved_state(step_dir):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp.StandardCheckpointer().restore(os.path.join(step_dir, "state"))


def _leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 4-step tiny run (checkpoints at 2 and 4) with a built WordPiece tokenizer."""
  workdir = str(tmp_path_factory.mktemp("cli") / "run")
  assert main.run(["train"] + _args(workdir, "--gin.train.checkpoint_every=2")) == 0
  return workdir


def _error(capsys):
  err = capsys.readouterr().err
  assert "Traceback" not in err, err
  return err.strip().splitlines()[-1]


# --- 1. one tokenizer, saved once -----------------------------------------------------


def test_train_saves_the_tokenizer_labels_and_schema(trained):
  for rel in ("tokenizer/tokenizer.json", "labels.json", "schema.json"):
    assert os.path.exists(os.path.join(trained, rel)), rel
  assert json.load(open(os.path.join(trained, "labels.json"))) == ["negative", "positive"]
  assert json.load(open(os.path.join(trained, "schema.json")))["pairs"] is False


@pytest.mark.slow
def test_eval_gives_identical_metrics_in_three_processes(trained):
  command = [sys.executable, "-m", "etjax.main", "eval"] + _args(trained)
  procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT) for _ in range(3)]
  outs = [p.communicate(timeout=600) for p in procs]
  assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
  lines = [o[0].strip().splitlines()[-1] for o in outs]
  assert lines[0].startswith("accuracy=") and lines[0] == lines[1] == lines[2]


def test_kill_and_resume_ends_bit_identical(trained, tmp_path, capsys):
  # A copy of the run as a kill after step 2 leaves it: step 4 gone, tokenizer kept.
  resumed = str(tmp_path / "resumed")
  shutil.copytree(trained, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
  assert main.run(["train"] + _args(resumed, "--gin.train.checkpoint_every=2")) == 0
  assert "resumed from step 2" in capsys.readouterr().out
  want = _leaves(_saved_state(os.path.join(trained, "checkpoints", "4")))
  got = _leaves(_saved_state(os.path.join(resumed, "checkpoints", "4")))
  assert len(want) == len(got)
  for a, b in zip(want, got):
    np.testing.assert_array_equal(a, b)


# --- 2. a failed train leaves the workdir as it was ------------------------------------


WIDER = ("--gin.classifier.overrides={'num_layers': 1, 'hidden_size': 48, "
         "'num_heads': 2, 'intermediate_size': 64}")


@pytest.mark.parametrize("change, names", [
    ("--gin.data.synthetic_task='paraphrase'", "labels.json"),
    (WIDER, "model.json differs from this run's: config.hidden_size: 32 saved, 48 now"),
])
def test_a_refused_train_leaves_every_file_byte_identical(trained, capsys, change,
                                                          names):
  before = _snapshot(trained)
  assert main.run(["train"] + _args(trained) + [change]) == 2
  assert names in _error(capsys)
  assert _snapshot(trained) == before


def test_checkpoints_of_another_model_are_named_before_any_write(trained, tmp_path,
                                                                 capsys):
  # A workdir whose assets say nothing about the model (model.json absent): the
  # checkpoint's own shapes still refuse the wider model, naming an array.
  copy = str(tmp_path / "copy")
  shutil.copytree(trained, copy)
  os.remove(os.path.join(copy, "model.json"))
  before = _snapshot(copy)
  assert main.run(["train"] + _args(copy) + [WIDER]) == 2
  message = _error(capsys)
  assert "belong to another model or optimizer" in message and "saved" in message
  assert _snapshot(copy) == before


def test_assets_differing_from_the_saved_ones_are_named(tmp_path):
  from etjax.data import tokenizers  # pylint: disable=g-import-not-at-top
  from etjax.train import assets  # pylint: disable=g-import-not-at-top
  tok = tokenizers.build_wordpiece_tokenizer(["a b c", "a b"], 20)
  other = tokenizers.build_wordpiece_tokenizer(["x y z", "x y"], 20)
  written = assets.save(str(tmp_path), assets.job_files(tok, ["neg", "pos"]))
  assert len(written) == 3
  before = _snapshot(str(tmp_path))
  with pytest.raises(assets.AssetMismatchError, match=r"labels.json .*\"neg\", \"pos\""):
    assets.save(str(tmp_path), assets.job_files(tok, ["neg", "neutral", "pos"]))
  with pytest.raises(assets.AssetMismatchError, match="vocabulary of .* id 5 is"):
    assets.save(str(tmp_path), assets.job_files(other, ["neg", "pos"]))
  assert _snapshot(str(tmp_path)) == before
  assert assets.save(str(tmp_path), assets.job_files(tok, ["neg", "pos"])) == []


# --- 3. one writer per workdir ---------------------------------------------------------

_HOLD = """
import sys, time
from etjax.train import workdir
with workdir.lock(sys.argv[1], command='holder'):
  print('held', flush=True)
  time.sleep(120)
"""


def test_a_second_trainer_is_refused_and_a_dead_holders_lock_taken_over(tmp_path,
                                                                        capsys):
  run_dir = str(tmp_path / "run")
  holder = subprocess.Popen([sys.executable, "-c", _HOLD, run_dir],
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    assert main.run(["train"] + _args(run_dir)) == 2
    message = _error(capsys)
    assert f"pid {holder.pid}" in message and "started" in message, message
    assert workdir_lib.holder(run_dir)["pid"] == holder.pid
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  # The holder died without cleaning up: its note is still in the file, the lock not.
  assert json.load(open(os.path.join(run_dir, workdir_lib.LOCK_FILE)))["pid"] == holder.pid
  assert workdir_lib.holder(run_dir) is None
  with workdir_lib.lock(run_dir, command="me") as note:
    assert note["pid"] == os.getpid() and workdir_lib.holder(run_dir) == note
    with pytest.raises(workdir_lib.WorkdirLockedError, match=f"pid {os.getpid()} "):
      with workdir_lib.lock(run_dir):
        pass
  assert workdir_lib.holder(run_dir) is None


# --- 4. NaN stops ------------------------------------------------------------------------


@pytest.mark.slow
def test_a_diverging_run_stops_non_zero_and_keeps_only_finite_checkpoints(tmp_path,
                                                                          capsys):
  run_dir = str(tmp_path / "nan")
  code = main.run(["train"] + _args(run_dir, "--gin.optimizer.learning_rate=1e12",
                                    "--gin.optimizer.max_grad_norm=1e30",
                                    "--gin.optimizer.warmup_fraction=0.0",
                                    "--gin.train.checkpoint_every=1",
                                    "--gin.train.num_steps=12"))
  message = _error(capsys)
  assert code == 3 and "non-finite" in message and "training stopped" in message, message
  steps_dir = os.path.join(run_dir, "checkpoints")
  steps = [d for d in os.listdir(steps_dir) if d.isdigit()] if os.path.isdir(
      steps_dir) else []
  kept = re.search(r"checkpoint, step (\d+), is kept", message)
  assert kept and max(steps, key=int) == kept.group(1), (message, steps)
  for step in steps:
    for leaf in _leaves(_saved_state(os.path.join(steps_dir, step))):
      if np.issubdtype(leaf.dtype, np.floating):
        assert np.isfinite(leaf).all(), f"checkpoint {step} holds non-finite values"


# --- 5-7. user errors are one line -------------------------------------------------------


@pytest.mark.parametrize("extra, expected", [
    (["--gin.train.num_steps=abc"], "quotes"),
    (["--gin.train.workdir=runs/x"], "--gin.train.workdir=\"'runs/x'\""),
    (["--gin.train.num_steps=5.5"], "train.num_steps = 5.5: expected an integer"),
    (["--gin.classifier.pretrained='package:json'"], "ships no model weights"),
    (["--gin.data.synthetic_task='sentiment'", "--gin.data.domains=['books']",
      "--gin.data.train_size=1"], "one class"),
])
def test_bad_train_settings_fail_in_one_line(tmp_path, capsys, extra, expected):
  assert main.run(["train"] + _args(str(tmp_path / "w")) + extra) == 2
  assert expected in _error(capsys)


def test_a_workdir_that_cannot_be_written_fails_in_one_line(tmp_path, capsys):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  assert main.run(["train"] + _args(str(blocker / "run"))) == 2
  message = _error(capsys)
  assert "Not a directory" in message and str(blocker / "run") in message


def test_predict_and_eval_errors_are_named_before_any_work(trained, tmp_path, capsys):
  inputs = tmp_path / "in.tsv"
  inputs.write_text("a text\n")
  missing_dir = str(tmp_path / "nowhere" / "out.tsv")
  assert main.run(["predict", "--input", str(inputs), "--output", missing_dir] +
                  _args(trained)) == 2
  assert "does not exist" in _error(capsys)
  assert main.run(["predict", "--input", str(tmp_path / "nope.tsv"), "--output",
                   str(tmp_path / "o.tsv")] + _args(trained)) == 2
  assert "nope.tsv: no such file" in _error(capsys)
  assert main.run(["eval"] + _args(str(tmp_path / "empty"))) == 2
  assert "no checkpoint" in _error(capsys)


@pytest.mark.parametrize("extra, expected", [
    (["--batch", "0"], "--batch must be a positive integer"),
    (["--batch=-4"], "--batch must be a positive integer"),
    (["--length", "0"], "--length must be a positive integer"),
    (["--device_memory_gib=-1"], "--device_memory_gib must be positive"),
    (["--pipeline", "2"], "expected STAGESxMICROBATCHES"),
    (["--mesh", "data=2,model=0"], "axis 'model' has size 0"),
])
def test_plan_validates_its_flags(capsys, extra, expected):
  args = ["plan", "--model", "bert-mini", "--mesh", "data=2"] + extra
  assert main.run(args) == 2
  assert expected in _error(capsys)


# --- 6, 9. predict reads the trained schema and keeps one row per input row -------------


def test_predict_keeps_one_row_per_input_row(trained, tmp_path):
  inputs, outputs = tmp_path / "in.tsv", tmp_path / "out.tsv"
  inputs.write_text("the plot is gripping\n\n   \nthe kettle is flimsy\n")
  assert main.run(["predict", "--input", str(inputs), "--output", str(outputs)] +
                  _args(trained)) == 0
  rows = [line.split("\t") for line in outputs.read_text().splitlines()]
  assert rows[0] == ["line", "prediction", "probability"]
  assert [r[0] for r in rows[1:]] == ["1", "2", "3", "4"]
  assert rows[2][1:] == ["", ""] and rows[3][1:] == ["", ""]
  assert rows[1][1] in ("negative", "positive") and rows[4][1] in ("negative", "positive")


@pytest.mark.slow
def test_predict_reads_a_labelled_file_in_the_training_format(tmp_path, capsys):
  train_file, eval_file = tmp_path / "train.tsv", tmp_path / "dev.tsv"
  lines = ["id\tsentence\tgold"] + [
      f"{i}\t{'good great fine' if i % 2 else 'bad awful poor'} item {i}\t"
      f"{'pos' if i % 2 else 'neg'}" for i in range(16)]
  train_file.write_text("\n".join(lines) + "\n")
  eval_file.write_text("\n".join(lines[:9]) + "\n")
  run_dir = str(tmp_path / "run")
  args = [a for a in _args(run_dir) if not a.startswith(("--gin.data.source",
                                                         "--gin.data.train_size",
                                                         "--gin.data.eval_size"))]
  args += ["--gin.data.source='files'", f"--gin.data.train_path='{train_file}'",
           f"--gin.data.eval_path='{eval_file}'", "--gin.data.text_a='sentence'",
           "--gin.data.label='gold'"]
  assert main.run(["train"] + args) == 0, capsys.readouterr().err
  outputs = tmp_path / "out.tsv"
  # predict needs only the workdir: not the training data.
  train_file.unlink()
  # The dev file in the training format: header recognised, text read from 'sentence' only, the
  # id and the gold label carried through.
  assert main.run(["predict", "--input", str(eval_file), "--output", str(outputs)] +
                  args) == 0, capsys.readouterr().err
  rows = [line.split("\t") for line in outputs.read_text().splitlines()]
  assert rows[0] == ["line", "id", "gold", "prediction", "probability"]
  assert len(rows) == 9 and [r[0] for r in rows[1:]] == [str(i) for i in range(2, 10)]
  assert [r[2] for r in rows[1:]] == [l.split("\t")[2] for l in lines[1:9]]
  assert all(r[3] in ("neg", "pos") for r in rows[1:])


# --- 9, 10. help, gin files from anywhere ----------------------------------------------


def test_help_names_gin_usage_and_the_data_bindings(capsys):
  assert main.run(["--help"]) == 0
  out = capsys.readouterr().out
  for needle in ("--gin_file", "--gin.NAME=VALUE", "data.text_a", "data.label",
                 "data.train_path", "predict", "plan"):
    assert needle in out, needle
  assert main.run(["--helpfull"]) == 0
  full = capsys.readouterr().out
  assert "--gin_bindings" in full and "--verbosity" in full and "--xla_flag_preset" in full


def test_the_console_binary_fails_in_one_line_from_another_directory(tmp_path):
  # Through absl.app (python -m etjax.main): a user's gin file elsewhere includes
  # etjax's dp.gin; no 'Path not found' noise, one line, no traceback, exit 2.
  (tmp_path / "mine.gin").write_text("include 'gin/meshes/dp.gin'\n"
                                     "train.workdir = 'w'\n")
  out = subprocess.run([sys.executable, "-m", "etjax.main", "train",
                        "--gin_file=mine.gin", "--gin.train.num_steps=abc"],
                       capture_output=True, text=True, cwd=tmp_path)
  assert out.returncode == 2, out.stderr
  assert "Path not found" not in out.stderr and "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines()[-1].startswith("etjax train: error: gin binding "
                                                        "train.num_steps = abc")


@pytest.mark.slow
def test_a_non_editable_install_ships_gin_and_resolves_includes(tmp_path):
  source = tmp_path / "src"
  source.mkdir()
  for name in ("setup.py", "setup.cfg", "pyproject.toml", "MANIFEST.in", "README.md"):
    shutil.copy(os.path.join(ROOT, name), source / name)
  for name in ("etjax", "gin"):
    shutil.copytree(os.path.join(ROOT, name), source / name,
                    ignore=shutil.ignore_patterns("__pycache__"))
  site = tmp_path / "site"
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                  "--no-build-isolation", "--target", str(site), str(source)],
                 check=True, capture_output=True)
  assert (site / "etjax" / "gin" / "meshes" / "dp.gin").exists()
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  (elsewhere / "mine.gin").write_text("include 'gin/meshes/dp.gin'\nmesh.spec = "
                                      "'data=2'\n")
  probe = ("import etjax, gin; from etjax import main; "
           "main.bind_gin(['mine.gin', 'gin/runs/demo.gin'], []); "
           "print(etjax.__file__); print(gin.query_parameter('mesh.rules'))")
  out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                       cwd=elsewhere, check=True,
                       env={**os.environ, "PYTHONPATH": str(site)})
  path, rules = out.stdout.strip().splitlines()[-2:]
  assert path.startswith(str(site)) and rules == "dp"
  assert "Path not found" not in out.stderr
