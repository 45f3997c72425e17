"""`etjax train`, `eval`, `predict` and `demo`: the bound gin settings, assembled into
a run by etjax.jobs, then trained, evaluated or asked for predictions.

Each reads the gin configurables (etjax/cli/configurables.py) when it runs, so the
bindings in force at call time decide the job.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

import gin

from etjax.cli import algorithm_files
from etjax.cli.configurables import classifier, data, mesh, optimizer, train, transfer
from etjax.jobs import runs


def _settings(run: dict, model: dict) -> runs.Settings:
  """The bound settings of a run (`run` and `model` as the caller holds them)."""
  transfer_settings = transfer()
  return runs.Settings(
      run=run, model=model, optimizer=optimizer(), mesh=mesh(),
      transfer=transfer_settings,
      algorithms=(algorithm_files.algorithm_settings()
                  if transfer_settings["method"] is not None else None))


def _job(workdir_suffix: str = "", **classifier_changes) -> runs.Job:
  """The run of the gin bindings (etjax.jobs.runs.assemble), its classifier settings
  changed by `classifier_changes` (the demo's random_init)."""
  run, model = train(), classifier()
  model.update(classifier_changes)
  splits = data()
  return runs.assemble(_settings(run, model), splits, workdir_suffix)


def _format_metrics(metrics: dict) -> str:
  # AUC is undefined (nan) when the eval set lacks a class: say so, not 'nan'.
  return ", ".join(f"{k}=undefined" if isinstance(v, float) and v != v else
                   f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                   for k, v in metrics.items())


def _first_batch(encode, examples):
  from etjax.data import pipeline  # pylint: disable=g-import-not-at-top
  return next(iter(pipeline.eval_batches(encode(examples[:1]), 1)))


def cmd_train(workdir_suffix: str = "", **classifier_changes) -> dict:
  """Trains (resuming when the workdir has checkpoints) and evaluates; returns metrics.

  Holds the workdir's lock throughout; checks that the workdir's saved assets and
  checkpoints belong to this job before writing anything into it."""
  import jax  # pylint: disable=g-import-not-at-top
  from etjax.data import pipeline  # pylint: disable=g-import-not-at-top
  from etjax.jobs import tasks  # pylint: disable=g-import-not-at-top
  from etjax.train import assets, predict_io, workdir  # pylint: disable=g-import-not-at-top
  trainer, splits, tokenizer, encode, run, module = _job(workdir_suffix,
                                                         **classifier_changes)
  classes = sorted({ex.label for ex in splits.train})
  if len(classes) < 2:
    raise ValueError(f"the training set has one class ({splits.label_names[classes[0]]!r}"
                     f", {len(splits.train)} examples): a classifier needs at least "
                     "two; check data.label and the training file")
  primary = jax.process_index() == 0
  with (workdir.lock(trainer.workdir, command="etjax train") if primary else
        contextlib.nullcontext()):
    schema = predict_io.input_schema(splits.schema, any(ex.text_b for ex in splits.train),
                                     splits.format)
    files = assets.job_files(tokenizer, splits.label_names, schema)
    # model.json: what `etjax export` rebuilds the classifier from, without gin.
    files[tasks.MODEL_SPEC] = tasks.model_spec(
        module, max_length=run["max_length"],
        name=classifier()["pretrained"] or classifier()["model"])
    files.update(tasks.peft_files(transfer()["peft"]))  # what export rebuilds PEFT from
    if transfer()["method"] is not None:
      from etjax.transfer import roles  # pylint: disable=g-import-not-at-top
      files[assets.ROLES] = roles.as_json(trainer.roles, transfer()["method"],
                                          splits.schema.domain if splits.schema else None)
    assets.check(trainer.workdir, files)  # before anything is written
    trainer.check_resumable(_first_batch(encode, splits.train))
    trainer.write_config(gin.config_str())
    if primary:
      assets.save(trainer.workdir, files)
    eval_data = pipeline.eval_batches(encode(splits.eval), run["eval_batch_size"],
                                      buckets=runs.buckets(run), sort_by_length=True)
    if transfer()["method"] is None:
      train_iter = pipeline.train_iterator(encode(splits.train), run["batch_size"],
                                           seed=run["seed"], buckets=runs.buckets(run),
                                           group_batches=run["group_by_length"])
      result = trainer.fit(train_iter, eval_data)
      metrics = result.eval_metrics or trainer.evaluate(result.state, eval_data)
    else:
      result = trainer.fit()  # a RecipeRun: its stages know their data
      metrics = (result.eval_metrics if not splits.dev and result.eval_metrics else
                 trainer.evaluate(result.state, eval_data))
  resumed = getattr(trainer, "resumed_from", None)
  if resumed is not None:
    print(f"[{trainer.workdir}] resumed from step {resumed}")
  print(f"[{trainer.workdir}] step {result.step}: {_format_metrics(metrics)}")
  return metrics


def cmd_eval() -> dict:
  """Evaluates the latest checkpoint of the workdir on the eval split."""
  from etjax.data import pipeline  # pylint: disable=g-import-not-at-top
  from etjax.train import assets  # pylint: disable=g-import-not-at-top
  trainer, splits, _, encode, run, _ = _job()
  assets.check(trainer.workdir, {assets.LABELS: list(splits.label_names)})
  batch = _first_batch(encode, splits.eval)
  trainer.check_resumable(batch)  # a model that does not fit is named, not a traceback
  state = trainer.restore(batch)
  metrics = trainer.evaluate(state, pipeline.eval_batches(
      encode(splits.eval), run["eval_batch_size"], buckets=runs.buckets(run),
      sort_by_length=True))
  print(_format_metrics(metrics))
  return metrics


def cmd_predict(input_path: str, output_path: str, workdir_suffix: str = "") -> list:
  """Classifies the rows of `input_path` with the workdir's model and writes one
  prediction row per input row (etjax.train.predict_io). Reads only the workdir (its
  tokenizer, labels, schema, checkpoint) and the model's architecture, not the
  training data or the pretrained weights."""
  from etjax.data import pipeline  # pylint: disable=g-import-not-at-top
  from etjax.jobs import tasks  # pylint: disable=g-import-not-at-top
  from etjax.train import assets, predict_io  # pylint: disable=g-import-not-at-top
  run = train()
  model = runs.in_compute_dtype(classifier(), run)
  workdir = runs.workdir_of(run, workdir_suffix)
  predict_io.check_output(output_path)  # before any work, so no result is lost
  tokenizer, label_names = tasks.load_job_assets(workdir)
  schema = assets.load_schema(workdir) or predict_io.input_schema(None, pairs=False)
  inputs = predict_io.read_inputs(input_path, schema)
  module, _ = runs.classifier(len(label_names), model, tokenizer,
                              runs.pretrained_dir(model), load_weights=False)
  encode = runs.encoder(tokenizer, run)
  examples = inputs.examples()
  settings = _settings(run, model)
  if settings.transfer["method"] is None:
    trainer = runs.fine_tune_trainer(module, None, settings, workdir)
  else:
    from etjax.transfer import roles  # pylint: disable=g-import-not-at-top
    saved = assets.load_roles(workdir)
    job_roles = roles.from_json(saved, where=os.path.join(workdir, assets.ROLES))
    examples = roles.with_domains(examples, inputs, saved, job_roles, where=input_path)
    teacher = (runs.load_teacher(settings.transfer["teacher"], label_names)
               if settings.transfer["teacher"] else None)
    trainer = runs.transfer_run(settings, None, tokenizer, module, None, workdir,
                                saved_roles=job_roles, teacher=teacher)
  batch = _first_batch(encode, examples)
  trainer.check_resumable(batch)
  state = trainer.restore(batch)
  out = trainer.predict(state, pipeline.eval_batches(encode(examples),
                                                     run["eval_batch_size"]))
  predict_io.write_predictions(output_path, inputs, out["predictions"],
                               out["probabilities"], label_names)
  return [label_names[int(p)] for p in out["predictions"]]


DEMO_SENTENCES = (
    "the plot is gripping and the characters are memorable , i love it",
    "the blender is flimsy and broke after a week , a waste of money",
    "the picture quality is sharp and the price is fair , highly recommended",
    "the story is boring and predictable , avoid it",
)


def cmd_demo() -> None:
  """Fine-tunes the pretrained backbone and the same recipe from random weights,
  prints both accuracies, and predicts a few sentences with the fine-tuned model."""
  pretrained = cmd_train()
  scratch = cmd_train("random_init", random_init=True)
  print("\n| start | accuracy | macro-F1 | AUC |\n|---|---|---|---|")
  for name, m in (("pretrained", pretrained), ("random init", scratch)):
    print(f"| {name} | {m['accuracy']:.4f} | {m['macro_f1']:.4f} | {m['auc']:.4f} |")
  with tempfile.TemporaryDirectory() as tmp:
    inputs, outputs = os.path.join(tmp, "in.tsv"), os.path.join(tmp, "out.tsv")
    with open(inputs, "w") as f:
      f.write("\n".join(DEMO_SENTENCES) + "\n")
    labels = cmd_predict(inputs, outputs)
  print("\nPredictions of the fine-tuned model:")
  for sentence, label in zip(DEMO_SENTENCES, labels):
    print(f"  {label:>9}  {sentence}")
