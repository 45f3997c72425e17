"""`etjax train` with transfer.peft: LoRA fine-tunes from the command line."""

import glob
import os

from etjax import main

TINY = [
    "--gin.data.source='synthetic'", "--gin.data.train_size=24", "--gin.data.eval_size=8",
    "--gin.classifier.model='bert-tiny'", "--gin.classifier.pretrained=None",
    "--gin.classifier.vocab_size=400",
    "--gin.classifier.overrides={'num_layers': 1, 'hidden_size': 32, 'num_heads': 2, "
    "'intermediate_size': 64}",
    "--gin.train.num_steps=3", "--gin.train.batch_size=8", "--gin.train.max_length=24",
    "--gin.train.eval_batch_size=16", "--gin.train.progress=False",
    "--gin.mesh.spec='data=-1'", "--gin.mesh.rules='dp'",
]


def test_train_with_lora_from_the_command_line(tmp_path, capsys):
  workdir = str(tmp_path / "lora")
  args = TINY + [f"--gin.train.workdir='{workdir}'", "--gin.transfer.peft='lora'",
                 "--gin.transfer.lora_rank=2", "--gin.transfer.lora_targets=['value']"]
  assert main.run(["train"] + args) == 0, capsys.readouterr().err
  out = capsys.readouterr().out
  assert "step 3: accuracy=" in out
  assert "transfer.peft = 'lora'" in open(os.path.join(workdir, "config.gin")).read()
  # The checkpoint holds the LoRA factors (and Adam moments for them only).
  metadata = "".join(open(p, errors="ignore").read() for p in glob.glob(
      os.path.join(workdir, "checkpoints", "3", "state", "_METADATA")))
  assert "lora_a" in metadata and "lora_b" in metadata
  assert main.run(["eval"] + args) == 0
  assert out.split("accuracy=")[1].split(",")[0] in capsys.readouterr().out


def test_bad_peft_settings_are_named(capsys):
  assert main.run(["train"] + TINY + ["--gin.train.workdir='/tmp/unused'",
                                      "--gin.transfer.peft='bitfit'"]) == 2
  assert "transfer" in capsys.readouterr().err
