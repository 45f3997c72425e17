"""What an app is: how it reads rows, encodes them, builds its model and loss, scores
and writes predictions. The runner (etjax.apps.runner) drives every app the same way
through etjax.train.Trainer; an app never loops over steps.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np

from etjax import models
from etjax.algorithms.finetune import with_pretrained
from etjax.apps.config import AppConfig
from etjax.apps.table import Row
from etjax.data.tokenizers import Tokenizer

# Advanced parameters every app accepts, with their defaults.
COMMON_ADVANCED = {
    "seed": 0, "warmup_fraction": 0.1, "weight_decay": 0.01, "max_grad_norm": 1.0,
    "dropout": 0.1, "vocab_size": 8000, "eval_batch_size": 0, "log_every": 50,
    "progress": False,
}
# Encoder config fields an app's advanced parameters may override (BERT apps).
ENCODER_OVERRIDES = ("hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_position_embeddings", "hidden_dropout", "attention_dropout",
                     "attention", "dtype")


@dataclasses.dataclass
class Context:
  """What an app needs besides its config.

  Attributes:
    config: the run's AppConfig.
    advanced: the resolved advanced parameters (defaults filled in).
    tokenizer: the tokenizer (the pretrained model's, or one learnt at training).
    labels: the label vocabulary (empty for apps without labels).
    model_spec: {'config_type', 'config'} of the backbone, saved at training so later
      modes rebuild it without the pretrained files; None before it is known.
    pretrained: pretrained backbone weights (training only), else None.
  """
  config: AppConfig
  advanced: dict
  tokenizer: Tokenizer
  labels: tuple[str, ...] = ()
  model_spec: Optional[dict] = None
  pretrained: Optional[dict] = None


class App:
  """Base class: override the hooks a task needs.

  Class attributes: `name` (--modelName), `description` (one line for --help), `pair`
  ('single', 'pair' or 'either' for --secondSequence), `uses_bert` (takes
  --pretrainedModel), `has_labels`, `advanced` (app-specific advanced parameters and
  defaults), `loss_inputs` (batch keys the model is called with, in order).
  """
  name = ""
  description = ""
  pair = "either"
  uses_bert = True
  has_labels = True
  trainable = True
  advanced: dict = {}
  model_inputs: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids")
  output_columns: tuple[str, ...] = ("predictions", "probabilities", "logits")
  default_output: tuple[str, ...] = ("predictions", "probabilities", "logits")

  # --- flags ---------------------------------------------------------------------------

  def check_flags(self, cfg: AppConfig) -> None:
    """Combination checks that depend on the app (raise ValueError naming flags)."""
    if cfg.first_sequence is None and cfg.mode != "export":
      raise ValueError(f"{self.name} needs --firstSequence")
    if self.pair == "single" and cfg.second_sequence is not None:
      raise ValueError(f"{self.name} takes single sentences: --secondSequence="
                       f"{cfg.second_sequence!r} is not allowed")
    if self.pair == "pair" and cfg.second_sequence is None and cfg.mode != "export":
      raise ValueError(f"{self.name} matches sentence pairs: it needs --secondSequence")
    bad = [c for c in cfg.output_schema if c not in self.output_columns]
    if bad:
      raise ValueError(f"--outputSchema: {self.name} has no columns {bad}; it writes "
                       f"{', '.join(self.output_columns)}")
    if self.has_labels and cfg.mode in ("train", "evaluate"):
      if cfg.label_name is None:
        raise ValueError(f"{self.name} --mode={cfg.mode} needs --labelName")
      cfg.column(cfg.label_name, "labelName")

  def resolve_advanced(self, given: dict) -> dict:
    """Defaults merged with the given advanced parameters; unknown keys fail by name."""
    known = {**COMMON_ADVANCED, **(dict.fromkeys(ENCODER_OVERRIDES) if self.uses_bert
                                   else {}), **self.advanced}
    unknown = sorted(set(given) - set(known))
    if unknown:
      raise ValueError(f"--advancedParameters: unknown keys {unknown} for {self.name}; "
                       f"known: {', '.join(sorted(known))}")
    return {**known, **given}

  # --- data ------------------------------------------------------------------------------

  def texts(self, rows: Sequence[Row], cfg: AppConfig) -> list[str]:
    """The texts a tokenizer learnt from scratch is trained on."""
    names = [n for n in (cfg.first_sequence, cfg.second_sequence) if n]
    return [str(r.values[n]) for r in rows for n in names]

  def label_vocab(self, rows: Sequence[Row], cfg: AppConfig) -> tuple[str, ...]:
    """--labelEnumerateValues, else the sorted distinct labels of the training rows."""
    if cfg.label_enumerate_values:
      return tuple(cfg.label_enumerate_values)
    return tuple(sorted({str(r.values[cfg.label_name]) for r in rows}))

  def encode(self, rows: Sequence[Row], ctx: Context, with_labels: bool) -> dict:
    """Rows -> encoded arrays with the pipeline's batch keys (plus app keys)."""
    raise NotImplementedError

  # --- model -----------------------------------------------------------------------------

  def build(self, ctx: Context) -> tuple[nn.Module, Optional[dict]]:
    """(module, pretrained sub-tree of params or None)."""
    raise NotImplementedError

  def loss_fn(self, module: nn.Module, ctx: Context) -> Callable:
    """(params, batch, rng, deterministic) -> (loss, aux); aux's arrays are predict's
    outputs."""
    raise NotImplementedError

  def init_fn(self, module: nn.Module, pretrained: Optional[dict]) -> Callable:
    """(rng, batch) -> boxed params, with `pretrained` merged in."""
    def init(rng, batch):
      params = module.init({"params": rng, "dropout": rng},
                           *(batch.get(k) for k in self.model_inputs))["params"]
      return with_pretrained(params, pretrained) if pretrained else params
    return init

  # --- results ---------------------------------------------------------------------------

  def metrics(self, outputs: dict, data: dict, rows: Sequence[Row], ctx: Context
              ) -> dict:
    """Task metrics of predict's outputs over labelled rows."""
    raise NotImplementedError

  def output_rows(self, outputs: dict, data: dict, rows: Sequence[Row], ctx: Context
                  ) -> list[dict]:
    """Per input row: {'predictions', 'probabilities', 'logits'} values to write."""
    raise NotImplementedError


def label_ids(rows: Sequence[Row], column: str, labels: Sequence[str]) -> np.ndarray:
  """int32 [N] ids of each row's label; a label outside the vocabulary fails naming
  file, line and --labelEnumerateValues."""
  index = {l: i for i, l in enumerate(labels)}
  out = np.zeros(len(rows), np.int32)
  for i, r in enumerate(rows):
    value = str(r.values[column])
    if value not in index:
      raise ValueError(f"{r.where}: label {value!r} (column {column!r}) is not in "
                       f"--labelEnumerateValues ({','.join(labels)})")
    out[i] = index[value]
  return out


def batch_keys(n: int, labels: Optional[np.ndarray] = None) -> dict:
  """labels (zeros without labels), domain and weight arrays for N rows."""
  return {"labels": labels if labels is not None else np.zeros(n, np.int32),
          "domain": np.zeros(n, np.int32), "weight": np.ones(n, np.float32)}


def bert_backbone(ctx: Context) -> tuple[nn.Module, Optional[dict]]:
  """The encoder and its pretrained weights (training with a pretrained directory).

  --pretrainedModel is a zoo name (random initialisation; tokenizer learnt from the
  training texts), a Hugging Face directory or hub id, or 'package:NAME'. The chosen
  config is recorded in ctx.model_spec; later modes rebuild it from there.
  """
  overrides = {k: ctx.advanced[k] for k in ENCODER_OVERRIDES
               if ctx.advanced.get(k) is not None}
  if ctx.model_spec is not None:
    config_cls = getattr(models, ctx.model_spec["config_type"])
    config = models.config_from_dict(config_cls, ctx.model_spec["config"],
                                     where="train_config.json")
    return models.module_for(config), None
  spec = ctx.config.pretrained_model
  if not spec:
    raise ValueError(f"{ctx.config.model_name} needs --pretrainedModel (a zoo name, a "
                     "Hugging Face directory or package:NAME)")
  if spec in models.list_models():
    encoder, params = models.create_model(
        spec, vocab_size=ctx.tokenizer.vocab_size, **overrides), None
  else:
    from etjax.jobs import tasks  # pylint: disable=g-import-not-at-top
    encoder, params = models.from_pretrained(tasks.resolve_pretrained(spec), **overrides)
  config = encoder.config
  ctx.model_spec = {"config_type": type(config).__name__,
                    "config": dataclasses.asdict(config)}
  return encoder, params


def softmax(logits: np.ndarray) -> np.ndarray:
  """float32 probabilities over the last axis."""
  logits = np.asarray(logits, np.float64)
  exp = np.exp(logits - logits.max(-1, keepdims=True))
  return (exp / exp.sum(-1, keepdims=True)).astype(np.float32)


def unboxed(tree: Any) -> Any:
  return jax.tree.map(np.asarray, nn.meta.unbox(tree))
