"""A classification run from plain settings: the classifier, its Trainer or transfer
recipe, and the batching rules of the `train` settings.

What `etjax train` / `eval` / `predict` / `demo` run. The command line (etjax/cli)
reads gin and passes the plain dicts its configurables return (`Settings`); nothing
here reads gin or flags, so a notebook can assemble the same run.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, NamedTuple, Optional, Sequence

from etjax.jobs import tasks


@dataclasses.dataclass(frozen=True)
class Settings:
  """A run's settings, as the gin configurables of etjax/cli/configurables.py return
  them.

  Attributes:
    run: `train` (workdir, num_steps, batch sizes, lengths, seed, cadences, ...).
    model: `classifier` (model, pretrained, random_init, dropout, overrides,
      vocab_size).
    optimizer: `optimizer` (etjax.transfer.job.make_tx_factory reads it).
    mesh: `mesh`: (spec, rules).
    transfer: `transfer` (method, method_args, peft, teacher).
    algorithms: the methods' defaults of gin/algorithms (`algorithm_settings`); read
      only when transfer['method'] is set.
  """
  run: dict
  model: dict
  optimizer: dict
  mesh: tuple[str, str]
  transfer: dict
  algorithms: Optional[dict] = None


class Job(NamedTuple):
  """An assembled run: trainer (a Trainer, or a transfer RecipeRun), splits,
  tokenizer, encode (examples -> arrays), run (the `train` settings, num_steps set
  from num_epochs) and module (the SequenceClassifier)."""
  trainer: Any
  splits: tasks.Splits
  tokenizer: Any
  encode: Callable
  run: dict
  module: Any


def workdir_of(run: dict, suffix: str = "") -> str:
  return os.path.join(run["workdir"], suffix) if suffix else run["workdir"]


def pretrained_dir(model: dict) -> Optional[str]:
  """The directory of `classifier.pretrained` (None: a zoo model)."""
  return tasks.resolve_pretrained(model["pretrained"]) if model["pretrained"] else None


def classifier(num_labels: int, model: dict, tokenizer, pretrained: Optional[str],
               load_weights: bool = True):
  """(module, pretrained params or None) of the `classifier` settings; a zoo model
  takes the tokenizer's vocabulary size unless its overrides set one."""
  overrides = dict(model["overrides"] or {})
  if not pretrained:
    overrides.setdefault("vocab_size", tokenizer.vocab_size)
  return tasks.build_classifier(
      num_labels, model=model["model"], pretrained_dir=pretrained,
      random_init=model["random_init"], dropout=model["dropout"], overrides=overrides,
      load_weights=load_weights)


def buckets(run: dict) -> Optional[tuple[int, ...]]:
  """The batch lengths of `train.length_buckets` (None: pad to max_length)."""
  from etjax.data import bucketing  # pylint: disable=g-import-not-at-top
  if not run["length_buckets"]:
    return None
  return bucketing.bucket_lengths(run["max_length"], run["length_buckets"])


def encoder(tokenizer, run: dict) -> Callable:
  """examples -> {'input_ids', ...} arrays of train.max_length."""
  from etjax.data import pipeline  # pylint: disable=g-import-not-at-top
  return lambda examples: pipeline.encode_examples(examples, tokenizer,
                                                   run["max_length"])


def trainer_options(settings: Settings, module) -> dict:
  """The Trainer options of the `mesh` and `train` settings."""
  run, (spec, rules) = settings.run, settings.mesh
  config = module.encoder.config
  return dict(mesh=spec, rules=rules, seed=run["seed"], eval_every=run["eval_every"],
              checkpoint_every=run["checkpoint_every"],
              keep_best_metric=run["keep_best_metric"], log_every=run["log_every"],
              progress=run["progress"],
              pipeline=(config.pipeline_stages, config.pipeline_microbatches),
              compilation_cache=run["compilation_cache"], prefetch=run["prefetch"])


def fine_tune_trainer(module, pretrained: Optional[dict], settings: Settings,
                      workdir: str):
  """The Trainer of a fine-tuning job (the `optimizer`, `transfer.peft`, `mesh` and
  `train` settings)."""
  from etjax import algorithms  # pylint: disable=g-import-not-at-top
  from etjax.train.trainer import Trainer  # pylint: disable=g-import-not-at-top
  from etjax.transfer import job as transfer_job  # pylint: disable=g-import-not-at-top
  # num_steps is None only where nothing trains (predict: the schedule is unused).
  total = settings.run["num_steps"] or 1
  tx = transfer_job.make_tx_factory(settings.optimizer)(total, (r"^encoder/",))
  peft_config = settings.transfer["peft"]
  if peft_config is None:
    step = algorithms.finetune(module, tx, pretrained=pretrained)
  else:
    from etjax.algorithms import peft  # pylint: disable=g-import-not-at-top
    step = peft.finetune(module, tx, peft_config, pretrained=pretrained)
  return Trainer(step, workdir=workdir, num_steps=total,
                 **trainer_options(settings, module))


