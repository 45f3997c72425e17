"""Runs an app in one of the four modes, through etjax.train.Trainer (the only loop).

    run_app({'mode': 'train', 'modelName': 'text_classify_bert', 'inputTable':
             'train.tsv,dev.tsv', 'inputSchema': 'text:str:1,label:str:1', ...})

train writes, into --checkpointDir: train_config.json (the flags, the backbone's
config and the step count), label_mapping.json, tokenizer/ and the trainer's
checkpoints; evaluate, predict and export read them back, so the model is never
restated. predict writes --outputTable: the --outputSchema columns, then the
--appendCols of each input row, in input order.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, Mapping, Optional

import jax
import numpy as np
import optax

from etjax.algorithms import optim
from etjax.algorithms.finetune import step_from_loss
from etjax.apps import base, table
from etjax.apps.config import MODEL_FLAGS, AppConfig
from etjax.apps.registry import get_app
from etjax.data import pipeline, tokenizers

TRAIN_CONFIG, LABEL_MAPPING, TOKENIZER = ("train_config.json", "label_mapping.json",
                                          "tokenizer")


def make_optimizer(name: str, *, learning_rate: float, total_steps: int,
                   advanced: Mapping[str, Any]) -> optax.GradientTransformation:
  """--optimizerType: adam (AdamW without decay), adamw, lamb, adafactor; all with
  warmup + linear decay and global-norm clipping (etjax.algorithms.optim presets)."""
  warmup = int(advanced["warmup_fraction"] * total_steps)
  common = dict(learning_rate=learning_rate, total_steps=total_steps,
                warmup_steps=warmup, max_grad_norm=advanced["max_grad_norm"])
  if name == "adam":
    return optim.adamw(weight_decay=0.0, **common)
  if name == "adamw":
    return optim.adamw(weight_decay=advanced["weight_decay"], **common)
  if name == "adafactor":
    return optim.adafactor(**common)
  if name == "lamb":
    schedule = optim.warmup_linear_decay(learning_rate, warmup, total_steps)
    tx = optax.lamb(schedule, weight_decay=advanced["weight_decay"],
                    mask=optim.decay_mask)
    return optax.chain(optax.clip_by_global_norm(advanced["max_grad_norm"]), tx)
  raise ValueError(f"--optimizerType={name!r}; expected adam, adamw, lamb or adafactor")


def _read_json(path: str, what: str) -> Any:
  if not os.path.exists(path):
    raise ValueError(f"{path} is missing: was {what} trained with --mode=train there?")
  with open(path) as f:
    return json.load(f)


class Job:
  """One app run: config, app, context, and the Trainer over its TrainStep."""

  def __init__(self, flags: Mapping[str, Any]):
    flags = {k: v for k, v in flags.items() if v is not None}
    self.saved: Optional[dict] = None
    trainable = get_app(flags["modelName"]).trainable if "modelName" in flags else True
    if trainable and not flags.get("checkpointDir"):
      raise ValueError("--checkpointDir is required")
    if flags.get("mode") != "train" and trainable:
      self.saved = _read_json(os.path.join(flags["checkpointDir"], TRAIN_CONFIG),
                              "a model")
      # The model-defining flags come from training unless given again.
      flags = {**{k: v for k, v in self.saved["flags"].items()
                  if k in MODEL_FLAGS and v is not None}, **flags}
    self.config = AppConfig.from_flags(flags)
    self.app = get_app(self.config.model_name)
    self.app.check_flags(self.config)
    self.advanced = self.app.resolve_advanced(self.config.advanced_parameters)

  # --- assets --------------------------------------------------------------------------

  def _new_context(self, rows) -> base.Context:
    cfg, app = self.config, self.app
    spec = cfg.pretrained_model
    from etjax import models  # pylint: disable=g-import-not-at-top
    if app.uses_bert and spec and spec not in models.list_models():
      from etjax.jobs import tasks  # pylint: disable=g-import-not-at-top
      tokenizer = tokenizers.load_tokenizer(tasks.resolve_pretrained(spec))
    else:
      tokenizer = tokenizers.build_wordpiece_tokenizer(app.texts(rows, cfg),
                                                       self.advanced["vocab_size"])
    labels = app.label_vocab(rows, cfg) if app.has_labels else ()
    return base.Context(cfg, self.advanced, tokenizer, labels)

  def _saved_context(self) -> base.Context:
    directory = self.config.checkpoint_dir
    tokenizer = tokenizers.load_tokenizer(os.path.join(directory, TOKENIZER))
    labels = tuple(_read_json(os.path.join(directory, LABEL_MAPPING), "a model"
                              )["labels"])
    return base.Context(self.config, self.advanced, tokenizer, labels,
                        model_spec=self.saved.get("model_spec"))

  def _write_assets(self, ctx: base.Context, num_steps: int, data: dict) -> None:
    directory = self.config.checkpoint_dir
    os.makedirs(directory, exist_ok=True)
    from etjax.apps.exporting import batch_spec  # pylint: disable=g-import-not-at-top
    record = {"flags": self.config.to_flags(), "model_spec": ctx.model_spec,
              "num_steps": num_steps, "advanced": self.advanced,
              "batch_spec": batch_spec(data)}
    path = os.path.join(directory, TRAIN_CONFIG)
    if os.path.exists(path):
      with open(path) as f:
        old = json.load(f)
      changed = [k for k in MODEL_FLAGS if old["flags"].get(k) != record["flags"].get(k)]
      if changed or old.get("num_steps") != num_steps:
        raise ValueError(f"--checkpointDir {directory} holds another model (differs in "
                         f"{changed or ['the number of steps']}); choose a new "
                         "--checkpointDir (nothing there was changed)")
    if jax.process_index() == 0:
      ctx.tokenizer.save(os.path.join(directory, TOKENIZER))
      with open(os.path.join(directory, LABEL_MAPPING), "w") as f:
        json.dump({"labels": list(ctx.labels),
                   "ids": {l: i for i, l in enumerate(ctx.labels)}}, f, indent=1)
      with open(path, "w") as f:
        json.dump(record, f, indent=1)

  # --- the trainer ---------------------------------------------------------------------

  def _trainer(self, ctx: base.Context, num_steps: int):
    from etjax.train.trainer import Trainer  # pylint: disable=g-import-not-at-top
    module, pretrained = self.app.build(ctx)
    tx = make_optimizer(self.config.optimizer_type,
                        learning_rate=self.config.learning_rate, total_steps=num_steps,
                        advanced=self.advanced)
    step = step_from_loss(self.app.loss_fn(module, ctx),
                          self.app.init_fn(module, pretrained), tx)
    mesh, rules = self.config.mesh_and_rules
    workdir = self.config.checkpoint_dir or tempfile.mkdtemp(prefix="etjax-app-")
    return module, Trainer(step, workdir=workdir,
                           num_steps=num_steps, mesh=mesh, rules=rules,
                           seed=self.advanced["seed"],
                           checkpoint_every=self.config.save_checkpoint_steps,
                           log_every=max(1, min(self.advanced["log_every"], num_steps)),
                           progress=self.advanced["progress"])

  def _eval_batches(self, data: dict):
    size = self.advanced["eval_batch_size"] or self.config.batch_size
    return pipeline.eval_batches(data, size)

  def _outputs(self, trainer, state, data: dict) -> dict:
    return trainer.predict(state, self._eval_batches(data))

  def _restored(self):
    ctx = self._saved_context()
    module, trainer = self._trainer(ctx, self.saved["num_steps"])
    return ctx, module, trainer

  def _predict_state(self, rows, data_fn):
    """(ctx, data, trainer, state): the trained state, or for apps that do not train
    (feature extraction) the initial state with the pretrained weights."""
    if self.app.trainable:
      ctx, _, trainer = self._restored()
      data = data_fn(ctx)
      return ctx, data, trainer, trainer.restore(next(iter(self._eval_batches(data))))
    ctx = self._new_context(rows)
    data = data_fn(ctx)
    _, trainer = self._trainer(ctx, 1)
    return ctx, data, trainer, trainer.init_state(next(iter(self._eval_batches(data))))

  def _read(self, path: str):
    return table.read_table(path, self.config.input_schema)

  # --- modes ---------------------------------------------------------------------------

  def train(self) -> dict:
    """Fits on the first table; evaluates on the second when given. Returns metrics."""
    cfg = self.config
    rows = self._read(cfg.input_table[0])
    ctx = self._new_context(rows)
    data = self.app.encode(rows, ctx, with_labels=self.app.has_labels)
    # An epoch is one pass over the encoded examples (a long context gives several).
    num_steps = max(1, math.ceil(cfg.num_epochs * len(data["labels"]) / cfg.batch_size))
    _, trainer = self._trainer(ctx, num_steps)
    self._write_assets(ctx, num_steps, data)
    train_iter = pipeline.train_iterator(data, cfg.batch_size, seed=self.advanced["seed"])
    result = trainer.fit(train_iter)
    metrics = {"step": result.step, **{k: float(v) for k, v in
                                       result.train_metrics.items()}}
    if len(cfg.input_table) > 1:
      dev = self._read(cfg.input_table[1])
      dev_data = self.app.encode(dev, ctx, with_labels=True)
      outputs = self._outputs(trainer, result.state, dev_data)
      metrics.update({f"eval_{k}": v for k, v in
                      self.app.metrics(outputs, dev_data, dev, ctx).items()})
    return metrics

  def evaluate(self) -> dict:
    """Task metrics of the latest checkpoint on --inputTable."""
    ctx, _, trainer = self._restored()
    rows = self._read(self.config.input_table[0])
    data = self.app.encode(rows, ctx, with_labels=True)
    state = trainer.restore(next(iter(self._eval_batches(data))))
    return self.app.metrics(self._outputs(trainer, state, data), data, rows, ctx)

  def predict(self) -> str:
    """Writes --outputTable; returns its path."""
    cfg = self.config
    rows = self._read(cfg.input_table[0])
    ctx, data, trainer, state = self._predict_state(
        rows, lambda ctx: self.app.encode(rows, ctx, with_labels=False))
    results = self.app.output_rows(self._outputs(trainer, state, data), data, rows, ctx)
    columns = cfg.output_schema or self.app.default_output
    if jax.process_index() != 0:
      return cfg.output_table
    if cfg.output_table.endswith(".npy"):
      if cfg.append_cols:
        raise ValueError("--appendCols cannot go into a .npy --outputTable")
      os.makedirs(os.path.dirname(os.path.abspath(cfg.output_table)), exist_ok=True)
      np.save(cfg.output_table, np.stack([np.asarray(r[columns[0]]) for r in results]))
    else:
      table.write_table(cfg.output_table, [
          [table.format_value(result[c]) for c in columns] +
          [r.raw[c] for c in cfg.append_cols] for r, result in zip(rows, results)])
    return cfg.output_table

  def export(self) -> str:
    """Writes a new version under --exportDirBase; returns its directory."""
    from etjax.apps import exporting  # pylint: disable=g-import-not-at-top
    ctx, module, trainer = self._restored()
    return exporting.export_app(self, ctx, module, trainer)


def run_app(flags: Mapping[str, Any]) -> Any:
  """Runs `flags['mode']` of the app `flags['modelName']` (EasyTransfer flag names).
  Returns the metrics (train, evaluate), the output table (predict) or the export
  directory (export)."""
  job = Job(flags)
  return getattr(job, job.config.mode)()
