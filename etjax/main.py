"""The `etjax` command line: the one place that defines flags and touches gin.

    etjax train   --gin_file=gin/runs/demo.gin [--gin.train.num_steps=100 ...]
    etjax eval    --gin_file=gin/runs/demo.gin
    etjax predict --gin_file=gin/runs/demo.gin --input=texts.tsv --output=preds.tsv
    etjax demo    --gin_file=gin/runs/demo.gin
    etjax run     --gin_file=gin/runs/table8_feature_tl.gin   (a paper table)
    etjax plan    --model=t5-11b --mesh=data=2,fsdp=4,model=8 ...
    etjax models
    etjax export  --workdir=/tmp/run --output=/srv/models/demo   (jax.export version)
    etjax serve   --export_dir=/srv/models/demo [--port=8080 --api_key_env=NAME]

An absl binary in the t5x manner: flags are absl flags (`etjax --helpfull` lists them
all), `--gin_file` and `--gin_bindings` may repeat, and `--gin.NAME=VALUE` is shorthand
for `--gin_bindings='NAME = VALUE'`. Gin binds the plain functions below (`data`,
`classifier`, `optimizer`, `mesh`, `train`, `experiment` and the experiment functions
of etjax.experiments). Gin files and their includes (`include 'gin/meshes/dp.gin'`)
resolve against --gin_search_paths, the current directory and the gin/ directory
shipped with etjax, from any directory. The fully resolved config is written beside
the checkpoints as config.gin.

Commands are a table (COMMANDS); a new one is a function registered with
`@command(name, help)` that reads its absl flags and the bound gin functions.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import sys
import traceback
from typing import Any, Callable, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import gin

from etjax.apps import config as app_config
from etjax.data import synthetic

# --- gin-configurable job pieces --------------------------------------------------------


@gin.configurable
def data(source: str = "synthetic", *, train_path: Optional[str] = None,
         eval_path: Optional[str] = None, format: Optional[str] = None,  # pylint: disable=redefined-builtin
         text_a="text_a", text_b=None, label="label", domain=None, header: bool = True,
         on_error: str = "raise", synthetic_task: str = "sentiment",
         domains: Sequence[str] = synthetic.DOMAINS, train_size: int = 200,
         eval_size: int = 200, label_noise: float = 0.05, seed: int = 0,
         debian_dir: Optional[str] = None, debian_task: str = "use",
         task_or_mixture: Optional[str] = None, seqio_modules: Sequence[str] = (),
         train_split: str = "train", eval_split: str = "test",
         num_train_examples: Optional[int] = None, dev_path: Optional[str] = None,
         target_domains: Optional[Sequence[str]] = None,
         source_task_path: Optional[str] = None, source_task_label=None):
  """The job's labelled data: 'synthetic', 'files' (CSV/TSV/JSONL), 'debian' or 'seqio'
  (a Task or Mixture named by task_or_mixture, registered by importing seqio_modules,
  or one of the Debian tasks when debian_dir is given). dev_path: target rows for
  model choices and keep-best (files). target_domains: the domain values that are the
  target of `transfer.method`; every other domain of the training data is a source.
  source_task_path: MetaDTL's cross-task source file (same text columns, its own label
  column source_task_label, default data.label, and its own label set)."""
  import dataclasses as dc  # pylint: disable=g-import-not-at-top
  splits = _read_data(source, train_path=train_path, eval_path=eval_path, format=format,
                      text_a=text_a, text_b=text_b, label=label, domain=domain,
                      header=header, on_error=on_error, synthetic_task=synthetic_task,
                      domains=domains, train_size=train_size, eval_size=eval_size,
                      label_noise=label_noise, seed=seed, debian_dir=debian_dir,
                      debian_task=debian_task, task_or_mixture=task_or_mixture,
                      seqio_modules=seqio_modules, train_split=train_split,
                      eval_split=eval_split, num_train_examples=num_train_examples,
                      dev_path=dev_path)
  if isinstance(target_domains, str):
    raise ValueError(f"data.target_domains = {target_domains!r}: give a list, e.g. "
                     f"['{target_domains}']")
  source_task = None
  if source_task_path:
    from etjax.data import readers  # pylint: disable=g-import-not-at-top
    from etjax.jobs import tasks  # pylint: disable=g-import-not-at-top
    schema = readers.Schema(text_a=text_a, text_b=text_b, header=header,
                            label=source_task_label or label)
    source_task = tasks.source_task_rows(source_task_path, schema, format=format,
                                         on_error=on_error)
  return dc.replace(splits, target_domains=tuple(target_domains or ()),
                    source_task=source_task)


def _read_data(source: str, *, train_path, eval_path, format, text_a, text_b, label,  # pylint: disable=redefined-builtin
               domain, header, on_error, synthetic_task, domains, train_size,
               eval_size, label_noise, seed, debian_dir, debian_task, task_or_mixture,
               seqio_modules, train_split, eval_split, num_train_examples, dev_path):
  from etjax.data import readers  # pylint: disable=g-import-not-at-top
  from etjax.jobs import tasks  # pylint: disable=g-import-not-at-top
  if dev_path and source != "files":
    raise ValueError(f"data.dev_path is for data.source = 'files', not {source!r}")
  if source == "synthetic":
    return tasks.synthetic_splits(task=synthetic_task, domains=domains,
                                  train_size=train_size, eval_size=eval_size, seed=seed,
                                  label_noise=label_noise)
  if source == "files":
    if not train_path or not eval_path:
      raise ValueError("data.source = 'files' needs data.train_path and data.eval_path")
    schema = readers.Schema(text_a=text_a, label=label, text_b=text_b, domain=domain,
                            header=header)
    return tasks.file_splits(train_path, eval_path, schema, format=format,
                             on_error=on_error, dev_path=dev_path)
  if source == "debian":
    if not debian_dir:
      raise ValueError("data.source = 'debian' needs data.debian_dir")
    return tasks.debian_splits(debian_dir, debian_task)
  if source == "seqio":
    if not task_or_mixture:
      raise ValueError("data.source = 'seqio' needs data.task_or_mixture")
    return tasks.seqio_splits(task_or_mixture, modules=seqio_modules,
                              debian_dir=debian_dir, train_split=train_split,
                              eval_split=eval_split, num_train_examples=num_train_examples,
                              seed=seed)
  raise ValueError(f"data.source = {source!r}: expected 'synthetic', 'files', 'debian' "
                   "or 'seqio'")


@gin.configurable
def classifier(model: Optional[str] = "bert-tiny", pretrained: Optional[str] = None,
               random_init: bool = False, dropout: float = 0.1,
               overrides: Optional[dict] = None, vocab_size: int = 2000):
  """Model settings: a zoo name or a pretrained directory / hub id / 'package:NAME'."""
  return dict(model=model, pretrained=pretrained, random_init=random_init,
              dropout=dropout, overrides=overrides, vocab_size=vocab_size)


@gin.configurable
def optimizer(name: str = "adamw", learning_rate: float = 5e-5,
              warmup_fraction: float = 0.1, weight_decay: float = 0.01,
              max_grad_norm: float = 1.0,
              new_params_learning_rate: Optional[float] = None):
  """Optimizer settings (etjax.algorithms.optim presets). new_params_learning_rate:
  the rate of parameters that do not come from the pretrained backbone (heads,
  discriminators, ...), which then train apart from the pretrained ones (None: one
  rate for all)."""
  return dict(name=name, learning_rate=learning_rate, warmup_fraction=warmup_fraction,
              weight_decay=weight_decay, max_grad_norm=max_grad_norm,
              new_params_learning_rate=new_params_learning_rate)


@gin.configurable
def mesh(spec: str = "data=-1", rules: str = "dp"):
  """Device mesh (e.g. 'data=2,model=4') and logical-axis rules preset."""
  return spec, rules


@gin.configurable
def transfer(peft: str = "none", lora_rank: int = 8, lora_alpha: float = 16.0,
             lora_dropout: float = 0.0, lora_targets: Sequence[str] = ("query", "value"),
             adapter_size: int = 64, prompt_length: int = 20,
             peft_train: Optional[Sequence[str]] = None, method: Optional[str] = None,
             method_args: Optional[dict] = None, teacher: Optional[str] = None):
  """How the model transfers.

  method: a transfer method over the data's roles (`etjax methods` lists them; None:
  fine-tune on every training row); method_args: its settings over the defaults of
  its gin/algorithms file; teacher: the workdir of an `etjax train` run on the same
  labels, distilled by kd, pkd, distilbert and tinybert. peft: parameter-efficient
  fine-tuning
  (etjax.algorithms.peft): 'none', 'lora', 'adapter' or 'prompt'; peft_train: regexes
  of base parameters trained as well (None: the head, plus layer norms for adapters).
  Returns {'method', 'method_args', 'peft': a PeftConfig or None}.
  """
  from etjax.algorithms import peft as peft_lib  # pylint: disable=g-import-not-at-top
  if method is not None:
    from etjax.transfer import methods  # pylint: disable=g-import-not-at-top
    needs_teacher = methods.get(method).needs_teacher
    if needs_teacher and not teacher:
      raise ValueError(f"transfer.method = {method!r} needs transfer.teacher: the "
                       "workdir of an `etjax train` run on the same labels")
    if teacher and not needs_teacher:
      raise ValueError(f"transfer.teacher is for the distillation methods, not "
                       f"{method!r}")
    if peft != "none":
      raise ValueError(f"transfer.peft = {peft!r} with transfer.method = {method!r}: "
                       "PEFT runs with plain fine-tuning only (no method)")
  try:
    peft_config = peft_lib.config_from_flags(
        peft, lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
        lora_targets=tuple(lora_targets), adapter_size=adapter_size,
        prompt_length=prompt_length, train=peft_train)
  except ValueError as e:
    raise ValueError(f"transfer: {e}") from e
  return dict(method=method, method_args=dict(method_args or {}), peft=peft_config,
              teacher=teacher)


@gin.configurable
def train(workdir: str = gin.REQUIRED, num_steps: Optional[int] = None,
          batch_size: int = 32, eval_batch_size: int = 64, max_length: int = 64,
          seed: int = 0, eval_every: int = 0, checkpoint_every: int = 0,
          keep_best_metric: Optional[str] = "accuracy", log_every: int = 10,
          progress: bool = True, num_epochs: Optional[int] = None,
          compute_dtype: str = "bfloat16", length_buckets: int = 4,
          group_by_length: int = 16, compilation_cache: Optional[str] = "auto",
          prefetch: int = 2):
  """Run settings (the counts must be integers: 5.5 steps is refused, not rounded).

  num_steps or num_epochs (passes over the training set, ceil(N / batch_size) updates
  each) sets the run's length; at most one of the two (neither: 100 steps).
  compute_dtype: the model's activation dtype; parameters, optimizer state and
  accumulations stay float32 (the demo's accuracies held in bfloat16; the Debian
  comparison is pending, benchmarks/RESULTS.md). length_buckets: batches are padded to one of this many
  lengths up to max_length (0: always max_length); group_by_length: windows of this
  many batches are regrouped by length (1: off). compilation_cache: jax's persistent
  cache directory ('auto': ~/.cache/etjax/jax-cache or $ETJAX_COMPILATION_CACHE;
  None: off). prefetch: batches put on the devices ahead (0: none).
  """
  if num_steps is not None and num_epochs is not None:
    raise ValueError(f"train.num_steps = {num_steps} and train.num_epochs = "
                     f"{num_epochs}: set one of the two, not both")
  if num_steps is None and num_epochs is None:
    num_steps = 100
  for name, value in (("num_steps", num_steps), ("batch_size", batch_size),
                      ("eval_batch_size", eval_batch_size), ("max_length", max_length),
                      ("seed", seed), ("eval_every", eval_every),
                      ("checkpoint_every", checkpoint_every), ("log_every", log_every),
                      ("num_epochs", num_epochs), ("length_buckets", length_buckets),
                      ("group_by_length", group_by_length), ("prefetch", prefetch)):
    if name in ("num_steps", "num_epochs") and value is None:
      continue
    if isinstance(value, bool) or not isinstance(value, int):
      raise ValueError(f"train.{name} = {value!r}: expected an integer")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"train.num_epochs = {num_epochs}: expected a positive integer")
  return dict(workdir=workdir, num_steps=num_steps, batch_size=batch_size,
              eval_batch_size=eval_batch_size, max_length=max_length, seed=seed,
              eval_every=eval_every, checkpoint_every=checkpoint_every,
              keep_best_metric=keep_best_metric, log_every=log_every, progress=progress,
              num_epochs=num_epochs, compute_dtype=compute_dtype,
              length_buckets=length_buckets, group_by_length=group_by_length,
              compilation_cache=compilation_cache, prefetch=prefetch)


@gin.configurable
def experiment(fn=gin.REQUIRED):
  """The experiment a run file names (`experiment.fn = @feature_table8`); it gets the
  methods' settings of gin/algorithms/*.gin (`algorithm_settings`)."""
  return fn(settings=algorithm_settings())


