"""A transfer job from plain settings: roles, optimizer, stages, training, evaluation.

What `etjax train` / `eval` / `predict` run when `transfer.method` is set (etjax/cli
reads gin; etjax.jobs.runs passes plain values here).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional, Sequence

import optax

from etjax.algorithms import optim
from etjax.train import recipe as recipe_lib
from etjax.train import trainer as trainer_lib
from etjax.train.trainer import FitResult
from etjax.transfer import methods as methods_lib
from etjax.transfer import roles as roles_lib


def make_tx_factory(opt: Mapping[str, Any]
                    ) -> Callable[[int, Sequence[str]], optax.GradientTransformation]:
  """(total steps, regexes of pretrained parameter paths) -> the optimizer.

  Args:
    opt: the `optimizer` settings (name, learning_rate, warmup_fraction, weight_decay,
      max_grad_norm, new_params_learning_rate). With new_params_learning_rate, the
      parameters outside the pretrained paths (heads, discriminators, selectors'
      classifiers' new layers) train at that rate, the pretrained ones at
      learning_rate (etjax.algorithms.optim.param_groups).
  """
  def make(total: int, pretrained_paths: Sequence[str]) -> optax.GradientTransformation:
    def preset(learning_rate):
      return optim.make_optimizer(
          opt["name"], learning_rate=learning_rate, total_steps=total,
          warmup_steps=int(opt["warmup_fraction"] * total),
          weight_decay=opt["weight_decay"], max_grad_norm=opt["max_grad_norm"])
    new_lr = opt.get("new_params_learning_rate")
    if new_lr is None:
      return preset(opt["learning_rate"])
    return optim.param_groups(
        {"pretrained": preset(opt["learning_rate"]), "new": preset(new_lr)},
        [(p, "pretrained") for p in pretrained_paths], default="new")
  return make


def steps_rule(num_steps: Optional[int], num_epochs: Optional[int], batch_size: int
               ) -> Callable[[int], int]:
  """Rows of a stage's data -> its updates: num_steps, or num_epochs passes."""
  if num_epochs is None:
    return lambda rows: num_steps
  return lambda rows: num_epochs * max(1, math.ceil(rows / batch_size))


def method_settings(method: methods_lib.Method, defaults: Mapping[str, Mapping],
                    overrides: Optional[Mapping[str, Any]]) -> dict:
  """The method's keyword arguments: its gin/algorithms file's bindings updated by
  `transfer.method_args` ({arg: value} for a file of one function; for a file of
  several, {selector: {arg: value}} updated by 'selector.arg' keys).

  Raises:
    ValueError: method_args for a method without settings.
  """
  if overrides and not method.settings_file:
    raise ValueError(f"transfer.method_args {dict(overrides)}: method "
                     f"{method.name!r} takes no settings")
  if not method.settings_file:
    return {}
  by_selector = {k: dict(v) for k, v in defaults[method.settings_file].items()}
  if len(by_selector) == 1:
    (settings,) = by_selector.values()
    settings.update(overrides or {})
    return settings
  # A file of several functions (metakd: meta_teacher and metakd): 'selector.arg'.
  for key, value in (overrides or {}).items():
    selector, _, arg = key.partition(".")
    if selector not in by_selector or not arg:
      raise ValueError(f"transfer.method_args key {key!r}: method {method.name!r} "
                       f"takes 'selector.argument' keys, selectors "
                       f"{sorted(by_selector)}")
    by_selector[selector][arg] = value
  return by_selector


class RecipeRun:
  """A method's stages in one workdir: trains them (resuming in the stage it stopped
  in) and evaluates, restores and predicts with the target model, the last stage's
  (its directory: the workdir for one stage, '<workdir>/<k>_<name>' for several).

  Attributes:
    workdir: the job's directory (assets and config.gin live here).
    final: the last stage's Trainer.
    roles: the job's Roles (for roles.json), when given.
  """

  def __init__(self, stages: Sequence, workdir: str, *,
               roles: Optional[roles_lib.Roles] = None, **trainer_kwargs):
    self.stages, self.workdir, self.trainer_kwargs = list(stages), workdir, trainer_kwargs
    self.roles = roles
    self.resumed_from: Optional[int] = None  # set by `fit`
    self.final = recipe_lib.stage_trainer(
        self.stages[-1], recipe_lib.stage_dirs(workdir, self.stages)[-1],
        **trainer_kwargs)
    self.workdir = self.final.workdir if len(self.stages) == 1 else workdir

  def fit(self) -> FitResult:
    """Trains every stage (a finished one restores its final checkpoint, the stopped
    one resumes); returns the last stage's FitResult."""
    result = None
    self.resumed_from = None
    for stage, directory in zip(self.stages,
                                recipe_lib.stage_dirs(self.workdir, self.stages)):
      trainer = recipe_lib.stage_trainer(stage, directory, **self.trainer_kwargs)
      result = recipe_lib.fit_stage(trainer, stage, result)
      # The step the interrupted stage went on from (a finished stage's restore is
      # not a resumption of training).
      resumed = getattr(trainer, "resumed_from", None)
      if resumed is not None and resumed < stage.num_steps:
        self.resumed_from = resumed
    self.final = trainer  # set up by its training: evaluates without a second trace
    return result

  def check_resumable(self, example_batch) -> None:
    """The target model's checkpoints, where there are any, fit this job's state.
    Without them the first stage is traced instead (its model fails now, before
    anything is written): the last stage's step may be defined by an earlier stage's
    result (AdaBERT's retraining of the cells its search chose)."""
    if self.final.checkpointer.all_steps() or len(self.stages) == 1:
      self.final.check_resumable(example_batch)
      return
    first = recipe_lib.stage_trainer(
        self.stages[0], recipe_lib.stage_dirs(self.workdir, self.stages)[0],
        **self.trainer_kwargs)
    first.check_resumable(example_batch)

  def write_config(self, text: str) -> str:
    return trainer_lib.write_config(self.workdir, text)

  def restore(self, example_batch):
    return self.final.restore(example_batch)

  def evaluate(self, state, eval_data) -> dict:
    return self.final.evaluate(state, eval_data)

  def predict(self, state, data) -> dict:
    return self.final.predict(state, data)




def assign_roles(splits, target_domains, where: str) -> roles_lib.Roles:
  """Roles of a job's Splits (train, eval, dev) by `data.target_domains`."""
  roles = roles_lib.assign(splits.train, splits.eval, splits.dev,
                           domain_names=splits.domain_names,
                           target_domains=target_domains, where=where)
  if splits.source_task is None:
    return roles
  return dataclasses.replace(roles, source_task_labels=len(splits.source_task[1]))
