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
- Episodes (`loss_terms.episode_term` with tasks as groups): each step draws a task s (that
  of a random valid row), adapts by inner SGD on the rows of s and adds the weighted
  own-task loss of the adapted model on the other tasks' rows, differentiated through
  the inner update (second order unless first_order=True).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from etjax.algorithms import loss_terms
from etjax.algorithms import metaft as mf
from etjax.algorithms.finetune import (init_params, model_inputs, weighted_accuracy,
                                       weighted_cross_entropy)
from etjax.algorithms.settings import settings_from
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


@dataclasses.dataclass(frozen=True)
class MetaDTLSettings:
  """Settings of the MetaDTL meta-learner (gin/algorithms/metadtl.gin's bindings).

  Attributes:
    num_labels: class count per task, e.g. (3, 2); batch['domain'] is the task id.
    relation_weight: weight of the cross-task relation term (0 = off).
    relation_temperature: of the class relations R.
    typicality: False gives every row weight 1 (an ablation).
    temperature: of the transferability weights.
    momentum: of the prototype moving average.
    inner_lr, inner_steps, first_order, meta_weight: the episode term (inner_steps=0
      turns it off).
    pretrained: plain arrays for a sub-tree of the model's params.
  """
  num_labels: Sequence[int]
  relation_weight: float = 0.1
  relation_temperature: float = 0.1
  typicality: bool = True
  temperature: float = 0.5
  momentum: float = 0.9
  inner_lr: Optional[float] = 0.05
  inner_steps: int = 1
  first_order: bool = False
  meta_weight: float = 1.0
  pretrained: Optional[Mapping[str, Any]] = None

  def __post_init__(self):
    task_layout(self.num_labels)
    for name in ("relation_weight", "meta_weight"):
      if not getattr(self, name) >= 0:
        raise ValueError(f"metadtl: {name} must be >= 0, got {getattr(self, name)}")
    if not self.temperature > 0 or not self.relation_temperature > 0:
      raise ValueError(f"metadtl: temperatures must be > 0, got {self.temperature}, "
                       f"{self.relation_temperature}")
    if not 0.0 <= self.momentum < 1.0:
      raise ValueError(f"metadtl: momentum must be in [0, 1), got {self.momentum}")
    loss_terms.check_episode(self.inner_lr, self.inner_steps)


