"""DistilBERT (Sanh et al. 2019) as a task-specific distillation, and student
initialisation from chosen teacher layers (shared with BERT-PKD).

DistilBERT trains a student with half the teacher's layers and the teacher's width on

    L = 5 * L_soft_ce(T) + 2 * L_task + 1 * L_cos,

the weights of its released code (alpha_ce=5, alpha_mlm=2, alpha_cos=1), with the
masked-LM term replaced by the task's cross-entropy because etjax distils fine-tuned
classifiers; L_cos aligns the last hidden states. The student starts from every other
teacher layer (teacher layers 1, 3, 5, ... in 1-based numbering; embeddings, pooler
and classifier copied).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from etjax.algorithms.distill import Teacher, box_like, distill
from etjax.algorithms.finetune import init_params
from etjax.algorithms.step import TrainStep, unbox
from etjax.sharding.partitioning import path_str

PyTree = Any


def every_other_layer(num_teacher_layers: int) -> tuple[int, ...]:
  """0-based indices of the teacher layers a half-depth student starts from:
  (0, 2, 4, ...), num_teacher_layers // 2 of them."""
  if num_teacher_layers < 2:
    raise ValueError(f"every_other_layer: the teacher needs >= 2 layers, got "
                     f"{num_teacher_layers}")
  return tuple(range(0, 2 * (num_teacher_layers // 2), 2))


def select_layers(student_params: PyTree, teacher_params: PyTree,
                  teacher_layers: Sequence[int]) -> PyTree:
  """Student parameters taken from the teacher's.

  Every leaf of the (boxed) student tree is replaced by the teacher's leaf at the same
  path; a leaf whose logical axes start with 'layers' (a scanned stack, [N, ...] in the
  teacher) takes the teacher's slices `teacher_layers` (0-based) along that axis.

  Args:
    student_params: the student's boxed params (from its init), M layers.
    teacher_params: the teacher's params, plain or boxed, N layers.
    teacher_layers: M 0-based teacher layer indices.

  Returns:
    The student's boxed params with the teacher's values.
  """
  teacher_plain = unbox(teacher_params)
  index = jnp.asarray(tuple(teacher_layers), jnp.int32)
  flat, treedef = jax.tree_util.tree_flatten_with_path(
      student_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  out = []
  for path, leaf in flat:
    box = leaf if isinstance(leaf, nn.LogicallyPartitioned) else None
    current = box.value if box is not None else leaf
    source = teacher_plain
    try:
      for key in path:
        source = source[key.key]
    except (KeyError, TypeError, AttributeError) as e:
      raise ValueError(f"select_layers: the teacher has no parameter "
                       f"{path_str(path)}") from e
    stacked = box is not None and tuple(box.names)[:1] == ("layers",)
    if stacked:
      if max(teacher_layers) >= source.shape[0] or min(teacher_layers) < 0:
        raise ValueError(f"select_layers: teacher layers {tuple(teacher_layers)} are "
                         f"outside the teacher's {source.shape[0]} layers at "
                         f"{path_str(path)}")
      source = jnp.take(jnp.asarray(source), index, axis=0)
    if tuple(source.shape) != tuple(current.shape):
      raise ValueError(f"select_layers: {path_str(path)} has shape "
                       f"{tuple(source.shape)} in the teacher"
                       f"{' (after layer selection)' if stacked else ''}, the student "
                       f"expects {tuple(current.shape)}")
    value = jnp.asarray(source, current.dtype)
    out.append(box.replace_boxed(value) if box is not None else value)
  return jax.tree_util.tree_unflatten(treedef, out)


def student_like(teacher_model: nn.Module, num_layers: int) -> nn.Module:
  """The teacher classifier (SequenceClassifier over an Encoder) with fewer layers."""
  encoder = getattr(teacher_model, "encoder", None)
  config = getattr(encoder, "config", None)
  if config is None:
    raise ValueError("student_like: the teacher must be a classifier whose .encoder "
                     "has a .config (e.g. SequenceClassifier(Encoder(config)))")
  return teacher_model.clone(encoder=encoder.clone(config=config.replace(
      num_layers=num_layers)), parent=None)


def init_from_teacher(student: nn.Module, teacher: Teacher,
                      teacher_layers: Sequence[int]):
  """(rng, batch) -> the student's boxed params copied from `teacher_layers`."""
  teacher_model, teacher_params = teacher

  def init(rng, batch):
    return select_layers(init_params(student, rng, batch),
                         box_like(teacher_model, teacher_params, batch), teacher_layers)
  return init


def distilbert(teacher: Teacher, tx: optax.GradientTransformation, *,
               num_student_layers: Optional[int] = None, soft_ce: float = 5.0,
               ce: float = 2.0, cosine: float = 1.0, temperature: float = 2.0
               ) -> tuple[nn.Module, TrainStep]:
  """DistilBERT: a half-depth student from every other teacher layer.

  Args:
    teacher: (SequenceClassifier over an Encoder, params).
    tx: the student's optimizer.
    num_student_layers: default half the teacher's layers; must be at most that.
    soft_ce, ce, cosine: the loss weights.
    temperature: T of the soft cross-entropy.

  Returns:
    (student module, TrainStep over DistillState).
  """
  teacher_model, _ = teacher
  layers = every_other_layer(teacher_model.encoder.config.num_layers)
  if num_student_layers is not None:
    if not 1 <= num_student_layers <= len(layers):
      raise ValueError(f"distilbert: num_student_layers must be in 1..{len(layers)} "
                       f"(half the teacher's layers), got {num_student_layers}")
    layers = layers[:num_student_layers]
  student = student_like(teacher_model, len(layers))
  step = distill(student, teacher, tx,
                 losses={"soft_ce": soft_ce, "ce": ce, "cosine": cosine},
                 temperature=temperature,
                 student_init=init_from_teacher(student, teacher, layers))
  return student, step
