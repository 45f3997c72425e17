"""A transfer run stopped mid-stage resumes there and ends with exactly the state of
an uninterrupted run, for one method of each family (baseline and meta: two stages,
stopped in the second; feature, instance, distillation: one stage) and the two-stage
distillation recipes (TinyBERT; AdaBERT, whose retraining reads the searched cells
back when it resumes)."""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import transfer_testlib
from etjax import main
from etjax.data import streams as streams_lib
from etjax.train import fit as fit_lib
from etjax.train.checkpoints import Checkpointer
from etjax.transfer import methods

# method -> the sub-directory of its last stage ('' for a one-stage method).
FAMILIES = {"finetune": "1_target", "drss": "", "rtl": "", "metaft": "1_target",
            "kd": "", "tinybert": "1_prediction", "adabert": "1_retrain"}


class _Stop(Exception):
  """The simulated kill."""


class _StopAfter:
  """Forwards an iterator (and its position) and raises on its `limit`-th batch."""

  def __init__(self, inner, limit: int):
    self.inner, self.limit, self.served = inner, limit, 0

  def __iter__(self):
    return self

  def __next__(self):
    self.served += 1
    if self.served >= self.limit:
      raise _Stop()
    return next(self.inner)

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  directory = tmp_path_factory.mktemp("resume")
  paths = transfer_testlib.write_files(str(directory))
  paths["bert"] = transfer_testlib.tiny_bert_dir(str(directory / "bert"))
  teacher = str(directory / "teacher")
  assert main.run(["train"] + _args(paths, teacher, None)) == 0
  paths["teacher"] = teacher
  return paths


def _args(files, workdir, method):
  args = [
      "--gin.data.source='files'", f"--gin.data.train_path='{files['train']}'",
      f"--gin.data.eval_path='{files['test']}'", f"--gin.data.dev_path='{files['dev']}'",
      "--gin.data.text_a='text'", "--gin.data.label='label'",
      "--gin.data.domain='domain'", "--gin.data.target_domains=['kitchen']",
      f"--gin.classifier.pretrained='{files['bert']}'", "--gin.train.num_steps=4",
      "--gin.train.batch_size=8", "--gin.train.max_length=12",
      "--gin.train.checkpoint_every=2", "--gin.train.keep_best_metric=None",
      "--gin.train.prefetch=0", "--gin.train.progress=False",
      f"--gin.train.workdir='{workdir}'"]
  if method:
    args.append(f"--gin.transfer.method='{method}'")
  if method == "drss":  # domain-blocked batches: 3 domains' blocks over 8 devices
    args.append("--gin.train.batch_size=24")
  if method == "adabert":  # one node per cell: the supernet's gradient compiles faster
    args.append("--gin.transfer.method_args={'AdaBertConfig.num_cells': 1, "
                "'AdaBertConfig.num_nodes': 1, 'AdaBertConfig.width': 16}")
  if method and methods.METHODS[method].needs_teacher:
    args.append(f"--gin.transfer.teacher='{files['teacher']}'")
  return args


def _final_state(directory: str) -> list:
  checkpointer = Checkpointer(os.path.join(directory, "checkpoints"))
  step = checkpointer.all_steps()[-1]
  checkpointer.close()
  with ocp.PyTreeCheckpointer() as reader:
    tree = reader.restore(os.path.join(directory, "checkpoints", str(step), "state"))
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.slow
@pytest.mark.parametrize("method", list(FAMILIES))
def test_stopped_run_resumes_to_the_uninterrupted_state(method, files, tmp_path,
                                                        monkeypatch, capsys):
  straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
  assert main.run(["train"] + _args(files, straight, method)) == 0
  stages = 2 if FAMILIES[method] else 1
  calls = []
  # drss trains on domain-blocked batches (streams.domain_blocked_stream).
  module, name = ((streams_lib, "domain_blocked_stream") if method == "drss"
                  else (fit_lib, "train_batches"))
  original = getattr(module, name)

  def stopping(*args, **kwargs):
    calls.append(1)
    batches = original(*args, **kwargs)
    # The last stage's 4th batch: its steps 1-3 ran, its step-2 checkpoint is saved.
    return _StopAfter(batches, 4) if len(calls) == stages else batches
  monkeypatch.setattr(module, name, stopping)
  with pytest.raises(_Stop):
    main.run(["train"] + _args(files, stopped, method))
  monkeypatch.setattr(module, name, original)
  assert main.run(["train"] + _args(files, stopped, method)) == 0
  assert "resumed from step 2" in capsys.readouterr().out
  want = _final_state(os.path.join(straight, FAMILIES[method]))
  got = _final_state(os.path.join(stopped, FAMILIES[method]))
  assert len(want) == len(got)
  for a, b in zip(want, got):
    np.testing.assert_array_equal(a, b)
