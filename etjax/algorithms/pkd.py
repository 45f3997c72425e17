"""BERT-PKD (Sun et al. 2019): patient knowledge distillation, PKD-Skip and PKD-Last.

The student learns from the teacher's logits and, patiently, from the normalized [CLS]
states of intermediate teacher layers:

    L = (1 - alpha) * CE(y, s) + alpha * T^2 KL(t / T || s / T) + beta * L_PT,

with student layer m matched to teacher layer m N / M (PKD-Skip: 2, 4, ... for 6 of
12) or N - M + m (PKD-Last: 7, 8, ...), every student layer but the last (which the
logits already distil). As in the paper the student starts from the teacher's first M
layers (its width must then equal the teacher's; otherwise pass
init_from_teacher=False, and a learnable projection maps the [CLS] states).
"""

from __future__ import annotations

from typing import Union

import flax.linen as nn
import optax

from etjax.algorithms.distill import Teacher, distill
from etjax.algorithms.distilbert import init_from_teacher
from etjax.algorithms.finetune import LossFn
from etjax.algorithms.step import TrainStep

STRATEGIES = {"skip": "skip", "last": "last", "pkd-skip": "skip", "pkd-last": "last"}


def pkd(student: Union[nn.Module, LossFn], teacher: Teacher,
        tx: optax.GradientTransformation, *, strategy: str = "skip", alpha: float = 0.5,
        beta: float = 100.0, temperature: float = 5.0,
        init_from_teacher_layers: bool = True) -> TrainStep:
  """BERT-PKD.

  Args:
    student: a classifier module with M >= 2 layers.
    teacher: (classifier module, params) with N >= M layers.
    tx: the student's optimizer.
    strategy: 'skip' / 'pkd-skip' or 'last' / 'pkd-last'.
    alpha: weight of the soft term against the hard cross-entropy.
    beta: weight of the patient loss (the paper searched 10..1000).
    temperature: T of the soft term.
    init_from_teacher_layers: start the student from the teacher's first M layers
      (and its embeddings, pooler and classifier).

  Returns:
    A TrainStep over DistillState.
  """
  key = strategy.lower()
  if key not in STRATEGIES:
    raise ValueError(f"pkd: unknown strategy {strategy!r}; expected one of "
                     f"{sorted(STRATEGIES)}")
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"pkd: alpha must be in [0, 1], got {alpha}")
  student_init = None
  if init_from_teacher_layers:
    num_layers = getattr(getattr(getattr(student, "encoder", None), "config", None),
                         "num_layers", None)
    if num_layers is None:
      raise ValueError("pkd: init_from_teacher_layers needs a classifier module whose "
                       ".encoder has a .config")
    student_init = init_from_teacher(student, teacher, tuple(range(num_layers)))
  return distill(student, teacher, tx,
                 losses={"ce": 1.0 - alpha, "kd": alpha, "pkd": beta},
                 temperature=temperature, layer_map=STRATEGIES[key],
                 student_init=student_init)
