"""Text matching apps (sentence pairs -> a label) and TextCNN classification.

text_match_bert is the cross-encoder ([CLS] a [SEP] b [SEP], the classification
step); text_match_bert_two_tower embeds each side with one shared encoder (its
vectors are prediction outputs: --outputSchema vector_a,vector_b); the word-embedding
models (text_classify_cnn, text_match_bicnn, text_match_hcnn, text_match_dam,
text_match_damplus) learn a WordPiece vocabulary and embeddings from the training
table (etjax.models.matching).
"""

from __future__ import annotations

import jax.numpy as jnp

from etjax.algorithms.finetune import weighted_accuracy, weighted_cross_entropy
from etjax.apps import base
from etjax.apps.classify import TextClassifyBert
from etjax.models import matching

PAIR_INPUTS = ("input_ids", "attention_mask", "input_ids_b", "attention_mask_b")


def encode_sides(rows, ctx) -> dict:
  """Each side encoded on its own: input_ids/attention_mask (first), *_b (second)."""
  cfg, tok = ctx.config, ctx.tokenizer
  a = tok.encode([str(r.values[cfg.first_sequence]) for r in rows],
                 max_length=cfg.sequence_length)
  out = dict(a)
  if cfg.second_sequence:
    b = tok.encode([str(r.values[cfg.second_sequence]) for r in rows],
                   max_length=cfg.sequence_length)
    out.update(input_ids_b=b["input_ids"], attention_mask_b=b["attention_mask"])
  return out


def keyed_classifier_loss(module, keys):
  """Cross-entropy of a classifier called with the batch arrays `keys` (in order).
  aux: 'logits' [B, C], 'features' [B, F], 'accuracy'."""
  def loss_fn(params, batch, rng, deterministic=False):
    out = module.apply({"params": params}, *(batch[k] for k in keys),
                       deterministic=deterministic, rngs={"dropout": rng})
    w = batch["weight"]
    return (weighted_cross_entropy(out.logits, batch["labels"], w),
            {"logits": out.logits, "features": out.features,
             "accuracy": weighted_accuracy(out.logits, batch["labels"], w)})
  return loss_fn


class TextMatchBert(TextClassifyBert):
  name = "text_match_bert"
  description = "match a text pair with a cross-encoder ([CLS] a [SEP] b [SEP])"
  pair = "pair"


class TextMatchBertTwoTower(TextClassifyBert):
  name = "text_match_bert_two_tower"
  description = ("match a text pair with a shared (siamese) encoder; the two vectors "
                 "are outputs (vector_a, vector_b)")
  pair = "pair"
  model_inputs = PAIR_INPUTS
  output_columns = TextClassifyBert.output_columns + ("vector_a", "vector_b")

  def encode(self, rows, ctx, with_labels):
    labels = (base.label_ids(rows, ctx.config.label_name, ctx.labels) if with_labels
              else None)
    return {**encode_sides(rows, ctx), **base.batch_keys(len(rows), labels)}

  def build(self, ctx):
    encoder, params = base.bert_backbone(ctx)
    module = matching.TwoTower(encoder, len(ctx.labels), ctx.advanced["dropout"])
    return module, ({"encoder": params} if params is not None else None)

  def loss_fn(self, module, ctx):
    return keyed_classifier_loss(module, self.model_inputs)

  def output_rows(self, outputs, data, rows, ctx):
    out = super().output_rows(outputs, data, rows, ctx)
    half = outputs["features"].shape[-1] // 2
    for row, f in zip(out, outputs["features"]):
      row.update(vector_a=f[:half], vector_b=f[half:])
    return out


class _WordModelApp(TextClassifyBert):
  """Word-embedding models: vocabulary learnt from the training table."""
  uses_bert = False
  pair = "pair"
  model_inputs = PAIR_INPUTS
  advanced = {"embed_dim": 64, "filters": 64, "hidden": 64}

  def encode(self, rows, ctx, with_labels):
    labels = (base.label_ids(rows, ctx.config.label_name, ctx.labels) if with_labels
              else None)
    return {**encode_sides(rows, ctx), **base.batch_keys(len(rows), labels)}

  def module(self, ctx, **kw):
    raise NotImplementedError

  def build(self, ctx):
    adv = ctx.advanced
    return self.module(ctx, vocab_size=ctx.tokenizer.vocab_size,
                       num_labels=len(ctx.labels), embed_dim=adv["embed_dim"],
                       dropout_rate=adv["dropout"]), None

  def loss_fn(self, module, ctx):
    return keyed_classifier_loss(module, self.model_inputs)


class TextClassifyCnn(_WordModelApp):
  name = "text_classify_cnn"
  description = "classify a text with TextCNN over word embeddings learnt from the data"
  pair = "single"
  model_inputs = ("input_ids", "attention_mask")

  def module(self, ctx, **kw):
    return matching.TextCNN(filters=ctx.advanced["filters"], **kw)


class TextMatchBicnn(_WordModelApp):
  name = "text_match_bicnn"
  description = "match a text pair with a siamese CNN (BiCNN) over word embeddings"

  def module(self, ctx, **kw):
    return matching.BiCNN(filters=ctx.advanced["filters"], hidden=ctx.advanced["hidden"],
                          **kw)


class TextMatchHcnn(_WordModelApp):
  name = "text_match_hcnn"
  description = ("match a text pair with a hybrid CNN: sentence CNNs plus a CNN over "
                 "the word similarity matrix")

  def module(self, ctx, **kw):
    return matching.HCNN(filters=ctx.advanced["filters"], hidden=ctx.advanced["hidden"],
                         **kw)


class TextMatchDam(_WordModelApp):
  name = "text_match_dam"
  description = "match a text pair with the decomposable attention model (DAM)"
  intra = False

  def module(self, ctx, **kw):
    return matching.DAM(hidden=ctx.advanced["hidden"], intra_attention=self.intra, **kw)


class TextMatchDamPlus(TextMatchDam):
  name = "text_match_damplus"
  description = "DAM over intra-sentence attention inputs (DAM+)"
  intra = True
