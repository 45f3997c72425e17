"""Every transfer method on the user's files road: `etjax train` with
transfer.method on TSV files (two source domains, one target) and a tiny random BERT
saved as a Hugging Face directory, then `etjax eval` and `etjax predict` on its
workdir; bad roles fail clearly."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

import transfer_testlib
from etjax import main
from etjax.transfer import methods

SOURCE_FREE = ("target_only", "metaft")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  directory = tmp_path_factory.mktemp("transfer")
  paths = transfer_testlib.write_files(str(directory))
  paths["bert"] = transfer_testlib.tiny_bert_dir(str(directory / "bert"))
  return paths


@pytest.fixture(scope="module")
def teacher(files, tmp_path_factory):
  """The workdir of a plain `etjax train` run on the same files: the teacher."""
  workdir = str(tmp_path_factory.mktemp("teacher") / "run")
  args = [a for a in _args(files, workdir, "none") if "transfer.method" not in a]
  assert main.run(["train"] + args) == 0
  return workdir


def _args(files, workdir, method, *extra):
  return [
      "--gin.data.source='files'", f"--gin.data.train_path='{files['train']}'",
      f"--gin.data.eval_path='{files['test']}'", "--gin.data.text_a='text'",
      "--gin.data.label='label'", "--gin.data.domain='domain'",
      "--gin.data.target_domains=['kitchen']",
      f"--gin.classifier.pretrained='{files['bert']}'",
      f"--gin.transfer.method='{method}'", "--gin.train.num_steps=3",
      "--gin.train.batch_size=8", "--gin.train.max_length=12",
      "--gin.train.eval_batch_size=16", "--gin.train.progress=False",
      f"--gin.train.workdir='{workdir}'", *extra]


def _accuracy(text: str) -> str:
  return re.search(r"accuracy=([0-9.]+)", text).group(1)


@pytest.mark.slow
@pytest.mark.parametrize("method", list(methods.METHODS))
def test_method_trains_evaluates_and_predicts_from_files(method, files, tmp_path,
                                                         capsys, request):
  workdir = str(tmp_path / method)
  extra = [f"--gin.data.dev_path='{files['dev']}'"]
  if methods.METHODS[method].needs_teacher:
    extra.append(f"--gin.transfer.teacher='{request.getfixturevalue('teacher')}'")
  if method == "metadtl":  # the cross-task source: the rows' topics as labels
    extra += [f"--gin.data.source_task_path='{files['train']}'",
              "--gin.data.source_task_label='domain'"]
  if method in ("sp", "sp_adv", "drss", "drss_adv"):  # 3 domain blocks, 8 devices
    extra.append("--gin.train.batch_size=24")
  if method == "ruder_plank":  # a search sized for 64 source rows
    extra.append("--gin.transfer.method_args={'num_selected': 20, 'num_trials': 2, "
                 "'train_steps': 2}")
  args = _args(files, workdir, method, *extra)
  assert main.run(["train"] + args) == 0, capsys.readouterr().err
  trained = capsys.readouterr().out.strip().splitlines()[-1]
  assert re.search(r"step 3: accuracy=.*macro_f1=.*auc=", trained), trained
  if method == "adabert":
    _check_adabert_hand_over(workdir)
  # The target model's checkpoint restores to the same metrics on the eval file.
  assert main.run(["eval"] + args) == 0, capsys.readouterr().err
  assert _accuracy(capsys.readouterr().out) == _accuracy(trained)
  outputs = tmp_path / "predictions.tsv"
  assert main.run(["predict", "--input", files["test"], "--output", str(outputs)]
                  + args) == 0, capsys.readouterr().err
  lines = outputs.read_text().splitlines()
  rows = open(files["test"]).read().splitlines()
  assert len(lines) == len(rows)  # a header row, then one row per input row
  assert {line.split("\t")[-2] for line in lines[1:]} <= {"negative", "positive"}


def _raw_state(directory: str) -> dict:
  """The latest checkpoint's state of a stage directory, as saved (numpy)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from etjax.train.checkpoints import Checkpointer  # pylint: disable=g-import-not-at-top
  checkpointer = Checkpointer(os.path.join(directory, "checkpoints"))
  step = checkpointer.all_steps()[-1]
  checkpointer.close()
  with ocp.PyTreeCheckpointer() as reader:
    return reader.restore(os.path.join(directory, "checkpoints", str(step), "state"))


@pytest.mark.slow
def test_metakd_student_distils_the_trained_meta_teacher(files, teacher, tmp_path,
                                                         capsys):
  workdir = tmp_path / "metakd"
  args = _args(files, str(workdir), "metakd", f"--gin.transfer.teacher='{teacher}'")
  assert main.run(["train"] + args) == 0, capsys.readouterr().err
  meta, student = (_raw_state(str(workdir / d)) for d in ("0_meta_teacher", "1_student"))
  # Stage 2's frozen teacher is stage 1's final meta-teacher, not the initial one.
  import jax  # pylint: disable=g-import-not-at-top
  for a, b in zip(jax.tree.leaves(student["teacher_params"]),
                  jax.tree.leaves(meta["params"]["model"]), strict=True):
    np.testing.assert_array_equal(a, b)
  # Its prototypes count every training row once, by (domain, class).
  rows = [line.split("\t") for line in open(files["train"]).read().splitlines()[1:]]
  domains, labels = ["books", "dvd", "kitchen"], ["negative", "positive"]
  want = np.zeros((3, 2))
  for _, label, domain in rows:
    want[domains.index(domain), labels.index(label)] += 1
  np.testing.assert_array_equal(student["counts_kc"], want)


