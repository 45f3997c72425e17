"""TinyBERT (Jiao et al. 2020), task-specific distillation in its two stages.

Stage 1, intermediate-layer distillation: the student's embeddings, hidden states and
attention matrices learn the teacher's,

    L_1 = MSE(E_s W_e, E_t) + sum_m [MSE(H_s^m W_h, H_t^g(m)) + MSE(A_s^m, A_t^g(m))],

with the layer map g(m) = m N / M (`layer_map('skip', M, N)`) and learnable W_e, W_h
when the widths differ (attentions need equal head counts). Stage 2, prediction-layer
distillation: L_2 = T^2 KL(softmax(t / T) || softmax(s / T)) (the paper's soft
cross-entropy; both give the same gradients).

Two shapes of the same stages:
- `tinybert_stages`: one TrainStep per stage, for a recipe (etjax.algorithms.recipe)
  whose stage 2 starts from stage 1's student (each stage in its own sub-workdir, its
  own data pass and rng; what `etjax train --gin.transfer.method="'tinybert'"` runs).
- `tinybert`: both stages in one TrainStep: updates 0 .. intermediate_steps - 1 run
  stage 1 with `tx_intermediate`, later ones stage 2 with `tx_prediction`, each
  optimizer with its own state (stage 2 starts its schedule afresh, as a second run
  would), the data and rng running on across the switch. Only the selected stage's
  forward and backward run (`lax.cond`). The paper table and the tests of its
  learning claim train this one.

TinyBERT's general distillation and data augmentation are outside these steps: general
distillation is stage 1 on unlabelled text with an encoder student and teacher;
augmentation only changes the data.
"""

from __future__ import annotations

from typing import Mapping, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from etjax.algorithms import layer_map as lm
from etjax.algorithms.distill import (DistillLoss, DistillState, Teacher,
                                      distill_train_step, distill_update,
                                      student_predict)
from etjax.algorithms.finetune import LossFn
from etjax.algorithms.step import TrainStep

INTERMEDIATE = {"embedding_mse": 1.0, "hidden_mse": 1.0, "attention_mse": 1.0}
PREDICTION = {"kd": 1.0}
STAGES = ("intermediate", "prediction")


def tinybert_layer_map(num_student_layers: int, num_teacher_layers: int
                       ) -> tuple[int, ...]:
  """g(m) = m N / M for m = 1..M (1-based teacher layers)."""
  return lm.layer_map("skip", num_student_layers, num_teacher_layers)


def _objectives(student, teacher: Teacher, *, temperature: float, layer_map: lm.Strategy,
                intermediate_losses: Mapping[str, float],
                prediction_losses: Mapping[str, float], student_init
                ) -> dict[str, DistillLoss]:
  """{stage: its DistillLoss}: the same student and teacher under each stage's losses."""
  return {stage: DistillLoss(student, teacher, dict(losses), temperature=temperature,
                             layer_map=layer_map, student_init=student_init)
          for stage, losses in zip(STAGES, (intermediate_losses, prediction_losses))}


def tinybert_stages(student: Union[nn.Module, LossFn], teacher: Teacher,
                    tx_intermediate: optax.GradientTransformation,
                    tx_prediction: optax.GradientTransformation, *,
                    temperature: float = 1.0, layer_map: lm.Strategy = "skip",
                    intermediate_losses: Mapping[str, float] = INTERMEDIATE,
                    prediction_losses: Mapping[str, float] = PREDICTION,
                    student_init=None) -> dict[str, TrainStep]:
  """TinyBERT's stages as two TrainSteps, for a recipe (see the module docstring).

  Args: as `tinybert` (without intermediate_steps: each stage runs its own number of
    updates).

  Returns:
    {'intermediate': step, 'prediction': step}, each a `distill` TrainStep over
    DistillState with params {'student', 'projections'}; the intermediate stage's
    projections (W_e, W_h) exist only in its own state, so the prediction stage takes
    the student from it (`etjax.algorithms.recipe.carry_params`) and nothing else.
  """
  objectives = _objectives(student, teacher, temperature=temperature,
                           layer_map=layer_map, intermediate_losses=intermediate_losses,
                           prediction_losses=prediction_losses,
                           student_init=student_init)
  txs = {"intermediate": tx_intermediate, "prediction": tx_prediction}
  return {stage: distill_train_step(objectives[stage], txs[stage],
                                    objectives[stage].init) for stage in STAGES}


def tinybert(student: Union[nn.Module, LossFn], teacher: Teacher,
             tx_intermediate: optax.GradientTransformation,
             tx_prediction: optax.GradientTransformation, *, intermediate_steps: int,
             temperature: float = 1.0, layer_map: lm.Strategy = "skip",
             intermediate_losses: Mapping[str, float] = INTERMEDIATE,
             prediction_losses: Mapping[str, float] = PREDICTION,
             student_init=None) -> TrainStep:
  """TinyBERT's two stages as one TrainStep (see the module docstring).

  Args:
    student: a classifier module (or a LossFn giving logits, hidden states and
      attentions in aux, with `student_init`).
    teacher: (classifier module, params).
    tx_intermediate, tx_prediction: the optimizers of stage 1 and stage 2.
    intermediate_steps: number of stage-1 updates (>= 0; 0 skips stage 1).
    temperature: T of the prediction-layer loss.
    layer_map: the layer map; TinyBERT's is 'skip' (m -> m N / M).
    intermediate_losses, prediction_losses: loss weights of the stages.
    student_init: optional (rng, batch) -> boxed student params.

  Returns:
    A TrainStep over DistillState with opt_state {'intermediate', 'prediction'};
    metrics add 'stage' (1 or 2) and every term of both stages (0 when not run).
  """
  if intermediate_steps < 0:
    raise ValueError(f"tinybert: intermediate_steps must be >= 0, got "
                     f"{intermediate_steps}")
  objectives = _objectives(student, teacher, temperature=temperature,
                           layer_map=layer_map, intermediate_losses=intermediate_losses,
                           prediction_losses=prediction_losses,
                           student_init=student_init)
  txs = {"intermediate": tx_intermediate, "prediction": tx_prediction}

  def init(rng, batch):
    params_rng, state_rng = jax.random.split(rng)
    # Stage 1 creates the projections; stage 2 leaves them untouched.
    params, teacher_params = objectives["intermediate"].init(params_rng, batch)
    return DistillState(step=jnp.zeros((), jnp.int32), params=params,
                        opt_state={k: txs[k].init(params) for k in STAGES},
                        rng=state_rng, teacher_params=teacher_params)

  def run_stage(stage: str, state, batch):
    inner = state.replace(opt_state=state.opt_state[stage])
    inner, metrics = distill_update(objectives[stage], txs[stage], inner, batch)
    opt_state = dict(state.opt_state, **{stage: inner.opt_state})
    return inner.replace(opt_state=opt_state), metrics

  def update(state, batch):
    shapes = {k: jax.eval_shape(lambda s, k=k: run_stage(k, s, batch)[1], state)
              for k in STAGES}
    names = sorted(set(shapes["intermediate"]) | set(shapes["prediction"]))

    def branch(stage):
      def fn(state):
        new_state, metrics = run_stage(stage, state, batch)
        full = {k: jnp.asarray(metrics[k], jnp.float32) if k in metrics
                else jnp.zeros((), jnp.float32) for k in names}
        full["stage"] = jnp.float32(STAGES.index(stage) + 1)
        return new_state, full
      return fn

    return jax.lax.cond(state.step < intermediate_steps, branch("intermediate"),
                        branch("prediction"), state)

  return TrainStep(init=init, update=update,
                   predict=student_predict(objectives["prediction"]))