@gin.configurable
def appzoo(**app_flags):
  """`etjax app` settings under EasyTransfer's flag names (gin/runs/apps/*.gin bind
  them, e.g. appzoo.modelName = 'text_classify_bert'); command-line flags win."""
  return app_flags


# Library functions gin files may bind, by gin name: (module, function). The
# experiments are what run files name (`experiment.fn = @...`); the algorithm builders
# are what gin/algorithms/*.gin files configure.
EXPERIMENTS = {
    "feature_table8": ("etjax.experiments.tl_feature_instance", "run_table8"),
    "instance_table9": ("etjax.experiments.tl_feature_instance", "run_table9"),
    "distill_table10": ("etjax.experiments.tl_distill", "run_table10"),
    "distill_adabert": ("etjax.experiments.tl_distill", "run_adabert"),
    "meta_table10": ("etjax.experiments.tl_meta", "run_table10"),
    "meta_table11": ("etjax.experiments.tl_meta", "run_table11"),
    "meta_table12": ("etjax.experiments.tl_meta", "run_table12"),
}
ALGORITHMS = {
    "distill": ("etjax.algorithms.distill", "distill"),
    "pkd": ("etjax.algorithms.pkd", "pkd"),
    "distilbert": ("etjax.algorithms.distilbert", "distilbert"),
    "tinybert": ("etjax.algorithms.tinybert", "tinybert"),
    "AdaBertConfig": ("etjax.algorithms.adabert", "AdaBertConfig"),
    "adabert_search": ("etjax.algorithms.adabert", "adabert_search"),
    "feature_tl": ("etjax.algorithms.feature_based", "build_feature_step"),
    "instance_tl": ("etjax.algorithms.instance_based", "build_instance_step"),
    "ruder_plank": ("etjax.train.ruder_plank", "search"),
    "metaft": ("etjax.algorithms.metaft", "metaft"),
    "metadtl": ("etjax.algorithms.metadtl", "metadtl"),
    "meta_teacher": ("etjax.algorithms.metakd", "meta_teacher"),
    "metakd": ("etjax.algorithms.metakd", "metakd"),
}


