"""Meta distant transfer learning (MetaDTL; Wang et al., 2021) as a train-step transform.

Tasks with different label sets (3-way NLI and 2-way entailment, as MNLI and SciTail)
share one encoder. The meta-learner is a classifier over the union of the label sets,
C = C_0 + C_1 + ... classes, task t owning the slice [o_t, o_t + C_t) of the head;
batch['domain'] holds each row's TASK id and batch['labels'] its label within its
task (global class g_i = o_{task_i} + y_i). From the meta-learner, `task_params`
cuts a task's own classifier, which is then fine-tuned on the target task.

    L = sum_i w_i CE_own(x_i, g_i) / sum_i w_i                  (own-task head)
      + relation_weight * sum_i w_i H(R[g_i], softmax_other(x_i)) / sum_i w_i
      + meta_weight * L_query(theta - alpha grad L_support)     (episodes, tasks)

Choices where the paper leaves details open (each is tested):

- Class prototypes p_c (one per global class, a moving average of the pooled feature
  over batches, kept in the state as in `etjax.algorithms.metaft`) place every task's
  classes in one space. The implicit class relations are
      R[c, c'] = softmax_{c' of other tasks, seen}(cos(p_c, p_c') / relation_temperature)
  (0 for c' of c's own task; a row is 0 when no other task has a prototype yet).
- Cross-task transferability of an instance: t_i = sum_c' R[g_i, c'] cos(h(x_i), p_c'),
  the similarity of its feature to the classes of the other tasks its class relates
  to; instance weights w_i = n softmax(t_i / temperature) (constants), times the
  batch's own weight.
- The relation term makes the heads of the OTHER tasks predict, on each row, the
  relation row R[g_i] (a stop-gradient soft target, one softmax over all classes of
  the other tasks; for two tasks, the other task's head): a 3-way entailment example
  teaches the 2-way head "entails" once the prototypes relate those classes.
- Episodes (`metaft.episode_loss` with tasks as groups): each step draws a task s (that
  of a random valid row), adapts by inner SGD on the rows of s and adds the weighted
  own-task loss of the adapted model on the other tasks' rows, differentiated through
  the inner update (second order unless first_order=True).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from etjax.algorithms import metaft as mf
from etjax.algorithms import prototypes as proto
from etjax.algorithms.finetune import (init_params, model_inputs, weighted_accuracy,
                                       weighted_cross_entropy)
from etjax.algorithms.step import Batch, TrainStep, unbox

PyTree = Any
_MASKED = -1e9  # a logit that softmax sends to 0 without inf * 0 = nan in the CE


def task_layout(num_labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """(offsets [T], class_task [C]): first global class of each task, task of each class."""
  num_labels = tuple(num_labels)
  if len(num_labels) < 2 or any(not isinstance(n, int) or n < 1 for n in num_labels):
    raise ValueError(f"metadtl: num_labels must list >= 2 tasks' class counts (ints >= "
                     f"1), got {num_labels!r}")
  offsets = np.concatenate([[0], np.cumsum(num_labels)[:-1]]).astype(np.int32)
  class_task = np.repeat(np.arange(len(num_labels)), num_labels).astype(np.int32)
  return offsets, class_task


def _cosine(a_xd: jax.Array, b_yd: jax.Array, eps: float = 1e-8) -> jax.Array:
  norm = lambda x: jnp.sqrt(jnp.maximum(jnp.sum(x * x, -1), eps * eps))
  return (a_xd @ b_yd.T) / (norm(a_xd)[:, None] * norm(b_yd)[None, :])


def class_relations(prototypes_cd: jax.Array, counts_c: jax.Array,
                    class_task_c: jax.Array, *, temperature: float) -> jax.Array:
  """Implicit cross-task class relations R (formula in the module docstring).

  Returns:
    [C, C] float32; each row sums to 1 over the seen classes of the other tasks, or is
    all 0 when there are none.
  """
  if not temperature > 0:
    raise ValueError(f"metadtl: relation_temperature must be > 0, got {temperature}")
  class_task_c = jnp.asarray(class_task_c)
  allowed_cc = ((class_task_c[:, None] != class_task_c[None, :])
                & (jnp.asarray(counts_c) > 0)[None, :])
  logits_cc = jnp.where(allowed_cc, _cosine(prototypes_cd, prototypes_cd) / temperature,
                        -jnp.inf)
  any_c = allowed_cc.any(-1, keepdims=True)
  safe_cc = jnp.where(any_c, logits_cc, 0.0)
  return jnp.where(any_c & allowed_cc, jax.nn.softmax(safe_cc, axis=-1), 0.0)


def transferability(features_bd: jax.Array, classes_b: jax.Array,
                    prototypes_cd: jax.Array, relations_cc: jax.Array) -> jax.Array:
  """t_i = sum_c' R[g_i, c'] cos(h_i, p_c'): [B] cross-task transferability scores."""
  cos_bc = _cosine(jnp.asarray(features_bd, jnp.float32), prototypes_cd)
  return jnp.sum(relations_cc[classes_b] * cos_bc, axis=-1)


def task_params(meta_params: PyTree, num_labels: Sequence[int], task: int) -> dict:
  """A single task's classifier params cut from the meta-learner's.

  Args:
    meta_params: params of the meta-learner (a SequenceClassifier over all C classes,
      its head under 'classifier'); boxed or plain.
    num_labels: class count per task.
    task: which task.

  Returns:
    Plain params of a SequenceClassifier with num_labels[task] classes: the shared
    encoder as is, the head's kernel [d, C] and bias [C] cut to that task's columns.
  """
  offsets, _ = task_layout(num_labels)
  if not 0 <= task < len(num_labels):
    raise ValueError(f"metadtl: task {task} is outside [0, {len(num_labels)})")
  params = dict(jax.device_get(unbox(meta_params)))
  if "classifier" not in params:
    raise ValueError(f"metadtl: meta params have no 'classifier' head; keys "
                     f"{sorted(params)}")
  lo, hi = int(offsets[task]), int(offsets[task]) + num_labels[task]
  head = dict(params["classifier"])
  head["kernel"] = np.asarray(head["kernel"])[..., lo:hi]
  if "bias" in head:
    head["bias"] = np.asarray(head["bias"])[lo:hi]
  params["classifier"] = head
  return params


class MetaDTLObjective:
  """The MetaDTL loss (see the module docstring); aux as MetaFTObjective's with
  'transferability' [B] and 'relations' [C, C] and the scalar 'relation_loss'."""

  def __init__(self, model: nn.Module, num_labels: Sequence[int], *,
               relation_weight: float, relation_temperature: float, typicality: bool,
               temperature: float, momentum: float, inner_lr: Optional[float],
               inner_steps: int, first_order: bool, meta_weight: float,
               pretrained: Optional[Mapping[str, Any]] = None):
    self.offsets, self.class_task = task_layout(num_labels)
    self.num_labels = tuple(num_labels)
    total = mf.num_labels_of(model, "metadtl")
    if total != sum(self.num_labels):
      raise ValueError(f"metadtl: the model has {total} classes, num_labels "
                       f"{self.num_labels} sum to {sum(self.num_labels)}")
    for name, value in (("relation_weight", relation_weight),
                        ("meta_weight", meta_weight)):
      if not value >= 0:
        raise ValueError(f"metadtl: {name} must be >= 0, got {value}")
    if not temperature > 0 or not relation_temperature > 0:
      raise ValueError(f"metadtl: temperatures must be > 0, got {temperature}, "
                       f"{relation_temperature}")
    if not 0.0 <= momentum < 1.0:
      raise ValueError(f"metadtl: momentum must be in [0, 1), got {momentum}")
    mf.check_episode(inner_lr, inner_steps)
    self.model, self.pretrained = model, pretrained
    self.relation_weight, self.relation_temperature = relation_weight, relation_temperature
    self.typicality, self.temperature, self.momentum = typicality, temperature, momentum
    self.inner_lr, self.inner_steps, self.first_order = inner_lr, inner_steps, first_order
    self.meta_weight = meta_weight

  def init(self, rng: jax.Array, batch: Batch) -> dict:
    return {"model": init_params(self.model, rng, batch, self.pretrained)}

  def own_logits(self, logits_bc: jax.Array, tasks_b: jax.Array) -> jax.Array:
    """[B, C] logits with other tasks' classes masked out."""
    own_bc = jnp.asarray(self.class_task)[None, :] == tasks_b[:, None]
    return jnp.where(own_bc, logits_bc, _MASKED)

  def _rows(self, batch):
    mf.require_domain(batch, "metadtl")
    tasks_b = jnp.asarray(batch["domain"], jnp.int32)
    classes_b = jnp.asarray(self.offsets)[tasks_b] + batch["labels"]
    valid_b = jnp.asarray(batch.get("weight", jnp.ones(tasks_b.shape)), jnp.float32)
    return tasks_b, classes_b, valid_b

  def task_loss(self, params, batch, rng, deterministic):
    """Weighted own-task cross-entropy of the model params on `batch`: []."""
    tasks_b, classes_b, _ = self._rows(batch)
    out = self.model.apply({"params": params}, *model_inputs(batch),
                           deterministic=deterministic, rngs={"dropout": rng})
    return weighted_cross_entropy(self.own_logits(out.logits, tasks_b), classes_b,
                                  batch.get("weight"))

  def loss(self, params, prototypes_kcd, counts_kc, batch, rng, deterministic=False):
    tasks_b, classes_b, valid_b = self._rows(batch)
    drop_rng, episode_rng = jax.random.split(rng)
    out = self.model.apply({"params": params["model"]}, *model_inputs(batch),
                           deterministic=deterministic, rngs={"dropout": drop_rng})
    prototypes_kcd, counts_kc = mf.update_prototypes(
        prototypes_kcd, counts_kc, out.features, classes_b, jnp.zeros_like(tasks_b),
        momentum=self.momentum, mask_b=valid_b > 0)
    relations_cc = class_relations(prototypes_kcd[0], counts_kc[0], self.class_task,
                                   temperature=self.relation_temperature)
    scores_b = transferability(jax.lax.stop_gradient(out.features), classes_b,
                               prototypes_kcd[0], relations_cc)
    weights_b = valid_b
    if self.typicality:
      weights_b = valid_b * proto.typicality_weights(scores_b, temperature=self.temperature,
                                                     mask_b=valid_b > 0)
    own_bc = self.own_logits(out.logits, tasks_b)
    task = weighted_cross_entropy(own_bc, classes_b, weights_b)
    other_bc = jnp.where(jnp.asarray(self.class_task)[None, :] != tasks_b[:, None],
                         out.logits, _MASKED)
    targets_bc = jax.lax.stop_gradient(relations_cc[classes_b])
    soft_b = -jnp.sum(targets_bc * jax.nn.log_softmax(other_bc), axis=-1)
    relation = jnp.sum(weights_b * soft_b) / jnp.maximum(jnp.sum(weights_b), 1e-9)
    total = task + self.relation_weight * relation
    meta_loss, group = jnp.zeros((), jnp.float32), jnp.asarray(-1, jnp.int32)
    if self.inner_steps > 0:
      inner = lambda p, b: self.task_loss(p, b, drop_rng, deterministic)
      meta_loss, group = mf.episode_loss(inner, params["model"], batch, tasks_b,
                                         weights_b, episode_rng, inner_lr=self.inner_lr,
                                         inner_steps=self.inner_steps,
                                         first_order=self.first_order)
      total = total + self.meta_weight * meta_loss
    aux = {"logits": out.logits, "features": out.features, "transferability": scores_b,
           "weights": weights_b, "relations": relations_cc,
           "prototypes_kcd": prototypes_kcd, "counts_kc": counts_kc, "task_loss": task,
           "relation_loss": relation, "meta_loss": meta_loss, "episode_group": group,
           "accuracy": weighted_accuracy(own_bc, classes_b, valid_b)}
    return total, aux


def metadtl(model: nn.Module, tx: optax.GradientTransformation, *,
            num_labels: Sequence[int], relation_weight: float = 0.1,
            relation_temperature: float = 0.1, typicality: bool = True,
            temperature: float = 0.5, momentum: float = 0.9,
            inner_lr: Optional[float] = 0.05, inner_steps: int = 1,
            first_order: bool = False, meta_weight: float = 1.0,
            pretrained: Optional[Mapping[str, Any]] = None) -> TrainStep:
  """The MetaDTL meta-learner as a TrainStep (formulas in the module docstring).

  Args:
    model: a classifier over all tasks' classes (e.g.
      SequenceClassifier(encoder, num_labels=sum(num_labels))), returning `.logits`
      [B, C] and `.features` [B, d].
    tx: the optimizer.
    num_labels: class count per task, e.g. (3, 2); batch['domain'] is the task id.
    relation_weight: weight of the cross-task relation term (0 = off).
    relation_temperature: of the class relations R.
    typicality: False gives every row weight 1 (an ablation).
    temperature: of the transferability weights.
    momentum: of the prototype moving average.
    inner_lr, inner_steps, first_order, meta_weight: the episode term (inner_steps=0
      turns it off).
    pretrained: plain arrays for a sub-tree of the model's params.

  Returns:
    A TrainStep over `metaft.MetaState` (prototypes [1, C, d]); metrics: loss,
    grad_norm, task_loss, relation_loss, meta_loss, accuracy (own task); predict gives
    'logits' [B, C] over all classes and 'features'.
  """
  objective = MetaDTLObjective(
      model, num_labels, relation_weight=relation_weight,
      relation_temperature=relation_temperature, typicality=typicality,
      temperature=temperature, momentum=momentum, inner_lr=inner_lr,
      inner_steps=inner_steps, first_order=first_order, meta_weight=meta_weight,
      pretrained=pretrained)
  return mf.step_with_prototypes(objective, tx, 1, sum(objective.num_labels))
