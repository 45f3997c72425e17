"""The gin configurables of the `etjax` command line, under the names users' gin files
bind: `data`, `classifier`, `optimizer`, `mesh`, `transfer`, `train`, `experiment` and
`appzoo`.

Each returns its plain settings (a dict, a tuple, or the Splits of `data`); etjax.jobs
assembles the run from them. Their names and arguments are the configuration's
interface: renaming one breaks every gin file that binds it.
"""

from __future__ import annotations

from typing import Optional, Sequence

import gin

from etjax.cli import algorithm_files
from etjax.data import synthetic


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
  from etjax.jobs import tasks  # pylint: disable=g-import-not-at-top
  return tasks.read_splits(
      source, train_path=train_path, eval_path=eval_path, format=format, text_a=text_a,
      text_b=text_b, label=label, domain=domain, header=header, on_error=on_error,
      synthetic_task=synthetic_task, domains=domains, train_size=train_size,
      eval_size=eval_size, label_noise=label_noise, seed=seed, debian_dir=debian_dir,
      debian_task=debian_task, task_or_mixture=task_or_mixture,
      seqio_modules=seqio_modules, train_split=train_split, eval_split=eval_split,
      num_train_examples=num_train_examples, dev_path=dev_path,
      target_domains=target_domains, source_task_path=source_task_path,
      source_task_label=source_task_label)


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
  return fn(settings=algorithm_files.algorithm_settings())


@gin.configurable
def appzoo(**app_flags):
  """`etjax app` settings under EasyTransfer's flag names (gin/runs/apps/*.gin bind
  them, e.g. appzoo.modelName = 'text_classify_bert'); command-line flags win."""
  return app_flags