def register_experiments() -> None:
  """Makes the experiment functions and algorithm builders gin configurables (once)."""
  import importlib  # pylint: disable=g-import-not-at-top
  for name, (module, function) in {**EXPERIMENTS, **ALGORITHMS}.items():
    if name not in _REGISTERED:
      gin.external_configurable(getattr(importlib.import_module(module), function),
                                name=name)
      _REGISTERED.add(name)


_REGISTERED: set = set()


class _LiteralsOnly(gin.config_parser.ParserDelegate):
  """gin/algorithms/*.gin bind literals only: a reference or macro is an error."""

  def configurable_reference(self, scoped_name, evaluate):
    raise ValueError(f"unexpected configurable reference @{scoped_name}")

  def macro(self, macro_name):
    raise ValueError(f"unexpected macro %{macro_name}")


def algorithm_file_bindings(path: str) -> dict[str, dict[str, Any]]:
  """{selector: {argument: value}} of one algorithm gin file (gin's own parser).

  Raises:
    ValueError: naming the file and line of a binding that is not a plain literal
      binding (an include, scope, reference or macro).
  """
  out: dict[str, dict[str, Any]] = {}
  with open(path, encoding="utf-8") as f:
    try:
      for statement in gin.config_parser.ConfigParser(f, _LiteralsOnly()):
        if (not isinstance(statement, gin.config_parser.BindingStatement) or
            statement.scope):
          raise ValueError(f"{path}:{statement.location.line_num}: algorithm files "
                           "hold plain bindings only (no include, import or scope)")
        out.setdefault(statement.selector, {})[statement.arg_name] = statement.value
    except SyntaxError as e:
      raise ValueError(f"{path}:{e.lineno}: {_one_line(e)}") from None
    except ValueError as e:
      if str(e).startswith(path):
        raise
      raise ValueError(f"{path}: {e}") from None
  return out


def algorithm_settings(directory: Optional[str] = None) -> dict[str, dict[str, dict]]:
  """Every method's defaults, once: {file stem: {selector: {argument: value}}} of
  gin/algorithms/*.gin (default: the shipped directory), e.g.
  settings['drss']['feature_tl'] -> {'method': 'drss', 'drss_weight': 0.001, ...}.
  The experiments and `transfer.method` read their hyperparameters from here."""
  if directory is None:
    roots = [r for r in gin_search_roots() if os.path.isdir(os.path.join(r, "gin",
                                                                          "algorithms"))]
    directory = os.path.join(roots[-1], "gin", "algorithms")
  names = sorted(n for n in os.listdir(directory) if n.endswith(".gin"))
  if not names:
    raise ValueError(f"no algorithm gin files under {directory}")
  return {n[:-len(".gin")]: algorithm_file_bindings(os.path.join(directory, n))
          for n in names}


