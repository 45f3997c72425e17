"""A trained workdir as a classifier, without gin or the training job.

`etjax train` leaves model.json (the architecture), the tokenizer, labels.json and
checkpoints in its workdir; `load_classifier` rebuilds the module and reads the
params of one step (given, else the best by a metric, else the latest complete one).
Export and distillation teachers (transfer.teacher) read workdirs this way.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from etjax.jobs import tasks
from etjax.train import checkpoints as ckpt_lib


def restore_params(checkpoint_dir: str, module: nn.Module, example_length: int = 8
                   ) -> dict:
  """The classifier's params (numpy) from one checkpoint step directory, verified
  against its integrity record; the optimizer state is not read."""
  ckpt_lib.verify_integrity(checkpoint_dir)
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  ids = jnp.zeros((1, example_length), jnp.int32)
  abstract = nn.meta.unbox(jax.eval_shape(
      lambda: module.init(jax.random.key(0), ids))["params"])
  target = {"params": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                   abstract)}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
  with ocp.PyTreeCheckpointer() as checkpointer:
    restored = checkpointer.restore(
        os.path.join(checkpoint_dir, "state"),
        args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                    partial_restore=True))
  return restored["params"]


def choose_step(workdir: str, step: Optional[int] = None,
                best_metric: Optional[str] = "accuracy") -> tuple[int, str]:
  """(step, how it was chosen): `step` if given, else the best by `best_metric`, else
  the latest step whose files pass their integrity check."""
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       best_metric=best_metric)
  try:
    steps = checkpointer.all_steps()
    if step is not None:
      if step not in steps:
        raise ValueError(f"{checkpointer.directory}: no step {step}; steps: {steps}")
      return step, "given"
    best = checkpointer.best_step() if best_metric else None
    if best is not None:
      return best, f"best {best_metric}"
    for candidate in reversed(steps):
      try:
        ckpt_lib.verify_integrity(checkpointer.step_dir(candidate))
        return candidate, "latest"
      except ckpt_lib.CorruptCheckpointError as e:
        warnings.warn(f"skipping checkpoint step {candidate}: {e}", RuntimeWarning,
                      stacklevel=2)
    raise ValueError(f"{checkpointer.directory}: no complete checkpoint to export")
  finally:
    checkpointer.close()


@dataclasses.dataclass(frozen=True)
class TrainedClassifier:
  """What a workdir holds: module (SequenceClassifier), params (numpy), tokenizer,
  label_names, spec (model.json) and the step read (with how it was chosen)."""
  module: Any
  params: dict
  tokenizer: Any
  label_names: list
  spec: dict
  step: int
  chosen: str


def load_classifier(workdir: str, *, step: Optional[int] = None,
                    best_metric: Optional[str] = "accuracy") -> TrainedClassifier:
  """The classifier an `etjax train` run left in `workdir`.

  Raises:
    ValueError: no such directory, no checkpoints or model.json, or a damaged step.
  """
  workdir = os.path.abspath(workdir)
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise ValueError(f"{workdir} has no checkpoints/: not a trained etjax workdir")
  module, spec = tasks.load_model_spec(workdir)
  tokenizer, label_names = tasks.load_job_assets(workdir)
  chosen, how = choose_step(workdir, step, best_metric)
  try:
    params = restore_params(os.path.join(workdir, "checkpoints", str(chosen)), module)
  except ckpt_lib.CorruptCheckpointError as e:
    raise ValueError(f"{workdir}: {e}") from e
  return TrainedClassifier(module, params, tokenizer, label_names, spec, chosen, how)
