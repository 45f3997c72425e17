"""Sequence labeling apps: one tag per word (BIO), softmax or CRF, optional BiLSTM.

Rows: --firstSequence holds space-separated words, --labelName as many
space-separated tags. Each word is tagged at its first word piece; words cut off by
--sequenceLength are predicted 'O' (and counted as such by the metrics).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from etjax.algorithms.finetune import weighted_cross_entropy
from etjax.apps import base, encoding
from etjax.apps.metrics import entity_scores
from etjax.models import crf
from etjax.models.tagging import TokenTagger


def _words(row, column):
  return str(row.values[column]).split()


class SequenceLabelingBert(base.App):
  """Softmax over tags per word."""
  name = "sequence_labeling_bert"
  description = "tag each word (BIO entities) with a softmax over an encoder's states"
  pair = "single"
  use_crf = False
  model_inputs = ("input_ids", "attention_mask", "token_type_ids", "word_index",
                  "word_mask")

  def texts(self, rows, cfg):
    return [" ".join(_words(r, cfg.first_sequence)) for r in rows]

  def label_vocab(self, rows, cfg):
    if cfg.label_enumerate_values:
      return tuple(cfg.label_enumerate_values)
    tags = {t for r in rows for t in _words(r, cfg.label_name)}
    return tuple(sorted(tags, key=lambda t: (t != "O", t[2:], t)))

  def _max_words(self, ctx):
    return max(1, ctx.config.sequence_length - 2)

  def encode(self, rows, ctx, with_labels):
    cfg = ctx.config
    sentences = [_words(r, cfg.first_sequence) for r in rows]
    data = encoding.encode_words(ctx.tokenizer, sentences, cfg.sequence_length,
                                 self._max_words(ctx))
    labels = np.zeros(data["word_index"].shape, np.int32)
    if with_labels:
      index = {t: i for i, t in enumerate(ctx.labels)}
      for i, (r, words) in enumerate(zip(rows, sentences)):
        tags = _words(r, cfg.label_name)
        if len(tags) != len(words):
          raise ValueError(f"{r.where}: {len(words)} words in column "
                           f"{cfg.first_sequence!r} but {len(tags)} tags in column "
                           f"{cfg.label_name!r}")
        for w, tag in enumerate(tags[:labels.shape[1]]):
          if tag not in index:
            raise ValueError(f"{r.where}: tag {tag!r} (column {cfg.label_name!r}) is "
                             f"not in --labelEnumerateValues ({','.join(ctx.labels)})")
          labels[i, w] = index[tag]
    return {**data, **base.batch_keys(len(rows), labels)}

  def build(self, ctx):
    encoder, params = base.bert_backbone(ctx)
    allowed = None
    if self.use_crf and ctx.advanced.get("bio_constraints", True):
      allowed = tuple(np.asarray(a).tolist() for a in crf.bio_allowed(ctx.labels))
    module = TokenTagger(encoder, num_tags=len(ctx.labels),
                         dropout_rate=ctx.advanced["dropout"],
                         lstm_size=int(ctx.advanced.get("lstm_size", 0)),
                         use_crf=self.use_crf, allowed=allowed)
    return module, ({"encoder": params} if params is not None else None)

  def loss_fn(self, module, ctx):
    inputs = self.model_inputs

    def loss_fn(params, batch, rng, deterministic=False):
      out = module.apply({"params": params}, *(batch[k] for k in inputs),
                         deterministic=deterministic, rngs={"dropout": rng})
      em_bwt, tags_bw = out.emissions, batch["labels"]
      mask_bw = batch["word_mask"].astype(jnp.float32)
      weights_b = batch["weight"].astype(jnp.float32)
      if out.crf_scores is not None:
        start, trans, end = out.crf_scores
        ll_b = crf.log_likelihood(em_bwt, tags_bw, mask_bw, trans, start, end)
        loss = -(ll_b * weights_b).sum() / jnp.maximum(weights_b.sum(), 1e-9)
      else:
        num_tags = em_bwt.shape[-1]
        loss = weighted_cross_entropy(em_bwt.reshape(-1, num_tags), tags_bw.reshape(-1),
                                      (mask_bw * weights_b[:, None]).reshape(-1))
      aux = {"logits": em_bwt}
      if deterministic:
        if out.crf_scores is not None:
          aux["tags"], _ = crf.viterbi(em_bwt, mask_bw, trans, start, end)
        else:
          aux["tags"] = em_bwt.argmax(-1)
      return loss, aux
    return loss_fn

  def _predicted(self, outputs, data, rows, ctx):
    cfg = ctx.config
    result = []
    for i, r in enumerate(rows):
      words = _words(r, cfg.first_sequence)
      kept = int(data["word_mask"][i].sum())
      tags = [ctx.labels[int(t)] for t in outputs["tags"][i, :kept]]
      result.append(tags + ["O"] * (len(words) - kept))
    return result

  def metrics(self, outputs, data, rows, ctx):
    gold = [_words(r, ctx.config.label_name) for r in rows]
    predicted = self._predicted(outputs, data, rows, ctx)
    scores = entity_scores(gold, predicted)
    flat = [(g == p) for gs, ps in zip(gold, predicted) for g, p in zip(gs, ps)]
    scores["token_accuracy"] = float(np.mean(flat))
    return scores

  def output_rows(self, outputs, data, rows, ctx):
    predicted = self._predicted(outputs, data, rows, ctx)
    probs = base.softmax(outputs["logits"])
    out = []
    for i, tags in enumerate(predicted):
      kept = int(data["word_mask"][i].sum())
      chosen = outputs["tags"][i, :kept]
      out.append({"predictions": " ".join(tags),
                  "probabilities": probs[i, np.arange(kept), chosen],
                  "logits": outputs["logits"][i, :kept]})
    return out


class SequenceLabelingBertCrf(SequenceLabelingBert):
  name = "sequence_labeling_bert_crf"
  description = ("tag each word with a linear-chain CRF (BIO-constrained Viterbi) over "
                 "an encoder's states")
  use_crf = True
  advanced = {"bio_constraints": True}


class SequenceLabelingBertBilstmCrf(SequenceLabelingBertCrf):
  name = "sequence_labeling_bert_bilstm_crf"
  description = "tag each word with a BiLSTM and a linear-chain CRF over an encoder"
  advanced = {"bio_constraints": True, "lstm_size": 64}