# --- commands -----------------------------------------------------------------------------


def _workdir(run: dict, suffix: str = "") -> str:
  return os.path.join(run["workdir"], suffix) if suffix else run["workdir"]


def _classifier(num_labels: int, model_cfg: dict, tokenizer, pretrained_dir,
                load_weights: bool = True):
  """(module, pretrained params or None) of the `classifier` settings."""
  from etjax.jobs import tasks  # pylint: disable=g-import-not-at-top
  overrides = dict(model_cfg["overrides"] or {})
  if not pretrained_dir:
    overrides.setdefault("vocab_size", tokenizer.vocab_size)
  return tasks.build_classifier(
      num_labels, model=model_cfg["model"], pretrained_dir=pretrained_dir,
      random_init=model_cfg["random_init"], dropout=model_cfg["dropout"],
      overrides=overrides, load_weights=load_weights)


def _trainer_options(run: dict, module) -> dict:
  """The Trainer options of the `mesh` and `train` settings."""
  spec, rules = mesh()
  config = module.encoder.config
  return dict(mesh=spec, rules=rules, seed=run["seed"], eval_every=run["eval_every"],
              checkpoint_every=run["checkpoint_every"],
              keep_best_metric=run["keep_best_metric"], log_every=run["log_every"],
              progress=run["progress"],
              pipeline=(config.pipeline_stages, config.pipeline_microbatches),
              compilation_cache=run["compilation_cache"], prefetch=run["prefetch"])


def _trainer(module, pretrained, run: dict, workdir: str):
  """The Trainer of a fine-tuning job (`optimizer`, `mesh` and `train` settings)."""
  from etjax import algorithms  # pylint: disable=g-import-not-at-top
  from etjax.train.trainer import Trainer  # pylint: disable=g-import-not-at-top
  from etjax.transfer import job as transfer_job  # pylint: disable=g-import-not-at-top
  # num_steps is None only where nothing trains (predict: the schedule is unused).
  total = run["num_steps"] or 1
  tx = transfer_job.make_tx_factory(optimizer())(total, (r"^encoder/",))
  peft_config = transfer()["peft"]
  if peft_config is None:
    step = algorithms.finetune(module, tx, pretrained=pretrained)
  else:
    from etjax.algorithms import peft  # pylint: disable=g-import-not-at-top
    step = peft.finetune(module, tx, peft_config, pretrained=pretrained)
  return Trainer(step, workdir=workdir, num_steps=total, **_trainer_options(run, module))


def _buckets(run: dict):
  """The batch lengths of `train.length_buckets` (None: pad to max_length)."""
  from etjax.data import bucketing  # pylint: disable=g-import-not-at-top
  if not run["length_buckets"]:
    return None
  return bucketing.bucket_lengths(run["max_length"], run["length_buckets"])


def _encoder(tokenizer, run: dict):
  from etjax.data import pipeline  # pylint: disable=g-import-not-at-top
  return lambda examples: pipeline.encode_examples(examples, tokenizer,
                                                   run["max_length"])


