"""AdaBERT on `etjax train`: the architecture search, then the retraining of the cells
it chose, as a recipe of two stages.

    <workdir>/0_search                 adabert_search distilled from transfer.teacher
    <workdir>/adabert_architecture.json  the derived cells (and the alpha they came from)
    <workdir>/1_retrain                the discrete student, retrained from scratch

Stage 1's step is built before stage 0 has run, so it is deferred
(`adabert.deferred_retrain`): when it is first traced, the cells are read from
adabert_architecture.json, or, the first time, derived (`adabert.derive_genotype`)
from alpha in stage 0's checkpoint of its last step and written there. A resumed
run, `etjax eval` and `etjax predict` read the file, so they retrain and predict with
the same cells even where the search's checkpoints are gone.
"""

from __future__ import annotations

import json
import os
from typing import Any, TYPE_CHECKING

import jax
import numpy as np

from etjax.algorithms import adabert as ab
from etjax.algorithms.recipe import Stage
from etjax.train import checkpoints as ckpt_lib
from etjax.train import recipe as recipe_lib

if TYPE_CHECKING:
  from etjax.transfer.methods import Materials

ARCHITECTURE_FILE = "adabert_architecture.json"
STAGES = ("search", "retrain")


def build(m: "Materials", settings: dict) -> list[Stage]:
  """AdaBERT's stages on every training row (the transfer set), each for
  `m.steps_for(rows)` updates.

  Args:
    m: the job's materials (the teacher, the tokenizer's vocab_size, the labels).
    settings: {'AdaBertConfig': the cell space, 'adabert_search': gamma, beta,
      temperature, cost, 'arch_optimizer': learning_rate} (gin/algorithms/adabert.gin
      with transfer.method_args).
  """
  rows = m.roles.source + m.roles.target
  steps = m.steps_for(len(rows))
  config = ab.AdaBertConfig(**dict(settings["AdaBertConfig"], vocab_size=m.vocab_size,
                                   num_labels=m.make_classifier().num_labels))
  search_kwargs = settings["adabert_search"]
  # Nothing is pretrained: every parameter is a new one (optimizer.new_params_
  # learning_rate when set, else optimizer.learning_rate).
  search = ab.adabert_search(config, m.teacher, m.make_tx(steps, ()),
                             ab.arch_optimizer(**settings["arch_optimizer"]),
                             **search_kwargs)
  retrain = ab.deferred_retrain(
      config, lambda: searched_genotype(m.workdir, search_dir, steps, config),
      m.teacher, m.make_tx(steps, ()), gamma=search_kwargs["gamma"],
      temperature=search_kwargs["temperature"])
  stages = [Stage(STAGES[0], search, steps, m.batches(rows)),
            # From scratch, as AdaBERT (and DARTS) retrain: the hand-over is the cells.
            Stage(STAGES[1], retrain, steps, m.batches(rows), m.eval_data,
                  carry=lambda previous, fresh: fresh)]
  search_dir = recipe_lib.stage_dirs(m.workdir, stages)[0]  # read by the lambda above
  return stages


def searched_genotype(workdir: str, search_dir: str, search_steps: int,
                      config: ab.AdaBertConfig) -> tuple[str, ...]:
  """The cells of `workdir`'s ARCHITECTURE_FILE; without it, those derived from the
  search's alpha at its last step (then written to the file).

  Raises:
    ValueError: the file holds no valid cells for `config`, or the search has no
      checkpoint of its last step.
  """
  path = os.path.join(workdir, ARCHITECTURE_FILE)
  if os.path.exists(path):
    with open(path) as f:
      genotype = tuple(json.load(f)["genotype"])
    try:
      ab.check_genotype(genotype, config)
    except ValueError as e:
      raise ValueError(f"{path}: {e}") from None
    return genotype
  alpha = search_alpha(search_dir, search_steps, config)
  genotype = ab.derive_genotype(alpha, config)
  ab.check_genotype(genotype, config)
  record = {"genotype": list(genotype), "edges": [list(e) for e in config.edges()],
            "ops": list(ab.OP_NAMES), "alpha": alpha.tolist(),
            "search_step": search_steps,
            "student_parameters": ab.student_param_count(genotype, config)}
  with open(path + ".tmp", "w") as f:  # one line per field: the cells read at a glance
    f.write("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}"
                                for k, v in record.items()) + "\n}\n")
  os.replace(path + ".tmp", path)
  return genotype


def search_alpha(search_dir: str, step: int, config: ab.AdaBertConfig) -> np.ndarray:
  """alpha [edges, ops] of the search's checkpoint of `step` (read alone, verified
  against the step's integrity record)."""
  step_dir = os.path.join(search_dir, "checkpoints", str(step))
  if not os.path.isdir(step_dir):
    raise ValueError(f"adabert: {search_dir} has no checkpoint of the search's last "
                     f"step {step}, so no architecture was chosen yet; its "
                     f"{ARCHITECTURE_FILE} is missing too")
  ckpt_lib.verify_integrity(step_dir)
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  shape = (config.num_edges, len(ab.OP_NAMES))
  target: Any = {"params": {"student": {"alpha": jax.ShapeDtypeStruct(shape,
                                                                      np.float32)}}}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
  with ocp.PyTreeCheckpointer() as reader:
    restored = reader.restore(os.path.join(step_dir, "state"),
                              args=ocp.args.PyTreeRestore(item=target,
                                                          restore_args=restore_args,
                                                          partial_restore=True))
  return np.asarray(restored["params"]["student"]["alpha"], np.float64)
