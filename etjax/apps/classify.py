"""Text classification apps over a BERT-family encoder: single-label (softmax, the
plain fine-tuning TrainStep) and multi-label (one sigmoid per label)."""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np
import optax

from etjax import models
from etjax.algorithms.finetune import classifier_loss, model_inputs
from etjax.apps import base
from etjax.apps.metrics import multilabel_f1
from etjax.apps.table import Row
from etjax.train import metrics as metrics_lib


def encode_texts(rows: Sequence[Row], ctx: base.Context) -> dict:
  """[CLS] a [SEP] (b [SEP]) of --firstSequence (and --secondSequence): int32 [N, L]."""
  cfg = ctx.config
  text_a = [str(r.values[cfg.first_sequence]) for r in rows]
  text_b = ([str(r.values[cfg.second_sequence]) for r in rows]
            if cfg.second_sequence else None)
  return ctx.tokenizer.encode(text_a, text_b, max_length=cfg.sequence_length,
                              padding="max_length")


class TextClassifyBert(base.App):
  """Softmax classification of one text or a text pair over [CLS]."""
  name = "text_classify_bert"
  description = ("classify a text or a text pair with any ModelZoo/pretrained "
                 "encoder (softmax over --labelEnumerateValues)")

  def encode(self, rows, ctx, with_labels):
    labels = (base.label_ids(rows, ctx.config.label_name, ctx.labels) if with_labels
              else None)
    return {**encode_texts(rows, ctx), **base.batch_keys(len(rows), labels)}

  def build(self, ctx):
    encoder, params = base.bert_backbone(ctx)
    module = models.SequenceClassifier(encoder, num_labels=len(ctx.labels),
                                       dropout_rate=ctx.advanced["dropout"])
    return module, ({"encoder": params} if params is not None else None)

  def loss_fn(self, module, ctx):
    return classifier_loss(module)

  def metrics(self, outputs, data, rows, ctx):
    return metrics_lib.classification_metrics(outputs["logits"], data["labels"])

  def output_rows(self, outputs, data, rows, ctx):
    probs = base.softmax(outputs["logits"])
    return [{"predictions": ctx.labels[int(np.argmax(p))], "probabilities": p,
             "logits": l} for p, l in zip(probs, outputs["logits"])]


class TextClassifyBertMultiLabel(TextClassifyBert):
  """Several labels per row (comma-separated in the label column): a sigmoid per
  label, binary cross-entropy, micro/macro-F1."""
  name = "text_classify_bert_multilabel"
  description = ("multi-label classification: comma-separated labels per row, one "
                 "sigmoid per label, micro/macro-F1")
  advanced = {"threshold": 0.5}

  def label_vocab(self, rows, cfg):
    if cfg.label_enumerate_values:
      return tuple(cfg.label_enumerate_values)
    return tuple(sorted({l for r in rows for l in self._row_labels(r, cfg.label_name)}))

  @staticmethod
  def _row_labels(row: Row, column: str) -> list[str]:
    return [l.strip() for l in str(row.values[column]).split(",") if l.strip()]

  def encode(self, rows, ctx, with_labels):
    labels = np.zeros((len(rows), len(ctx.labels)), np.int32)
    if with_labels:
      index = {l: i for i, l in enumerate(ctx.labels)}
      for i, r in enumerate(rows):
        for l in self._row_labels(r, ctx.config.label_name):
          if l not in index:
            raise ValueError(f"{r.where}: label {l!r} (column "
                             f"{ctx.config.label_name!r}) is not in "
                             f"--labelEnumerateValues ({','.join(ctx.labels)})")
          labels[i, index[l]] = 1
    return {**encode_texts(rows, ctx), **base.batch_keys(len(rows), labels)}

  def loss_fn(self, module, ctx):
    def loss_fn(params, batch, rng, deterministic=False):
      out = module.apply({"params": params}, *model_inputs(batch),
                         deterministic=deterministic, rngs={"dropout": rng})
      targets_bk = batch["labels"].astype(jnp.float32)
      loss_b = optax.sigmoid_binary_cross_entropy(out.logits, targets_bk).mean(-1)
      weights_b = batch["weight"].astype(jnp.float32)
      loss = (loss_b * weights_b).sum() / jnp.maximum(weights_b.sum(), 1e-9)
      return loss, {"logits": out.logits}
    return loss_fn

  def _decide(self, logits, ctx):
    probs = 1 / (1 + np.exp(-np.asarray(logits, np.float64)))
    return probs.astype(np.float32), probs >= ctx.advanced["threshold"]

  def metrics(self, outputs, data, rows, ctx):
    _, predicted = self._decide(outputs["logits"], ctx)
    return multilabel_f1(data["labels"], predicted)

  def output_rows(self, outputs, data, rows, ctx):
    probs, predicted = self._decide(outputs["logits"], ctx)
    return [{"predictions": ",".join(l for l, on in zip(ctx.labels, row) if on),
             "probabilities": p, "logits": l}
            for row, p, l in zip(predicted, probs, outputs["logits"])]