def _job(workdir_suffix: str = "", **classifier_changes):
  """Assembles (trainer, splits, tokenizer, encode, run, module) from the gin bindings.
  The tokenizer is the workdir's saved one when there is one (see tasks.make_tokenizer)."""
  from etjax.jobs import tasks  # pylint: disable=g-import-not-at-top
  run, model_cfg = train(), classifier()
  model_cfg.update(classifier_changes)
  # train.compute_dtype is the default; classifier.overrides may still set a dtype.
  model_cfg["overrides"] = {"dtype": run["compute_dtype"], **(model_cfg["overrides"] or {})}
  splits = data()
  if run["num_epochs"] is not None:
    run["num_steps"] = run["num_epochs"] * -(-len(splits.train) // run["batch_size"])
  workdir = _workdir(run, workdir_suffix)
  pretrained_dir = (tasks.resolve_pretrained(model_cfg["pretrained"])
                    if model_cfg["pretrained"] else None)
  teacher = _teacher(splits.label_names) if transfer()["teacher"] else None
  tokenizer = tasks.make_tokenizer(pretrained_dir, tasks.texts_of(splits.train),
                                   model_cfg["vocab_size"], workdir=workdir,
                                   teacher=teacher and teacher.tokenizer)
  module, pretrained = _classifier(len(splits.label_names), model_cfg, tokenizer,
                                   pretrained_dir)
  encode = _encoder(tokenizer, run)
  if transfer()["method"] is None:
    trainer = _trainer(module, pretrained, run, workdir)
  else:
    trainer = _transfer_run(splits, tokenizer, run, module, pretrained, workdir,
                            teacher=teacher)
  return trainer, splits, tokenizer, encode, run, module


def _teacher(label_names: Sequence[str]):
  """transfer.teacher's TrainedClassifier; its labels must be the job's."""
  from etjax.jobs import trained  # pylint: disable=g-import-not-at-top
  path = transfer()["teacher"]
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


def _transfer_run(splits, tokenizer, run: dict, module, pretrained, workdir: str,
                  saved_roles=None, teacher=None):
  """The RecipeRun of `transfer.method` on the data's roles (etjax.transfer); with
  `saved_roles` (predict: a trained workdir's roles.json) no data is read."""
  from etjax.data import pipeline  # pylint: disable=g-import-not-at-top
  from etjax.transfer import job, methods  # pylint: disable=g-import-not-at-top
  settings = transfer()
  method = methods.get(settings["method"])
  encode = _encoder(tokenizer, run)
  if saved_roles is not None:
    roles, eval_data = saved_roles, None
  else:
    roles = job.assign_roles(splits, splits.target_domains, where="data.train_path")
    methods.check_roles(method, roles)
    # Model choices (eval_every, keep-best) use the dev rows when there are any.
    eval_data = pipeline.eval_batches(encode(splits.dev or splits.eval),
                                      run["eval_batch_size"], buckets=_buckets(run),
                                      sort_by_length=True)
  materials = methods.Materials(
      roles=roles, encode=encode, make_classifier=lambda: module,
      make_encoder=module.encoder.clone,
      pretrained_encoder=pretrained["encoder"] if pretrained else None,
      make_tx=job.make_tx_factory(optimizer()),
      steps_for=job.steps_rule(run["num_steps"], run["num_epochs"], run["batch_size"]),
      batch_size=run["batch_size"], seed=run["seed"], eval_data=eval_data,
      teacher=(teacher.module, teacher.params) if teacher else None,
      vocab_size=tokenizer.vocab_size, workdir=workdir,
      source_task=_source_task(splits, saved_roles))
  stages = method.build(materials, job.method_settings(method, algorithm_settings(),
                                                       settings["method_args"]))
  return job.RecipeRun(stages, workdir, roles=roles, **_trainer_options(run, module))


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
  import contextlib  # pylint: disable=g-import-not-at-top
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
                                      buckets=_buckets(run), sort_by_length=True)
    if transfer()["method"] is None:
      train_iter = pipeline.train_iterator(encode(splits.train), run["batch_size"],
                                           seed=run["seed"], buckets=_buckets(run),
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
      encode(splits.eval), run["eval_batch_size"], buckets=_buckets(run),
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
  run, model_cfg = train(), classifier()
  workdir = _workdir(run, workdir_suffix)
  predict_io.check_output(output_path)  # before any work, so no result is lost
  tokenizer, label_names = tasks.load_job_assets(workdir)
  schema = assets.load_schema(workdir) or predict_io.input_schema(None, pairs=False)
  inputs = predict_io.read_inputs(input_path, schema)
  pretrained_dir = (tasks.resolve_pretrained(model_cfg["pretrained"])
                    if model_cfg["pretrained"] else None)
  module, _ = _classifier(len(label_names), model_cfg, tokenizer, pretrained_dir,
                          load_weights=False)
  encode = _encoder(tokenizer, run)
  examples = inputs.examples()
  if transfer()["method"] is None:
    trainer = _trainer(module, None, run, workdir)
  else:
    from etjax.transfer import roles  # pylint: disable=g-import-not-at-top
    saved = assets.load_roles(workdir)
    job_roles = roles.from_json(saved, where=os.path.join(workdir, assets.ROLES))
    examples = roles.with_domains(examples, inputs, saved, job_roles, where=input_path)
    teacher = _teacher(label_names) if transfer()["teacher"] else None
    trainer = _transfer_run(None, tokenizer, run, module, None, workdir,
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
  import tempfile  # pylint: disable=g-import-not-at-top
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


def cmd_run() -> None:
  """Runs the experiment of the gin file (a paper table) and prints its result."""
  result = experiment()
  print(result if isinstance(result, str) else repr(result))


def cmd_models() -> None:
  from etjax.models import list_models  # pylint: disable=g-import-not-at-top
  print("\n".join(list_models()))


def cmd_methods() -> None:
  """`etjax methods`: every transfer.method, one line each, with the settings it takes
  (transfer.method_args) and their defaults from gin/algorithms."""
  from etjax.transfer import methods  # pylint: disable=g-import-not-at-top
  defaults = algorithm_settings()
  print("transfer.method (bind its settings with --gin.transfer.method_args={...}):")
  for method in methods.METHODS.values():
    print(f"  {method.name:<12} {method.family:<9} {method.summary}")
    if method.settings_file:
      selectors = defaults[method.settings_file]
      shown = "; ".join(
          ", ".join(f"{name + '.' if len(selectors) > 1 else ''}{k}={v!r}"
                    for k, v in settings.items()
                    if k not in ("method", "num_domains", "num_labels"))  # derived
          for name, settings in selectors.items())
      print(f"  {'':<12} {'':<9} gin/algorithms/{method.settings_file}.gin: {shown}")


def cmd_plan() -> int:
  """`etjax plan`: the per-device memory of a model's train step, compiled from shapes."""
  import json  # pylint: disable=g-import-not-at-top
  from etjax.sharding import fake_devices  # pylint: disable=g-import-not-at-top
  from etjax.train import planning  # pylint: disable=g-import-not-at-top
  if not FLAGS.model or not FLAGS.mesh:
    raise ValueError("plan needs --model (a zoo name: etjax models) and --mesh "
                     "(e.g. data=2,fsdp=4,model=8)")
  spec = planning.PlanSpec(
      FLAGS.model, FLAGS.mesh, FLAGS.rules, FLAGS.batch, FLAGS.length,
      target_length=FLAGS.target_length, dtype=FLAGS.dtype, remat=FLAGS.remat,
      optimizer=FLAGS.optimizer, device_memory_gib=FLAGS.device_memory_gib,
      pipeline=planning.parse_pipeline(FLAGS.pipeline))
  fake_devices.ensure_fake_devices(spec.num_devices)
  result = planning.plan_model(spec)
  if FLAGS.json:
    print(json.dumps({"spec": dataclasses.asdict(spec), "plan": result.to_dict()}))
  else:
    print(result.format())
  return 0


# --- flags --------------------------------------------------------------------------------

FLAGS = flags.FLAGS
PROG = "etjax"

flags.DEFINE_multi_string("gin_file", [], "A gin file to parse (repeatable; later files "
                          "override earlier ones), e.g. gin/runs/demo.gin.")
flags.DEFINE_multi_string("gin_bindings", [], "A gin binding 'NAME = VALUE' (repeatable, "
                          "applied after the files). Shorthand: --gin.NAME=VALUE.")
flags.DEFINE_multi_string("gin_search_paths", [], "Extra directories gin files and "
                          "their includes are looked up in (before the current "
                          "directory and etjax's own gin/).")
flags.DEFINE_string("input", None, "predict: the texts to classify (TSV).")
flags.DEFINE_string("output", None, "predict: where to write the predictions TSV; "
                    "export: the export directory (versions OUTPUT/1, OUTPUT/2, ...).")
flags.DEFINE_bool("verbose", False, "Show the traceback of a user error too.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: process 0's host:port "
                    "(default: $JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", None, "Multi-host: processes in the job "
                     "(default: $JAX_NUM_PROCESSES).", lower_bound=1)
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index "
                     "(default: $JAX_PROCESS_ID).", lower_bound=0)
flags.DEFINE_enum("xla_flag_preset", "auto", ["auto", "none", "cpu", "gpu", "tpu"],
                  "XLA performance flags (latency-hiding scheduler, collective "
                  "combining) for the platform; 'auto' detects it.")
# `etjax plan`
flags.DEFINE_string("model", None, "plan: a zoo name (etjax models).")
flags.DEFINE_string("mesh", None, "plan: axis sizes, e.g. data=2,fsdp=4,model=8.")
flags.DEFINE_string("rules", "2d", "plan: dp, fsdp, tp, 2d or 3d.")
flags.DEFINE_integer("batch", 8, "plan: global batch size.")
flags.DEFINE_integer("length", 512, "plan: sequence length.")
flags.DEFINE_integer("target_length", 128, "plan: decoder length (encoder-decoders only).")
flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "plan: precision.")
flags.DEFINE_string("remat", "full", "plan: rematerialization policy.")
flags.DEFINE_string("optimizer", "adamw", "plan: optimizer preset.")
flags.DEFINE_string("pipeline", "1x1", "plan: STAGESxMICROBATCHES.")
flags.DEFINE_float("device_memory_gib", None, "plan: memory per device to check the "
                   "plan against.")
