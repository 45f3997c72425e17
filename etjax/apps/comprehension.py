"""Reading comprehension apps: answer spans with start/end heads over strided windows.

Rows: --firstSequence is the question, --secondSequence the context, --labelName the
answer text (its first occurrence in the context is the gold span). Each row becomes
one feature per window ([CLS] question [SEP] context window [SEP]); a window without
the answer points both heads at [CLS]. Decoding and metrics: etjax.apps.spans and
etjax.apps.metrics.squad_scores.

text_comprehension_bert_hae adds history answer embeddings (Qu et al., SIGIR'19):
context tokens inside a previous answer (--advancedParameters history_column=NAME, a
column of '||'-separated earlier answers) get an extra learned embedding. It is
realised as a 4-row token-type table indexed by segment + 2 * in_history, whose rows
2-3 start as copies of the pretrained rows 0-1 (a zero history embedding).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from etjax.algorithms.finetune import weighted_cross_entropy
from etjax.apps import base, encoding, spans
from etjax.apps.metrics import squad_scores
from etjax.models.tagging import SpanExtractor


class TextComprehensionBert(base.App):
  """Extractive question answering (SQuAD-style)."""
  name = "text_comprehension_bert"
  description = ("extract the answer span of a question from a context (start/end "
                 "heads, document stride, n-best decoding, SQuAD EM/F1)")
  pair = "pair"
  advanced = {"doc_stride": 128, "max_query_length": 64, "n_best": 20,
              "max_answer_length": 30}

  def label_vocab(self, rows, cfg):
    return ()

  def _features(self, rows, ctx):
    """Per row: (question ids, context ids, offsets, windows)."""
    cfg, adv = ctx.config, ctx.advanced
    questions = encoding.tokens_with_offsets(
        ctx.tokenizer, [str(r.values[cfg.first_sequence]) for r in rows])
    contexts = encoding.tokens_with_offsets(
        ctx.tokenizer, [str(r.values[cfg.second_sequence]) for r in rows])
    out = []
    for (q_ids, _), (c_ids, offsets) in zip(questions, contexts):
      q_ids = q_ids[:adv["max_query_length"]]
      windows = spans.make_windows(len(c_ids), cfg.sequence_length - len(q_ids) - 3,
                                   adv["doc_stride"], offset=len(q_ids) + 2)
      out.append((q_ids, c_ids, offsets, windows))
    return out

  def encode(self, rows, ctx, with_labels):
    cfg, tok = ctx.config, ctx.tokenizer
    length = cfg.sequence_length
    ids, types, labels, feature_row, window = [], [], [], [], []
    for i, (r, (q_ids, c_ids, offsets, windows)) in enumerate(
        zip(rows, self._features(rows, ctx))):
      gold = None
      if with_labels:
        context, answer = str(r.values[cfg.second_sequence]), str(r.values[cfg.label_name])
        at = context.find(answer)
        if at < 0:
          raise ValueError(f"{r.where}: the answer {answer!r} (column "
                           f"{cfg.label_name!r}) does not occur in the context")
        gold = spans.answer_token_span(offsets, at, at + len(answer))
      history = self._history_flags(r, ctx, offsets)
      for w in windows:
        piece = c_ids[w.start:w.start + w.length]
        row_ids = [tok.cls_id] + q_ids + [tok.sep_id] + piece + [tok.sep_id]
        row_types = [0] * (len(q_ids) + 2) + [1] * (len(piece) + 1)
        if history is not None:
          flags = history[w.start:w.start + w.length]
          row_types[w.offset:w.offset + len(piece)] = [1 + 2 * f for f in flags]
        ids.append(row_ids + [tok.pad_id] * (length - len(row_ids)))
        types.append(row_types + [0] * (length - len(row_types)))
        inside = gold is not None and w.start <= gold[0] and gold[1] < w.start + w.length
        labels.append([gold[0] - w.start + w.offset, gold[1] - w.start + w.offset]
                      if inside else [0, 0])
        feature_row.append(i)
        window.append([w.start, w.length, w.offset])
    input_ids = np.asarray(ids, np.int32)
    data = {"input_ids": input_ids,
            "attention_mask": (input_ids != tok.pad_id).astype(np.int32),
            "token_type_ids": np.asarray(types, np.int32),
            "feature_row": np.asarray(feature_row, np.int32),
            "window": np.asarray(window, np.int32)}
    data["attention_mask"][:, 0] = 1
    return {**data, **base.batch_keys(len(ids), np.asarray(labels, np.int32))}

  def _history_flags(self, row, ctx, offsets):
    return None

  def build(self, ctx):
    encoder, params = base.bert_backbone(ctx)
    module = SpanExtractor(encoder)
    return module, ({"encoder": params} if params is not None else None)

  def loss_fn(self, module, ctx):
    def loss_fn(params, batch, rng, deterministic=False):
      out = module.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                         batch["token_type_ids"], deterministic=deterministic,
                         rngs={"dropout": rng})
      # Padding positions can be neither start nor end.
      pad = (batch["attention_mask"] == 0) * -1e9
      start, end = out.start_logits + pad, out.end_logits + pad
      w = batch["weight"]
      loss = 0.5 * (weighted_cross_entropy(start, batch["labels"][:, 0], w)
                    + weighted_cross_entropy(end, batch["labels"][:, 1], w))
      return loss, {"start_logits": start, "end_logits": end}
    return loss_fn

  def _answers(self, outputs, data, rows, ctx):
    adv = ctx.advanced
    contexts = [str(r.values[ctx.config.second_sequence]) for r in rows]
    offsets = [o for _, o in encoding.tokens_with_offsets(ctx.tokenizer, contexts)]
    result = []
    for i, text in enumerate(contexts):
      feats = np.flatnonzero(data["feature_row"] == i)
      windows = [spans.Window(*map(int, data["window"][f])) for f in feats]
      answer, best = spans.best_answer(
          [outputs["start_logits"][f] for f in feats],
          [outputs["end_logits"][f] for f in feats], windows, offsets[i], text,
          n_best=adv["n_best"], max_answer_length=adv["max_answer_length"])
      result.append((answer, best))
    return result

  def metrics(self, outputs, data, rows, ctx):
    answers = [a for a, _ in self._answers(outputs, data, rows, ctx)]
    return squad_scores(answers, [[str(r.values[ctx.config.label_name])] for r in rows])

  def output_rows(self, outputs, data, rows, ctx):
    out = []
    for answer, best in self._answers(outputs, data, rows, ctx):
      scores = np.array([s.score for s in best]) if best else np.zeros(1)
      probs = base.softmax(scores)
      out.append({"predictions": answer, "probabilities": probs[0],
                  "logits": scores[0]})
    return out


class TextComprehensionBertHae(TextComprehensionBert):
  """Conversational QA: history answer embeddings mark earlier answers."""
  name = "text_comprehension_bert_hae"
  description = ("conversational reading comprehension: span extraction with history "
                 "answer embeddings of earlier answers")
  advanced = {**TextComprehensionBert.advanced, "history_column": None}

  def check_flags(self, cfg):
    super().check_flags(cfg)
    column = self.resolve_advanced(cfg.advanced_parameters)["history_column"]
    if not column:
      raise ValueError(f"{self.name} needs --advancedParameters history_column=NAME (a "
                       "column of '||'-separated earlier answers)")
    cfg.column(column, "advancedParameters history_column")

  def _history_flags(self, row, ctx, offsets):
    context = str(row.values[ctx.config.second_sequence])
    flags = [0] * len(offsets)
    for answer in str(row.values[ctx.advanced["history_column"]]).split("||"):
      answer = answer.strip()
      at = context.find(answer) if answer else -1
      while at >= 0:
        for t, (s, e) in enumerate(offsets):
          if e > at and s < at + len(answer):
            flags[t] = 1
        at = context.find(answer, at + 1)
    return flags

  def build(self, ctx):
    fresh = ctx.model_spec is None
    encoder, params = base.bert_backbone(ctx)
    if fresh:
      config = encoder.config.replace(type_vocab_size=2 * encoder.config.type_vocab_size)
      ctx.model_spec["config"]["type_vocab_size"] = config.type_vocab_size
      from etjax import models  # pylint: disable=g-import-not-at-top
      encoder = models.module_for(config)
      if params is not None:
        table = np.asarray(params["embeddings"]["token_type"]["embedding"])
        params["embeddings"]["token_type"]["embedding"] = np.concatenate([table, table])
    module = SpanExtractor(encoder)
    return module, ({"encoder": params} if params is not None else None)
