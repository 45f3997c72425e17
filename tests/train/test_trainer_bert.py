"""A tiny BERT fine-tuned through `etjax.algorithms.finetune` by the Trainer: the same 5
steps on 1 device, on 8 devices with 'dp', and on a data=2 x model=4 mesh with 'tp'
give the same losses."""

from __future__ import annotations

import os

import jax
import numpy as np

from etjax import algorithms, models
from etjax.sharding.mesh import make_mesh
from etjax.train import logging as log_lib
from etjax.train.trainer import Trainer


class _PairBatches:
  """Sentence-pair batches of random tokens with padding; resumable position."""

  def __init__(self, batch=8, length=12, vocab=64, classes=3, seed=0):
    self.shape, self.vocab, self.classes, self.seed = (batch, length), vocab, classes, seed
    self.index = 0

  def __iter__(self):
    return self

  def __next__(self):
    rng = np.random.default_rng([self.seed, self.index])
    self.index += 1
    batch, length = self.shape
    lengths = rng.integers(length // 2, length + 1, batch)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    types = (np.arange(length)[None] >= (lengths // 2)[:, None]).astype(np.int32) * mask
    return {"input_ids": rng.integers(1, self.vocab, self.shape).astype(np.int32) * mask,
            "attention_mask": mask, "token_type_ids": types,
            "labels": rng.integers(0, self.classes, batch).astype(np.int32),
            "weight": np.ones(batch, np.float32)}

  def get_state(self):
    return {"index": self.index}

  def set_state(self, state):
    self.index = int(state["index"])


def _losses(workdir):
  return [r["loss"] for r in log_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
          if r["split"] == "train"]


def test_bert_finetune_losses_match_across_meshes(tmp_path):
  config = models.get_config("bert-tiny", vocab_size=64, hidden_size=32, num_layers=2,
                             num_heads=4, intermediate_size=64, max_position_embeddings=16)
  model = models.SequenceClassifier(models.module_for(config), num_labels=3)
  tx = algorithms.make_optimizer("adamw", learning_rate=1e-3, warmup_steps=1,
                                 total_steps=5)
  step = algorithms.finetune(model, tx)
  layouts = {"one": (make_mesh({"data": 1}, devices=jax.devices()[:1]), "dp"),
             "dp": (make_mesh({"data": 8}), "dp"),
             "tp": (make_mesh({"data": 2, "model": 4}), "tp")}
  losses = {}
  for name, (mesh, rules) in layouts.items():
    trainer = Trainer(step, workdir=str(tmp_path / name), num_steps=5, mesh=mesh,
                      rules=rules, log_every=1, progress=False, tensorboard=False)
    result = trainer.fit(_PairBatches())
    losses[name] = _losses(tmp_path / name)
    assert result.step == 5
  assert len(losses["one"]) == 4 and all(np.isfinite(losses["one"]))
  assert losses["one"][-1] != losses["one"][0]  # the parameters did move
  np.testing.assert_allclose(losses["dp"], losses["one"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(losses["tp"], losses["one"], rtol=1e-5, atol=1e-6)