flags.DEFINE_bool("json", False, "plan: print one JSON object.")
# `etjax export` / `etjax serve`
flags.DEFINE_string("workdir", None, "export: the workdir of an `etjax train` run.")
flags.DEFINE_string("export_dir", None, "serve: an export directory (its newest "
                    "complete version is served; newer ones are picked up).")
flags.DEFINE_string("host", "127.0.0.1", "serve: address to bind (loopback unless told "
                    "otherwise).")
flags.DEFINE_integer("port", 8080, "serve: TCP port.", lower_bound=0)
flags.DEFINE_integer("max_batch_size", 32, "serve: instances run together at most.",
                     lower_bound=1)
flags.DEFINE_float("max_wait_ms", 5.0, "serve: how long a batch smaller than "
                   "--max_batch_size waits for more requests.", lower_bound=0)
flags.DEFINE_string("api_key_env", None, "serve: an environment variable holding the "
                    "API key that /v1/* requests must send (Authorization: Bearer KEY).")
# etjax app: EasyTransfer's flag names, parsed and checked by etjax.apps.config.
for _name in app_config.FLAG_NAMES:
  flags.DEFINE_string(_name, None, f"app: {app_config.FLAG_HELP[_name]}.")
app.define_help_flags()  # --help, --helpfull, ... listed with the flags above


# --- the command table -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Command:
  """One `etjax COMMAND`: `fn()` reads absl FLAGS (and, with uses_gin, the bound gin
  functions) and returns an exit code (anything else than an int means 0). `runtime`: start the XLA presets
  and the multi-controller runtime first."""
  fn: Callable[[], Optional[int]]
  help: str
  uses_gin: bool = True
  runtime: bool = True


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, *, uses_gin: bool = True,  # pylint: disable=redefined-builtin
            runtime: bool = True):
  """Registers `fn` as `etjax NAME` (a decorator)."""
  def register(fn):
    COMMANDS[name] = Command(fn, help, uses_gin, runtime)
    return fn
  return register


def _predict_command() -> None:
  if not FLAGS.input or not FLAGS.output:
    raise ValueError("predict needs --input and --output")
  cmd_predict(FLAGS.input, FLAGS.output)


command("train", "train (resuming from the workdir's checkpoints) and evaluate")(
    cmd_train)
command("eval", "evaluate the workdir's latest checkpoint")(cmd_eval)
command("predict", "classify --input into --output with the workdir's model")(
    _predict_command)
command("demo", "pretrained vs random-init fine-tuning, then a few predictions")(cmd_demo)
command("run", "run the experiment of the gin file (a paper table)")(cmd_run)
command("plan", "per-device memory of a zoo model's train step (no gin)",
        uses_gin=False, runtime=False)(cmd_plan)
command("models", "list the ModelZoo names", uses_gin=False, runtime=False)(cmd_models)
command("methods", "list the transfer methods (transfer.method) and their settings",
        uses_gin=False, runtime=False)(cmd_methods)


@command("export", "the workdir's best (else latest) checkpoint as a new jax.export "
         "version under --output", uses_gin=False)
def cmd_export() -> None:
  from etjax.serving import export  # pylint: disable=g-import-not-at-top
  if not FLAGS.workdir or not FLAGS.output:
    raise ValueError("export needs --workdir and --output")
  print(f"exported {FLAGS.workdir} to {export.export_workdir(FLAGS.workdir, FLAGS.output)}")


@command("serve", "serve --export_dir over HTTP (POST /v1/predict, GET /v1/metadata, "
         "GET /health)", uses_gin=False)
def cmd_serve() -> None:
  from etjax.serving import server  # pylint: disable=g-import-not-at-top
  if not FLAGS.export_dir:
    raise ValueError("serve needs --export_dir")
  config = server.ServerConfig(max_batch_size=FLAGS.max_batch_size,
                               max_wait_ms=FLAGS.max_wait_ms,
                               api_key=server.api_key_from_env(FLAGS.api_key_env))
  server.serve(FLAGS.export_dir, host=FLAGS.host, port=FLAGS.port, config=config)


@command("app", "an AppZoo application with EasyTransfer's flags (etjax app --help)")
def cmd_app() -> None:
  """`etjax app --mode=... --modelName=...`: gin's appzoo bindings, then the flags."""
  import json  # pylint: disable=g-import-not-at-top
  from etjax.apps import runner  # pylint: disable=g-import-not-at-top
  given = {**appzoo(), **{n: FLAGS[n].value for n in app_config.FLAG_NAMES
                          if FLAGS[n].present}}
  result = runner.run_app(given)
  print(result if isinstance(result, str) else json.dumps(result, default=float))


