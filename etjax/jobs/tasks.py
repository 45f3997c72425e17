"""Classification jobs from plain settings: data splits, tokenizer, model, TrainStep.

The pieces the command line (etjax/cli) and notebooks assemble a fine-tuning run
from; everything takes plain arguments (no gin here).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from typing import Any, Optional, Sequence

from etjax import models
from etjax.data import readers, synthetic, tokenizers
from etjax.data.debian import load_debian_descriptions
from etjax.train import assets


@dataclasses.dataclass(frozen=True)
class Splits:
  """Labelled examples of one job.

  Attributes:
    train, eval: lists of etjax.data.Example.
    dev: the dev file's examples, or None.
    target_domains: the domains that are the target of a transfer job (empty: all).
    source_task: MetaDTL's cross-task source: its rows (labels in its own label
      set) and label names, or None.
    label_names: label strings (Example.label indexes them).
    domain_names: domain strings (Example.domain indexes them).
    schema, format: the readers.Schema and format of file data (None otherwise).
  """
  train: list
  eval: list
  label_names: tuple[str, ...]
  domain_names: tuple[str, ...] = ()
  schema: Optional[readers.Schema] = None  # how files were read (None: not files)
  format: Optional[str] = None
  dev: Optional[list] = None  # rows for model choices (a dev file), never the eval's
  target_domains: tuple[str, ...] = ()  # a transfer job's target domain values
  source_task: Optional[tuple[list, tuple[str, ...]]] = None  # (rows, label names)


def synthetic_splits(*, task: str = "sentiment",
                     domains: Sequence[str] = synthetic.DOMAINS,
                     train_size: int = 200, eval_size: int = 200, seed: int = 0,
                     label_noise: float = 0.05) -> Splits:
  """Multi-domain synthetic data: `train_size` and `eval_size` examples per domain."""
  per_domain = synthetic.multi_domain_splits(
      {d: (train_size, 0, eval_size) for d in domains}, seed=seed, task=task,
      label_noise=label_noise)
  labels = synthetic.PARAPHRASE_LABELS if task == "paraphrase" else \
      synthetic.SENTIMENT_LABELS
  return Splits(train=[ex for d in domains for ex in per_domain[d]["train"]],
                eval=[ex for d in domains for ex in per_domain[d]["test"]],
                label_names=tuple(labels), domain_names=tuple(synthetic.DOMAINS))


def file_splits(train_path: str, eval_path: str, schema: readers.Schema, *,
                format: Optional[str] = None,  # pylint: disable=redefined-builtin
                on_error: str = "raise", dev_path: Optional[str] = None) -> Splits:
  """Train, eval (and dev) files read with one schema; the label and domain
  vocabularies are fixed by the training file."""
  train = readers.read_examples(train_path, schema, format=format, on_error=on_error)
  read_like_train = lambda path: list(readers.read_examples(
      path, schema, format=format, label_vocab=train.label_vocab,
      domain_vocab=train.domain_vocab or None, on_error=on_error))
  return Splits(train=list(train), eval=read_like_train(eval_path),
                label_names=train.label_vocab, domain_names=train.domain_vocab,
                schema=schema, format=format or readers.guess_format(train_path),
                dev=read_like_train(dev_path) if dev_path else None)


def source_task_rows(path: str, schema: readers.Schema, *,
                     format: Optional[str] = None,  # pylint: disable=redefined-builtin
                     on_error: str = "raise") -> tuple[list, tuple[str, ...]]:
  """A cross-task source file (MetaDTL): its rows and its own label set; the schema's
  domain column is not read."""
  rows = readers.read_examples(path, dataclasses.replace(schema, domain=None),
                               format=format, on_error=on_error)
  return list(rows), tuple(rows.label_vocab)


def debian_splits(directory: str, task: str = "use") -> Splits:
  """The human-labelled Debian package descriptions (train / test splits)."""
  data = load_debian_descriptions(directory, task=task)
  return Splits(train=list(data["train"]), eval=list(data["test"]),
                label_names=tuple(data.label_vocab), domain_names=tuple(data.domain_vocab))


def seqio_splits(task_or_mixture: str, *, modules: Sequence[str] = (),
                 debian_dir: Optional[str] = None, train_split: str = "train",
                 eval_split: str = "test", num_train_examples: Optional[int] = None,
                 seed: int = 0) -> Splits:
  """Train and eval examples from a seqio Task or Mixture (the `etjax[seqio]` extra).

  Args:
    task_or_mixture: a name registered through etjax.data.seqio_tasks.
    modules: Python modules to import first; importing them registers the user's tasks.
    debian_dir: when given, the Debian tasks (debian_use, debian_network, their
      per-domain tasks and `.domains` mixtures) are registered from it first.
    train_split, eval_split: the splits to read.
    num_train_examples: rows to sample from a Mixture's training split (a Task is read
      whole when None).
    seed: the Mixture's sampling seed.
  """
  from etjax.data import seqio_tasks  # pylint: disable=g-import-not-at-top
  for module in modules:
    importlib.import_module(module)
  if debian_dir:
    seqio_tasks.register_debian_tasks(debian_dir)
  label_names, domain_names = seqio_tasks.vocabularies(task_or_mixture)
  train = seqio_tasks.load_examples(task_or_mixture, train_split,
                                    num_examples=num_train_examples, seed=seed)
  evaluation = seqio_tasks.load_examples(_eval_task_of(task_or_mixture), eval_split)
  return Splits(train=train, eval=evaluation, label_names=label_names,
                domain_names=domain_names)


def _eval_task_of(name: str) -> str:
  """A `.domains` mixture is evaluated on its whole task (every domain, in order)."""
  return name[:-len(".domains")] if name.endswith(".domains") else name


def read_splits(source: str, *, train_path, eval_path, format, text_a, text_b, label,  # pylint: disable=redefined-builtin
                domain, header, on_error, synthetic_task, domains, train_size,
                eval_size, label_noise, seed, debian_dir, debian_task, task_or_mixture,
                seqio_modules, train_split, eval_split, num_train_examples, dev_path,
                target_domains, source_task_path, source_task_label) -> Splits:
  """The Splits of the `data` settings (etjax/cli/configurables.py documents each);
  errors name the setting as `data.NAME`."""
  if dev_path and source != "files":
    raise ValueError(f"data.dev_path is for data.source = 'files', not {source!r}")
  if source == "synthetic":
    splits = synthetic_splits(task=synthetic_task, domains=domains,
                              train_size=train_size, eval_size=eval_size, seed=seed,
                              label_noise=label_noise)
  elif source == "files":
    if not train_path or not eval_path:
      raise ValueError("data.source = 'files' needs data.train_path and data.eval_path")
    schema = readers.Schema(text_a=text_a, label=label, text_b=text_b, domain=domain,
                            header=header)
    splits = file_splits(train_path, eval_path, schema, format=format,
                         on_error=on_error, dev_path=dev_path)
  elif source == "debian":
    if not debian_dir:
      raise ValueError("data.source = 'debian' needs data.debian_dir")
    splits = debian_splits(debian_dir, debian_task)
  elif source == "seqio":
    if not task_or_mixture:
      raise ValueError("data.source = 'seqio' needs data.task_or_mixture")
    splits = seqio_splits(task_or_mixture, modules=seqio_modules, debian_dir=debian_dir,
                          train_split=train_split, eval_split=eval_split,
                          num_train_examples=num_train_examples, seed=seed)
  else:
    raise ValueError(f"data.source = {source!r}: expected 'synthetic', 'files', "
                     "'debian' or 'seqio'")
  if isinstance(target_domains, str):
    raise ValueError(f"data.target_domains = {target_domains!r}: give a list, e.g. "
                     f"['{target_domains}']")
  source_task = None
  if source_task_path:
    schema = readers.Schema(text_a=text_a, text_b=text_b, header=header,
                            label=source_task_label or label)
    source_task = source_task_rows(source_task_path, schema, format=format,
                                   on_error=on_error)
  return dataclasses.replace(splits, target_domains=tuple(target_domains or ()),
                             source_task=source_task)


def resolve_pretrained(spec: str) -> str:
  """A model directory for `spec`: a path, a hub id, or 'package:NAME' for a Python
  package that ships weights and exposes NAME.get_model_path()."""
  if spec.startswith("package:"):
    name = spec[len("package:"):]
    try:
      module = importlib.import_module(name)
    except ModuleNotFoundError as e:
      raise ValueError(f"pretrained {spec!r}: Python package {name!r} is not installed"
                       ) from e
    if not callable(getattr(module, "get_model_path", None)):
      raise ValueError(f"pretrained {spec!r}: package {name!r} ships no model weights "
                       "(it has no get_model_path())")
    return module.get_model_path()
  return models.hf.resolve_directory(spec)


def make_tokenizer(pretrained_dir: Optional[str], train_texts: Sequence[str],
                   vocab_size: int, workdir: Optional[str] = None,
                   teacher: Optional[tokenizers.Tokenizer] = None
                   ) -> tokenizers.Tokenizer:
  """The tokenizer a run saved in `workdir` (resumed runs, eval, predict: the one the
  checkpoints were trained with), else the pretrained model's, else a distillation
  teacher's, else a WordPiece one learnt (deterministically) from the train texts.

  Raises:
    ValueError: a teacher whose vocabulary differs from the pretrained model's (a
      student and its teacher must read the same token ids).
  """
  if workdir and assets.has_tokenizer(workdir):
    return assets.load_tokenizer(workdir)
  if pretrained_dir:
    tokenizer = tokenizers.load_tokenizer(pretrained_dir)
    if teacher is not None and (tokenizer.backend.get_vocab() !=
                                teacher.backend.get_vocab()):
      raise ValueError(f"the student's tokenizer ({pretrained_dir}) differs from "
                       "transfer.teacher's: distillation feeds both the same token "
                       "ids, so give a student of the teacher's vocabulary")
    return tokenizer
  if teacher is not None:
    return teacher
  return tokenizers.build_wordpiece_tokenizer(train_texts, vocab_size)


def texts_of(examples: Sequence[Any]) -> list[str]:
  return [t for ex in examples for t in (ex.text_a, ex.text_b) if t]


def build_classifier(num_labels: int, *, model: Optional[str] = None,
                     pretrained_dir: Optional[str] = None, random_init: bool = False,
                     dropout: float = 0.1, overrides: Optional[dict] = None,
                     load_weights: bool = True) -> tuple[Any, Optional[dict]]:
  """A SequenceClassifier and the pretrained encoder weights to start from.

  Args:
    num_labels: classes.
    model: a zoo name (used when `pretrained_dir` is None).
    pretrained_dir: a Hugging Face directory; its config gives the architecture.
    random_init: keep the pretrained architecture but start from random weights (the
      no-transfer baseline).
    overrides: config fields to change (dtype, attention backend, sizes, ...).
    load_weights: False reads only the pretrained config (the architecture), for a
      model whose weights come from a checkpoint.

  Returns:
    (module, {'encoder': params} or None).
  """
  overrides = dict(overrides or {})
  if pretrained_dir and not load_weights:
    encoder = models.module_for(models.config_from_pretrained(pretrained_dir,
                                                              **overrides))
    pretrained = None
  elif pretrained_dir:
    encoder, params = models.from_pretrained(pretrained_dir, **overrides)
    pretrained = None if random_init else {"encoder": params}
  elif model:
    encoder, pretrained = models.create_model(model, **overrides), None
  else:
    raise ValueError("build_classifier: give a zoo model name or a pretrained directory")
  return models.SequenceClassifier(encoder, num_labels=num_labels,
                                   dropout_rate=dropout), pretrained


def save_job_assets(workdir: str, tokenizer: tokenizers.Tokenizer,
                    label_names: Sequence[str], schema: Optional[dict] = None) -> None:
  """Writes what `predict` needs beside the checkpoints (tokenizer, label names, input
  schema): atomically, only where missing, and failing naming the difference where the
  workdir holds different ones (etjax.train.assets)."""
  assets.save(workdir, assets.job_files(tokenizer, label_names, schema))


def load_job_assets(workdir: str) -> tuple[tokenizers.Tokenizer, list[str]]:
  """The tokenizer and label names a training run saved in `workdir`."""
  return assets.load_tokenizer(workdir), assets.load_labels(workdir)


MODEL_SPEC = "model.json"


def model_spec(module: Any, *, max_length: int, name: str) -> dict:
  """The content of model.json: what rebuilds the classifier without gin (the
  encoder's config, the number of labels, the trained length and a model name)."""
  config = module.encoder.config
  return {"name": name, "config_type": type(config).__name__,
          "config": dataclasses.asdict(config), "num_labels": int(module.num_labels),
          "dropout": float(module.dropout_rate), "max_length": int(max_length)}


def save_model_spec(workdir: str, module: Any, *, max_length: int, name: str) -> str:
  """Writes model.json (`model_spec`) beside the checkpoints; returns its path."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, MODEL_SPEC)
  with open(path + ".tmp", "w") as f:
    json.dump(model_spec(module, max_length=max_length, name=name), f, indent=1,
              sort_keys=True)
  os.replace(path + ".tmp", path)
  return path


def peft_files(config: Any) -> dict:
  """{'peft_config.json': the PeftConfig as JSON} of a transfer.peft run, {} without
  one: with model.json, what rebuilds the model that trained (etjax.jobs.trained)."""
  if config is None:
    return {}
  from etjax.algorithms import peft  # pylint: disable=g-import-not-at-top
  return {peft.CONFIG_FILE: peft.config_json(config)}


def load_model_spec(workdir: str) -> tuple[Any, dict]:
  """(SequenceClassifier, spec dict) rebuilt from the workdir's model.json."""
  path = os.path.join(workdir, MODEL_SPEC)
  if not os.path.exists(path):
    raise ValueError(f"{workdir} has no {MODEL_SPEC}: was a classifier trained there "
                     "(etjax train writes it)?")
  with open(path) as f:
    spec = json.load(f)
  config_cls = getattr(models, spec["config_type"], None)
  if not isinstance(config_cls, type) or not dataclasses.is_dataclass(config_cls):
    raise ValueError(f"{path}: config_type {spec['config_type']!r} is not a model "
                     "config class of etjax.models")
  config = models.config_from_dict(config_cls, spec["config"], where=path)
  return models.SequenceClassifier(models.module_for(config),
                                   num_labels=spec["num_labels"],
                                   dropout_rate=spec["dropout"]), spec