def _cells_the_search_chose(alpha_eo, num_nodes: int = 3) -> dict[int, str]:
  """{edge: op} of the discrete cell, computed here from the searched alpha: per edge
  the non-zero op of largest weight, per node the 2 edges whose op weighs most (ties
  to the first, as the derivation's argmax and stable sort)."""
  from etjax.algorithms.adabert import OP_NAMES  # pylint: disable=g-import-not-at-top
  probs = np.exp(alpha_eo - alpha_eo.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  probs[:, OP_NAMES.index("zero")] = -1.0
  best = probs.argmax(-1)
  chosen, edge = {}, 0
  for node in range(num_nodes):
    edges = list(range(edge, edge + 2 + node))  # inputs s0, s1 and earlier nodes
    edge += len(edges)
    for e in sorted(edges, key=lambda e: -probs[e, best[e]])[:2]:
      chosen[e] = OP_NAMES[best[e]]
  return chosen


def _check_adabert_hand_over(workdir: str):
  """Stage 1 retrains exactly the cells stage 0's alpha chose (adabert.gin: 2 cells
  of 3 nodes), and the workdir records them."""
  import json  # pylint: disable=g-import-not-at-top
  search = _raw_state(os.path.join(workdir, "0_search"))
  alpha = np.asarray(search["params"]["student"]["alpha"], np.float64)
  assert alpha.shape == (9, 10) and np.ptp(alpha) > 0  # the search moved it
  chosen = _cells_the_search_chose(alpha)
  student = _raw_state(os.path.join(workdir, "1_retrain"))["params"]["student"]
  assert "alpha" not in student
  # Pooling and identity have no parameters, so only convolutions show.
  want = ({f"edge{e}_{op}" for e, op in chosen.items() if "conv" in op}
          | {"norm0", "norm1", "norm2"})
  for cell in ("cell0", "cell1"):
    assert set(student[cell]) == want, (sorted(student[cell]), sorted(want))
  with open(os.path.join(workdir, "adabert_architecture.json")) as f:
    recorded = json.load(f)["genotype"]
  assert recorded == [chosen.get(e, "zero") for e in range(9)]


def _fails(args, capsys, *messages):
  assert main.run(["train"] + args) == 2
  err = capsys.readouterr().err
  for message in messages:
    assert message in err, err


def test_bad_roles_fail_naming_what(files, tmp_path, capsys):
  workdir = str(tmp_path / "run")
  _fails(_args(files, workdir, "drss", "--gin.data.target_domains=['garden']"), capsys,
         "data.target_domains: ['garden'] not among the domains of data.train_path",
         "'books', 'dvd', 'kitchen'")
  _fails(_args(files, workdir, "mixed",
               "--gin.data.target_domains=['books', 'dvd', 'kitchen']"), capsys,
         "transfer.method = 'mixed' needs source rows")
  _fails(_args(files, workdir, "sp"), capsys,
         "train.batch_size = 8 does not split into 3 equal blocks, one per domain")
  _fails(_args(files, workdir, "ss"), capsys, "transfer.method = 'ss': unknown",
         "drss_adv")
  _fails(_args(files, workdir, "drss", "--gin.train.num_epochs=2"), capsys,
         "set one of the two")
  _fails(_args(files, workdir, "finetune", "--gin.transfer.method_args={'x': 1}"),
         capsys, "method 'finetune' takes no settings")
  _fails(_args(files, workdir, "ruder_plank"), capsys,
         "ruder_plank: num_selected = 700 for 61 source rows")
  _fails(_args(files, workdir, "kd"), capsys,
         "transfer.method = 'kd' needs transfer.teacher")
  _fails(_args(files, workdir, "metadtl"), capsys,
         "transfer.method = 'metadtl' needs data.source_task_path")
  _fails(_args(files, workdir, "kd", "--gin.transfer.teacher='/nonexistent/run'"),
         capsys, "transfer.teacher '/nonexistent/run': no such directory")
  assert not os.path.exists(workdir)  # nothing was written


def test_teacher_with_other_labels_is_refused(files, teacher, tmp_path, capsys):
  args = _args(files, str(tmp_path / "run"), "kd", f"--gin.transfer.teacher='{teacher}'")
  for split in ("train", "test"):
    relabelled = tmp_path / f"{split}.tsv"
    relabelled.write_text(open(files[split]).read().replace("\tpositive\t", "\tgood\t"))
    args = [a.replace(files[split], str(relabelled)) for a in args]
  _fails(args, capsys, f"transfer.teacher '{teacher}' was trained on labels "
         "['negative', 'positive']; this job's are ['good', 'negative']")


def test_methods_command_lists_every_method_with_its_settings(capsys):
  assert main.run(["methods"]) == 0
  out = capsys.readouterr().out
  for name in methods.METHODS:
    assert re.search(rf"^  {name} ", out, re.M), name
  assert "drss_weight" in out