def app_usage() -> str:
  """`etjax app --help`: the apps, one line each, and the app flags."""
  from etjax.apps.registry import describe_apps  # pylint: disable=g-import-not-at-top
  return "\n".join(
      [f"usage: {PROG} app --mode=train|evaluate|predict|export --modelName=APP "
       "[--FLAG=VALUE ...] [--gin_file=gin/runs/apps/APP.gin]", "", "apps:",
       describe_apps(), "", "flags (EasyTransfer's names):"]
      + [f"  --{n:22s} {app_config.FLAG_HELP[n]}" for n in app_config.FLAG_NAMES])


# --- gin ------------------------------------------------------------------------------------


def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
  """`--gin.NAME=VALUE` (or `--gin.NAME VALUE`) becomes `--gin_bindings=NAME = VALUE`
  in place (t5x's shorthand); everything else is left for absl."""
  out, argv = [], list(argv)
  while argv:
    arg = argv.pop(0)
    if arg.startswith("--gin."):
      name, sep, value = arg[len("--gin."):].partition("=")
      if not sep:
        if not argv:
          raise flags.Error(f"{arg}: expected --gin.NAME=VALUE")
        value = argv.pop(0)
      arg = f"--gin_bindings={name} = {value}"
    out.append(arg)
  return out


def parse_gin_args(argv: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
  """Splits argv into (gin files, gin bindings, other args), shorthand rewritten."""
  files, bindings, rest = [], [], []
  argv = rewrite_gin_args(argv)
  while argv:
    arg = argv.pop(0)
    for flag, into in (("--gin_file", files), ("--gin_bindings", bindings)):
      if arg == flag or arg.startswith(flag + "="):
        into.append(arg.split("=", 1)[1] if "=" in arg else argv.pop(0))
        break
    else:
      rest.append(arg)
  return files, bindings, rest


def gin_search_roots(extra: Sequence[str] = ()) -> list[str]:
  """Directories gin paths resolve against: `extra`, the current directory, and the
  one holding etjax's gin/ (the checkout, or the installed package, which ships gin/
  as package data)."""
  package = os.path.dirname(os.path.abspath(__file__))
  # The checkout's root (editable installs), then the package (setup.py copies gin/
  # into it). 'gin/meshes' tells etjax's configs from the gin-config library's
  # site-packages/gin, which the first candidate may hold.
  shipped = [d for d in (os.path.dirname(package), package)
             if os.path.isdir(os.path.join(d, "gin", "meshes"))]
  roots = [os.path.abspath(p) for p in extra] + [os.getcwd()] + shipped
  return list(dict.fromkeys(roots))


def resolve_gin_path(path: str, roots: Sequence[str]) -> Optional[str]:
  """The first existing `root/path` (or `path` itself when absolute), else None."""
  if os.path.isabs(path):
    return path if os.path.isfile(path) else None
  return next((os.path.join(r, path) for r in roots
               if os.path.isfile(os.path.join(r, path))), None)


class _ResolvingReader:
  """A gin file reader for relative paths under the search roots: gin tries each
  reader per location prefix, so resolving here (first in line) spares its
  package-resource reader, which logs 'Path not found' for every miss."""
  roots: list = []

  @classmethod
  def exists(cls, path: str) -> bool:
    return resolve_gin_path(path, cls.roots) is not None

  @classmethod
  def open(cls, path: str):
    return open(resolve_gin_path(path, cls.roots), encoding="utf-8")


def _install_reader() -> None:
  readers = gin.config._FILE_READERS  # pylint: disable=protected-access
  entry = (_ResolvingReader.open, _ResolvingReader.exists)
  if entry not in readers:
    readers.insert(0, entry)


class _BindingError(ValueError):
  """A --gin binding whose value gin cannot parse."""


def _binding_error(binding: str, e: SyntaxError) -> ValueError:
  name, _, value = binding.partition("=")
  name, value = name.strip(), value.strip()
  detail = str(e).splitlines()[-1].strip() if str(e).strip() else "cannot parse"
  return _BindingError(
      f"gin binding {name} = {value}: {detail}; values are Python literals, so a "
      f"string or path needs quotes inside the flag: --gin.{name}=\"'{value}'\"")


def bind_gin(files: Sequence[str], bindings: Sequence[str],
             search_paths: Sequence[str] = ()) -> None:
  """Parses gin files and bindings; a misspelt name, an unparsable value or a missing
  file fails with a ValueError naming it."""
  register_experiments()
  gin.clear_config()
  _ResolvingReader.roots = gin_search_roots(search_paths)
  _install_reader()
  for path in files:
    if resolve_gin_path(path, _ResolvingReader.roots) is None:
      raise ValueError(f"--gin_file {path!r} not found (looked in "
                       f"{', '.join(_ResolvingReader.roots)})")
  try:
    gin.parse_config_files_and_bindings(list(files), None, finalize_config=False)
    for binding in bindings:
      try:
        gin.parse_config(binding)
      except SyntaxError as e:
        raise _binding_error(binding, e) from None
    gin.finalize()
  except _BindingError:
    raise
  except SyntaxError as e:
    where = f"{e.filename}:{e.lineno}: " if e.filename else ""
    raise ValueError(f"gin syntax error: {where}{_one_line(e)}") from None
  except IOError as e:
    raise ValueError(f"gin include not found: {e}") from None
  except (ValueError, KeyError) as e:
    raise ValueError(f"gin config error: {_one_line(e)}") from None


# --- running a command ---------------------------------------------------------------------


def _one_line(e: BaseException) -> str:
  """An exception's message on one line (gin appends 'In call to configurable ...'
  lines; KeyError quotes its message)."""
  text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
  lines = [l.strip() for l in str(text).splitlines() if l.strip()]
  lines = [l for l in lines if not l.startswith("In call to configurable")]
  return " ".join(lines) or type(e).__name__


def _user_error_code(e: BaseException) -> Optional[int]:
  """The exit code of an error the user can fix (bad input, missing file, diverged
  run, locked workdir), or None for a bug (which keeps its traceback)."""
  from etjax.train import checkpoints  # pylint: disable=g-import-not-at-top
  if isinstance(e, FloatingPointError):
    return 3  # training diverged
  if isinstance(e, (ValueError, OSError, SyntaxError, flags.Error,
                    checkpoints.CorruptCheckpointError)):
    return 2
  if isinstance(e, RuntimeError) and "Required bindings" in str(e):
    return 2  # gin: a REQUIRED parameter (say train.workdir) was not bound
  if type(e).__name__ == "WorkdirLockedError":
    return 2
  return None


def usage(full: bool = False) -> str:
  """`etjax --help`: commands, gin usage, data bindings and this binary's flags."""
  names = ", ".join(f"data.{p}" for p in inspect.signature(data).parameters)
  text = [__doc__.split("\n\n")[0].splitlines()[0], "",
          f"usage: {PROG} COMMAND [--gin_file=FILE ...] [--gin.NAME=VALUE ...] "
          "[flags]", "", "commands:"]
  text += [f"  {name:8s} {c.help}" for name, c in COMMANDS.items()]
  text += ["", "configuration (gin, t5x style):",
           "  --gin_file=FILE        a gin file (repeatable), e.g. gin/runs/demo.gin",
           "  --gin.NAME=VALUE       one binding, e.g. --gin.train.num_steps=200 or "
           "--gin.train.workdir=\"'runs/x'\"",
           "                         (VALUE is a Python literal: quote strings and paths)",
           "  --gin_bindings='NAME = VALUE'  the same, long form",
           "  configurables: data, classifier, optimizer, mesh, train, experiment",
           "  your own data: --gin.data.source=\"'files'\" "
           "--gin.data.train_path=\"'train.tsv'\" --gin.data.eval_path=\"'dev.tsv'\"",
           "    data bindings: " + names, ""]
  if full:
    text.append(FLAGS.get_help())
  else:
    text.append(FLAGS.module_help(sys.modules[__name__]))
    text.append("\n(all flags, absl's included: etjax --helpfull)")
  return "\n".join(text)


def _parse_flags(argv: Sequence[str]) -> list[str]:
  """absl flags of `argv` (program name first), after `--help`/`--helpfull`, which
  print the usage and exit 0. A bad flag exits 2 with one line."""
  argv = list(argv)
  FLAGS.unparse_flags()  # a second run in one process starts from the defaults
  if any(a in ("-h", "-help", "--help", "--helpshort", "-?", "--helpfull")
         for a in argv[1:]):
    print(app_usage() if "app" in argv[1:] else usage(full="--helpfull" in argv))
    raise SystemExit(0)
  try:
    return FLAGS(argv)
  except flags.Error as e:
    print(f"{PROG}: error: {_one_line(e)} (see {PROG} --help)", file=sys.stderr)
    raise SystemExit(2) from None


def _start_runtime() -> None:
  """XLA flag presets, then the multi-controller runtime when this is one process of
  many (flags, else the JAX_* environment that launch/ scripts set)."""
  from etjax.sharding import distributed, xla_flags  # pylint: disable=g-import-not-at-top
  if FLAGS.xla_flag_preset != "none":
    xla_flags.apply_xla_flags(None if FLAGS.xla_flag_preset == "auto"
                              else FLAGS.xla_flag_preset)
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                         FLAGS.process_id)


