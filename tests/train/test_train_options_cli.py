"""`etjax train` speed options: train.num_epochs (exclusive with num_steps) sets
ceil(N / batch) updates per epoch; the job's batches are length-bucketed and its model
computes in train.compute_dtype."""

from __future__ import annotations

import pytest

from etjax import main
from etjax.cli import configurables, job_commands
from etjax.jobs import runs

TINY = ["data.source = 'synthetic'", "data.train_size = 5", "data.eval_size = 2",
        "classifier.model = 'bert-tiny'", "classifier.pretrained = None",
        "classifier.vocab_size = 300",
        "classifier.overrides = {'num_layers': 1, 'hidden_size': 32, 'num_heads': 2, "
        "'intermediate_size': 64}", "train.batch_size = 8", "train.max_length = 48",
        "train.progress = False", "train.compilation_cache = None"]


def test_num_epochs_sets_the_steps_and_excludes_num_steps(tmp_path):
  main.bind_gin([], TINY + [f"train.workdir = '{tmp_path}'", "train.num_epochs = 3"])
  trainer, splits, _, encode, run = job_commands._job()[:5]  # pylint: disable=protected-access
  assert len(splits.train) == 20  # 5 per domain, 4 domains
  assert run["num_steps"] == trainer.num_steps == 3 * 3  # ceil(20 / 8) = 3 per epoch
  assert trainer.train_step is not None
  main.bind_gin([], TINY + [f"train.workdir = '{tmp_path}'", "train.num_epochs = 2",
                            "train.num_steps = 5"])
  with pytest.raises(ValueError, match="set one of the two, not both"):
    configurables.train()
  main.bind_gin([], TINY + [f"train.workdir = '{tmp_path}'", "train.num_epochs = 0"])
  with pytest.raises(ValueError, match="num_epochs = 0"):
    configurables.train()
  main.bind_gin([], TINY + [f"train.workdir = '{tmp_path}'"])
  assert configurables.train()["num_steps"] == 100  # neither: the old default
  # The bucket lengths the job's batches are cut to.
  assert runs.buckets(configurables.train()) == (16, 24, 40, 48)
  data = encode(splits.train)
  assert data["input_ids"].shape[1] == 48


def test_compute_dtype_reaches_the_model_and_classifier_overrides_win(tmp_path,
                                                                     monkeypatch):
  modules = []
  build = runs.fine_tune_trainer
  monkeypatch.setattr(runs, "fine_tune_trainer",
                      lambda module, *a: modules.append(module) or build(module, *a))
  base = TINY[:-1] + ["train.compilation_cache = None", f"train.workdir = '{tmp_path}'"]
  for extra, expected in (([], "bfloat16"),
                          (["train.compute_dtype = 'float32'"], "float32"),
                          (["classifier.overrides = {'num_layers': 1, 'hidden_size': 32,"
                            " 'num_heads': 2, 'intermediate_size': 64, 'dtype': "
                            "'float32'}"], "float32")):
    main.bind_gin([], base + extra)
    job_commands._job()  # pylint: disable=protected-access
    config = modules[-1].encoder.config
    assert (config.dtype, config.param_dtype) == (expected, "float32"), extra
