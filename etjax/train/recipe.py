"""Runs a recipe (etjax.algorithms.recipe): its stages one after another with the one
Trainer, stage k in `<workdir>/<k>_<name>`, each starting from the parameters of the
stage before. Re-running a stopped recipe resumes where it stopped: finished stages
restore their final checkpoint (nothing is retrained), the interrupted stage resumes
from its own latest checkpoint and data position, so the run ends with exactly the
parameters of an uninterrupted one.
"""

from __future__ import annotations

import os
import re
from typing import Optional, Sequence

from etjax.algorithms.recipe import Stage, carry_params
from etjax.train.trainer import FitResult, Trainer


def stage_dirs(workdir: str, stages: Sequence[Stage]) -> list[str]:
  """The sub-workdir of each stage: '<workdir>/<k>_<name>'; a one-stage recipe trains
  in the workdir itself (a plain run's layout, which eval, predict and export read).

  Raises:
    ValueError: for a name that is not a plain file name, or a repeated name.
  """
  names = [s.name for s in stages]
  for name in names:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in (".", ".."):
      raise ValueError(f"recipe stage name {name!r} must be a plain file name "
                       "(letters, digits, '_', '.', '-')")
  if len(set(names)) != len(names):
    raise ValueError(f"recipe stage names repeat: {names}")
  if len(names) == 1:
    return [workdir]
  return [os.path.join(workdir, f"{k}_{name}") for k, name in enumerate(names)]


def stage_trainer(stage: Stage, directory: str, **trainer_kwargs) -> Trainer:
  """The Trainer of one stage in its directory (training, or restoring for eval)."""
  return Trainer(stage.step, workdir=directory, num_steps=stage.num_steps,
                 **trainer_kwargs)


def run_recipe(stages: Sequence[Stage], workdir: str, **trainer_kwargs
               ) -> list[FitResult]:
  """Trains every stage; returns each stage's FitResult (the last is the recipe's).
  `stage_trainer(stages[-1], stage_dirs(...)[-1], ...)` evaluates or predicts with the
  last stage.

  Args:
    stages: the recipe.
    workdir: the recipe's directory; each stage has its own below it.
    **trainer_kwargs: Trainer options shared by the stages (mesh, rules, seed,
      checkpoint_every, ...).
  """
  if not stages:
    raise ValueError("run_recipe: a recipe needs at least one stage")
  results: list[FitResult] = []
  for stage, directory in zip(stages, stage_dirs(workdir, stages)):
    trainer = stage_trainer(stage, directory, **trainer_kwargs)
    results.append(fit_stage(trainer, stage, results[-1] if results else None))
  return results


def fit_stage(trainer: Trainer, stage: Stage, previous: Optional[FitResult]
              ) -> FitResult:
  """Trains one stage (resuming from its own checkpoints), starting a fresh run from
  the previous stage's final state through the stage's carry."""
  start_from = None
  if previous is not None:
    carry = stage.carry or carry_params
    start_from = lambda fresh: carry(previous.state, fresh)
  return trainer.fit(stage.train_data(), stage.eval_data, start_from=start_from)