def _explicit_verbosity(argv: Sequence[str]) -> bool:
  del argv  # absl removed the flags; FLAGS remembers whether they were given
  return any(FLAGS[name].present for name in ("verbosity", "v") if name in FLAGS)


def _main(argv: Sequence[str]) -> int:
  """Runs the command named by the positional arguments left after absl's parse."""
  if len(argv) < 2 or argv[1] not in COMMANDS:
    got = f"unknown command {argv[1]!r}" if len(argv) > 1 else "no command given"
    print(f"{PROG}: error: {got}; expected one of {', '.join(COMMANDS)} "
          f"(see {PROG} --help)", file=sys.stderr)
    return 2
  name, extra = argv[1], argv[2:]
  if extra:
    print(f"{PROG} {name}: error: unexpected arguments {extra} (flags are --NAME=VALUE)",
          file=sys.stderr)
    return 2
  cmd = COMMANDS[name]
  if not _explicit_verbosity(argv):
    # absl.app turns INFO on; the libraries' INFO lines (orbax's per save) would bury
    # the command's own output, so only warnings show unless -v/--verbosity says.
    logging.set_verbosity(logging.WARNING)
  try:
    if cmd.runtime:
      _start_runtime()
    if cmd.uses_gin:
      bind_gin(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.gin_search_paths)
    result = cmd.fn()
    return result if isinstance(result, int) else 0
  except Exception as e:  # pylint: disable=broad-except
    code = _user_error_code(e)
    if code is None:
      raise  # a bug: keep the traceback
    if FLAGS.verbose:
      traceback.print_exc()
    logging.debug("etjax %s failed", name, exc_info=True)
    print(f"{PROG} {name}: error: {_one_line(e)}", file=sys.stderr)
    return code


def run(argv: Optional[Sequence[str]] = None) -> int:
  """Entry point of the `etjax` console script (argv None: through absl.app.run, which
  sets up absl logging) and of tests (an argv list: the same parse and dispatch in this
  process, which absl.app allows only once). Returns the exit code."""
  try:
    args = [PROG] + rewrite_gin_args(sys.argv[1:] if argv is None else argv)
  except flags.Error as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return 2
  try:
    if argv is None:
      app.run(_main, argv=args, flags_parser=_parse_flags)
      return 0
    return _main(_parse_flags(args))
  except SystemExit as e:
    return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)


if __name__ == "__main__":
  sys.exit(run())
