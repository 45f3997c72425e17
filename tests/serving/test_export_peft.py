"""Export of a workdir that `etjax train` fine-tuned with transfer.peft: the exported
model is the one that trained (LoRA merged into the base weights, adapters and prompts
run by the PEFT transform), not the base model beside its unused PEFT parameters."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from etjax import main
from etjax.serving import export, loader
from tests.algorithms.test_peft_cli import TINY
from tests.serving.serving_testlib import TEXTS

# float32 compute, so that the export (float32 either way) and the Trainer's predict
# are the same arithmetic; a fast rate, so the PEFT parameters leave their init (LoRA's
# b starts at zero) and a base-only export would differ.
ARGS = [a for a in TINY if "num_steps" not in a] + [
    "--gin.train.compute_dtype='float32'", "--gin.train.num_steps=8",
    "--gin.optimizer.learning_rate=0.05"]
METHODS = {
    "lora": ["--gin.transfer.lora_rank=2", "--gin.transfer.lora_targets=['query', 'value']"],
    "adapter": ["--gin.transfer.adapter_size=8"],
    "prompt": ["--gin.transfer.prompt_length=4"],
}


def _trainer_probabilities(args: list, texts) -> np.ndarray:
  """The probabilities of the Trainer's predict, in the job the bindings assemble,
  restored from the workdir's latest checkpoint."""
  from etjax.cli import job_commands  # pylint: disable=g-import-not-at-top
  from etjax.data import pipeline  # pylint: disable=g-import-not-at-top
  from etjax.data.readers import Example  # pylint: disable=g-import-not-at-top
  main.bind_gin([], [a[len("--gin."):].replace("=", " = ", 1) for a in args])
  job = job_commands._job()  # pylint: disable=protected-access
  examples = [Example(text_a=t, text_b=None, domain=0, label=0, label_str="")
              for t in texts]
  state = job.trainer.restore(job.encode(examples))
  return job.trainer.predict(state, pipeline.eval_batches(job.encode(examples),
                                                          16))["probabilities"]


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_export_of_a_peft_workdir_equals_trainer_predict(method, tmp_path, capsys):
  workdir = str(tmp_path / method)
  args = ARGS + [f"--gin.train.workdir='{workdir}'",
                 f"--gin.transfer.peft='{method}'"] + METHODS[method]
  assert main.run(["train"] + args) == 0, capsys.readouterr().err
  with open(os.path.join(workdir, "peft_config.json")) as f:
    assert json.load(f)["method"] == method
  version = export.export_workdir(workdir, str(tmp_path / "export"), best_metric=None,
                                  platforms=("cpu",))
  with open(os.path.join(version, "manifest.json")) as f:
    source = json.load(f)["source"]
  assert source["peft"] == method
  # LoRA is folded into the kernels: the export holds no LoRA factor.
  names = list(np.load(os.path.join(version, export.WEIGHTS)).keys())
  assert (not any("lora_" in n for n in names)) if method == "lora" else any(
      ("adapter" if method == "adapter" else "prompt") in n for n in names)
  got = loader.load_export(str(tmp_path / "export")).predict(list(TEXTS))
  want = _trainer_probabilities(args, TEXTS)
  np.testing.assert_allclose(got["probabilities"], want, rtol=1e-5, atol=1e-6)
  if method != "lora":  # the PEFT module in another compute dtype
    export.export_workdir(workdir, str(tmp_path / "bf16"), best_metric=None,
                          platforms=("cpu",), dtype="bfloat16")
    bf16 = loader.load_export(str(tmp_path / "bf16")).predict(list(TEXTS))
    np.testing.assert_allclose(bf16["probabilities"], want, atol=1e-2)


def test_bad_peft_config_is_named(tmp_path):
  from etjax.jobs import trained  # pylint: disable=g-import-not-at-top
  assert trained.load_peft_config(str(tmp_path)) is None
  path = tmp_path / "peft_config.json"
  path.write_text(json.dumps({"method": "lora", "lora_rank": 0}))
  with pytest.raises(ValueError, match=f"{path}.*lora_rank"):
    trained.load_peft_config(str(tmp_path))
  path.write_text("{")
  with pytest.raises(ValueError, match=f"{path}: not readable JSON"):
    trained.load_peft_config(str(tmp_path))


def test_checkpoint_with_parameters_the_model_lacks_is_refused(tmp_path, capsys):
  """A PEFT workdir without its peft_config.json (written before it was recorded) is
  refused, naming the workdir and the parameters the rebuilt model would drop."""
  workdir = str(tmp_path / "lora")
  args = [a for a in TINY if "num_steps" not in a] + [
      "--gin.train.num_steps=1", f"--gin.train.workdir='{workdir}'",
      "--gin.transfer.peft='lora'", "--gin.transfer.lora_rank=2"]
  assert main.run(["train"] + args) == 0, capsys.readouterr().err
  # A resumed run checks its PEFT settings against the saved ones.
  assert main.run(["train"] + args) == 0, capsys.readouterr().err
  assert main.run(["train"] + args + ["--gin.transfer.lora_alpha=4.0"]) == 2
  assert "peft_config.json differs from this run's: lora_alpha: 16.0 saved, 4.0 now" in (
      capsys.readouterr().err)
  os.remove(os.path.join(workdir, "peft_config.json"))
  with pytest.raises(ValueError, match=r"(?s)" + re.escape(workdir) +
                     ".*lora_a.*PEFT parameters"):
    export.export_workdir(workdir, str(tmp_path / "export"), platforms=("cpu",))
  assert not os.path.exists(tmp_path / "export")
