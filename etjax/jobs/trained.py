"""A trained workdir as a classifier, without gin or the training job.

`etjax train` leaves model.json (the architecture), the tokenizer, labels.json and
checkpoints in its workdir, and peft_config.json after a transfer.peft run;
`load_classifier` rebuilds the module that trained and reads the params of one step
(given, else the best by a metric, else the latest complete one). Export and
distillation teachers (transfer.teacher) read workdirs this way.

A PEFT run's model is the classifier with its method attached: LoRA is folded into the
base kernels (peft.merge_lora: a plain classifier again), adapters and prompts run
through peft.PeftModel. A checkpoint holding parameters the rebuilt model lacks is
refused rather than read partially (Flax ignores unused params: the result would be
a different model than the one trained).
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from typing import Any, Optional

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from etjax.jobs import tasks
from etjax.train import checkpoints as ckpt_lib


def restore_params(checkpoint_dir: str, module: nn.Module, example_length: int = 8
                   ) -> dict:
  """The classifier's params (numpy) from one checkpoint step directory, verified
  against its integrity record; the optimizer state is not read.

  Raises:
    ValueError: the checkpoint holds parameters `module` has none of (naming them).
  """
  ckpt_lib.verify_integrity(checkpoint_dir)
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  ids = jnp.zeros((1, example_length), jnp.int32)
  abstract = nn.meta.unbox(jax.eval_shape(
      lambda: module.init(jax.random.key(0), ids))["params"])
  with ocp.PyTreeCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(os.path.join(checkpoint_dir, "state"))
  saved = getattr(getattr(metadata, "item_metadata", metadata), "tree", metadata)
  unused = sorted(set(traverse_util.flatten_dict(saved["params"], sep="/")) -
                  set(traverse_util.flatten_dict(abstract, sep="/")))
  if unused:
    from etjax.algorithms import peft  # pylint: disable=g-import-not-at-top
    peft_like = any(re.search(p, k) for p in peft.OWN_PARAMS.values() for k in unused)
    raise ValueError(
        f"{checkpoint_dir}: the checkpoint holds {len(unused)} parameter(s) the model "
        f"rebuilt from the workdir lacks, e.g. {unused[:4]}; reading it would give "
        "another model than the one trained" + (
            " (PEFT parameters: a transfer.peft run from before its peft_config.json "
            "was saved; write that file with etjax.algorithms.peft.config_json of the "
            "run's settings)" if peft_like else ""))
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
  label_names, spec (model.json), the step read (with how it was chosen) and peft
  (the run's PeftConfig, None without one; LoRA is merged: module is then plain)."""
  module: Any
  params: dict
  tokenizer: Any
  label_names: list
  spec: dict
  step: int
  chosen: str
  peft: Any = None


def load_peft_config(workdir: str):
  """The PeftConfig a transfer.peft run saved in `workdir` (None: not a PEFT run)."""
  from etjax.algorithms import peft  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, peft.CONFIG_FILE)
  return peft.read_config(path) if os.path.exists(path) else None


def load_classifier(workdir: str, *, step: Optional[int] = None,
                    best_metric: Optional[str] = "accuracy") -> TrainedClassifier:
  """The classifier an `etjax train` run left in `workdir`.

  Raises:
    ValueError: no such directory, no checkpoints or model.json, a damaged step, a
      bad peft_config.json, or checkpointed parameters the rebuilt model lacks.
  """
  workdir = os.path.abspath(workdir)
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise ValueError(f"{workdir} has no checkpoints/: not a trained etjax workdir")
  module, spec = tasks.load_model_spec(workdir)
  tokenizer, label_names = tasks.load_job_assets(workdir)
  peft_config = load_peft_config(workdir)
  if peft_config is not None:
    from etjax.algorithms import peft  # pylint: disable=g-import-not-at-top
    # The prompt is restored, never drawn: flax still evaluates its init's shape on
    # apply, and a 'tokens' init samples the batch's positions, which a symbolic
    # batch (jax.export) cannot; 'normal' has the same shape and needs no batch.
    module = peft.PeftModel(module, dataclasses.replace(peft_config,
                                                        prompt_init="normal"))
  chosen, how = choose_step(workdir, step, best_metric)
  try:
    params = restore_params(os.path.join(workdir, "checkpoints", str(chosen)), module)
  except ckpt_lib.CorruptCheckpointError as e:
    raise ValueError(f"{workdir}: {e}") from e
  if peft_config is not None and peft_config.method == "lora":
    # W + (alpha / r) A B: the plain classifier computes what the LoRA model did.
    module, params = module.module, jax.device_get(peft.merge_lora(params, peft_config))
  return TrainedClassifier(module, params, tokenizer, label_names, spec, chosen, how,
                           peft_config)