class MetaDTLObjective:
  """The MetaDTL loss (see the module docstring): the transferability-weighted
  own-task loss composed with the relation term and the episode term
  (etjax.algorithms.loss_terms); aux as MetaFTObjective's with 'transferability' [B]
  and 'relations' [C, C] and the scalar 'relation_loss'."""

  def __init__(self, model: nn.Module, settings: MetaDTLSettings):
    self.offsets, self.class_task = task_layout(settings.num_labels)
    self.num_labels = tuple(settings.num_labels)
    total = mf.num_labels_of(model, "metadtl")
    if total != sum(self.num_labels):
      raise ValueError(f"metadtl: the model has {total} classes, num_labels "
                       f"{self.num_labels} sum to {sum(self.num_labels)}")
    self.model, self.s = model, settings
    loss = loss_terms.with_term(self._weighted_task, settings.relation_weight,
                                self._relation)
    if settings.inner_steps > 0:
      loss = loss_terms.with_term(loss, settings.meta_weight, loss_terms.episode_term(
          lambda p, b, ctx: self.task_loss(p, b, *ctx["dropout"]),
          inner_lr=settings.inner_lr, inner_steps=settings.inner_steps,
          first_order=settings.first_order))
    self._loss = loss

  def init(self, rng: jax.Array, batch: Batch) -> dict:
    return {"model": init_params(self.model, rng, batch, self.s.pretrained)}

  def own_logits(self, logits_bc: jax.Array, tasks_b: jax.Array) -> jax.Array:
    """[B, C] logits with other tasks' classes masked out."""
    own_bc = jnp.asarray(self.class_task)[None, :] == tasks_b[:, None]
    return jnp.where(own_bc, logits_bc, _MASKED)

  def _rows(self, batch):
    mf.require_domain(batch, "metadtl")
    tasks_b = jnp.asarray(batch["domain"], jnp.int32)
    classes_b = jnp.asarray(self.offsets)[tasks_b] + batch["labels"]
    return tasks_b, classes_b, mf.valid_weights(batch)

  def task_loss(self, params, batch, rng, deterministic):
    """Weighted own-task cross-entropy of the model params on `batch`: []."""
    tasks_b, classes_b, _ = self._rows(batch)
    out = self.model.apply({"params": params}, *model_inputs(batch),
                           deterministic=deterministic, rngs={"dropout": rng})
    return weighted_cross_entropy(self.own_logits(out.logits, tasks_b), classes_b,
                                  batch.get("weight"))

  def loss(self, params, prototypes_kcd, counts_kc, batch, rng, deterministic=False):
    self._rows(batch)  # a batch without 'domain' fails here, naming it
    drop_rng, episode_rng = jax.random.split(rng)
    return self._loss(params, batch, drop_rng, deterministic,
                      prototypes_kcd=prototypes_kcd, counts_kc=counts_kc,
                      episode_rng=episode_rng, dropout=(drop_rng, deterministic))

  def _weighted_task(self, params, batch, rng, deterministic, *, prototypes_kcd,
                     counts_kc, **_):
    """The base loss: the own-task loss with transferability weights from the class
    prototypes updated by this batch."""
    tasks_b, classes_b, valid_b = self._rows(batch)
    out = self.model.apply({"params": params["model"]}, *model_inputs(batch),
                           deterministic=deterministic, rngs={"dropout": rng})
    prototypes_kcd, counts_kc = mf.update_prototypes(
        prototypes_kcd, counts_kc, out.features, classes_b, jnp.zeros_like(tasks_b),
        momentum=self.s.momentum, mask_b=valid_b > 0)
    relations_cc = class_relations(prototypes_kcd[0], counts_kc[0], self.class_task,
                                   temperature=self.s.relation_temperature)
    scores_b = transferability(jax.lax.stop_gradient(out.features), classes_b,
                               prototypes_kcd[0], relations_cc)
    weights_b = loss_terms.instance_weights(scores_b, valid_b, self.s.typicality,
                                            self.s.temperature)
    own_bc = self.own_logits(out.logits, tasks_b)
    task = weighted_cross_entropy(own_bc, classes_b, weights_b)
    return task, {"logits": out.logits, "features": out.features,
                  "transferability": scores_b, "weights": weights_b,
                  "relations": relations_cc, "prototypes_kcd": prototypes_kcd,
                  "counts_kc": counts_kc, "task_loss": task, **loss_terms.no_episode(),
                  "accuracy": weighted_accuracy(own_bc, classes_b, valid_b)}

  def _relation(self, params, batch, aux, ctx):
    """Term: the other tasks' heads predict the relation row R[g_i] of each row's
    class (a stop-gradient soft target), weighted as the task loss."""
    del params, ctx
    tasks_b, classes_b, _ = self._rows(batch)
    other_bc = jnp.where(jnp.asarray(self.class_task)[None, :] != tasks_b[:, None],
                         aux["logits"], _MASKED)
    targets_bc = jax.lax.stop_gradient(aux["relations"][classes_b])
    soft_b = -jnp.sum(targets_bc * jax.nn.log_softmax(other_bc), axis=-1)
    weights_b = aux["weights"]
    relation = jnp.sum(weights_b * soft_b) / jnp.maximum(jnp.sum(weights_b), 1e-9)
    return relation, {"relation_loss": relation}


def metadtl(model: nn.Module, tx: optax.GradientTransformation,
            **settings) -> TrainStep:
  """The MetaDTL meta-learner as a TrainStep (formulas in the module docstring).

  Args:
    model: a classifier over all tasks' classes (e.g.
      SequenceClassifier(encoder, num_labels=sum(num_labels))), returning `.logits`
      [B, C] and `.features` [B, d].
    tx: the optimizer.
    **settings: MetaDTLSettings' fields (num_labels required).

  Returns:
    A TrainStep over `metaft.MetaState` (prototypes [1, C, d]); metrics: loss,
    grad_norm, task_loss, relation_loss, meta_loss, accuracy (own task); predict gives
    'logits' [B, C] over all classes and 'features'.
  """
  objective = MetaDTLObjective(model,
                               settings_from(MetaDTLSettings, "metadtl", settings))
  return mf.step_with_prototypes(objective, tx, 1, sum(objective.num_labels))