def load_teacher(path: str, label_names: Sequence[str]):
  """transfer.teacher's TrainedClassifier; its labels must be the job's."""
  from etjax.jobs import trained  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(path):
    raise ValueError(f"transfer.teacher {path!r}: no such directory")
  teacher = trained.load_classifier(path)
  if list(teacher.label_names) != list(label_names):
    raise ValueError(f"transfer.teacher {path!r} was trained on labels "
                     f"{list(teacher.label_names)}; this job's are {list(label_names)}")
  return teacher


def _source_task(splits, saved_roles):
  """(rows, number of labels) of MetaDTL's source task: the data's, or for a restore
  (predict) the label count roles.json kept."""
  if saved_roles is not None:
    count = saved_roles.source_task_labels
    return ([], count) if count else None
  if splits.source_task is None:
    return None
  rows, names = splits.source_task
  return rows, len(names)


def transfer_run(settings: Settings, splits, tokenizer, module, pretrained, workdir: str,
                 saved_roles=None, teacher=None):
  """The RecipeRun of `transfer.method` on the data's roles (etjax.transfer); with
  `saved_roles` (predict: a trained workdir's roles.json) no data is read."""
  from etjax.data import pipeline  # pylint: disable=g-import-not-at-top
  from etjax.transfer import job, methods  # pylint: disable=g-import-not-at-top
  run = settings.run
  method = methods.get(settings.transfer["method"])
  encode = encoder(tokenizer, run)
  if saved_roles is not None:
    roles, eval_data = saved_roles, None
  else:
    roles = job.assign_roles(splits, splits.target_domains, where="data.train_path")
    methods.check_roles(method, roles)
    # Model choices (eval_every, keep-best) use the dev rows when there are any.
    eval_data = pipeline.eval_batches(encode(splits.dev or splits.eval),
                                      run["eval_batch_size"], buckets=buckets(run),
                                      sort_by_length=True)
  materials = methods.Materials(
      roles=roles, encode=encode, make_classifier=lambda: module,
      make_encoder=module.encoder.clone,
      pretrained_encoder=pretrained["encoder"] if pretrained else None,
      make_tx=job.make_tx_factory(settings.optimizer),
      steps_for=job.steps_rule(run["num_steps"], run["num_epochs"], run["batch_size"]),
      batch_size=run["batch_size"], seed=run["seed"], eval_data=eval_data,
      teacher=(teacher.module, teacher.params) if teacher else None,
      vocab_size=tokenizer.vocab_size, workdir=workdir,
      source_task=_source_task(splits, saved_roles))
  stages = method.build(materials, job.method_settings(method, settings.algorithms,
                                                       settings.transfer["method_args"]))
  return job.RecipeRun(stages, workdir, roles=roles,
                       **trainer_options(settings, module))


def in_compute_dtype(model: dict, run: dict) -> dict:
  """The `classifier` settings with train.compute_dtype as the model's default dtype
  (classifier.overrides may still set one): what train, eval and predict all build."""
  overrides = {"dtype": run["compute_dtype"], **(model["overrides"] or {})}
  return dict(model, overrides=overrides)


def assemble(settings: Settings, splits: tasks.Splits, workdir_suffix: str = "") -> Job:
  """The run of `settings` on `splits`: the model in train.compute_dtype, num_steps
  from num_epochs, the workdir's saved tokenizer when there is one (tasks.make_tokenizer), and a Trainer
  (fine-tuning) or a RecipeRun (transfer.method)."""
  run, model = dict(settings.run), in_compute_dtype(settings.model, settings.run)
  if run["num_epochs"] is not None:
    run["num_steps"] = run["num_epochs"] * -(-len(splits.train) // run["batch_size"])
  settings = dataclasses.replace(settings, run=run, model=model)
  workdir = workdir_of(run, workdir_suffix)
  pretrained = pretrained_dir(model)
  teacher = (load_teacher(settings.transfer["teacher"], splits.label_names)
             if settings.transfer["teacher"] else None)
  tokenizer = tasks.make_tokenizer(pretrained, tasks.texts_of(splits.train),
                                   model["vocab_size"], workdir=workdir,
                                   teacher=teacher and teacher.tokenizer)
  module, params = classifier(len(splits.label_names), model, tokenizer, pretrained)
  if settings.transfer["method"] is None:
    trainer = fine_tune_trainer(module, params, settings, workdir)
  else:
    trainer = transfer_run(settings, splits, tokenizer, module, params, workdir,
                           teacher=teacher)
  return Job(trainer, splits, tokenizer, encoder(tokenizer, run), run, module)
