"""Meta knowledge distillation (MetaKD; Pan et al., ACL 2021) in two train steps.

    teacher_step = meta_teacher(teacher_model, tx, num_domains=4)   # stage 1
    ...train it on all domains...
    protos = teacher_prototypes(teacher_model, teacher_params, batches, num_domains=4)
    student_step = metakd(student_model, (teacher_model, teacher_params), tx,
                          prototypes=protos)                          # stage 2

Stage 1, meta-teacher learning, is MetaFT's meta-learner (`etjax.algorithms.metaft`):
instances weighted by how typical they are of their class in the OTHER domains (class
prototypes), plus the corrupted-domain loss that keeps the features domain-general.

Stage 2, meta-distillation, is `etjax.algorithms.distill`'s objective (prediction
layer: Hinton KD; intermediate layers: TinyBERT's embedding, hidden-state and
attention MSE, through learnable projections when widths differ) with every term
weighted per instance by the teacher's domain expertise:

    t_i = a cos(h_T(x_i), p_{d_i, c_i}) + (1 - a) mean_{k != d_i} cos(h_T(x_i), p_{k, c_i})
    e_i = max_c P_T(c | x_i) * (1 + t_i) / 2                       in [0, 1]
    w_i = e_i / mean_j e_j   (over the batch's rows with weight > 0; 0 elsewhere)

where h_T is the teacher's pooled feature, c_i = argmax_c P_T(c | x_i) the teacher's
predicted class and p_{k,c} the teacher's class prototypes over its training data
(`teacher_prototypes`). Choices where the paper leaves details open: the predicted
class (not the gold label) selects the prototype, so unlabelled transfer data works;
a = own_domain_weight = 0.5 mixes the instance's own domain's prototype (the domain the
teacher is expert in there) with the other domains'; the confidence factor lowers the
weight of instances the teacher is unsure of; the weights are constants (computed
from the frozen teacher) and multiply the batch's own 'weight'. The state is a
`MetaKDState`: DistillState's frozen teacher plus its frozen prototypes.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional, Union

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from etjax.algorithms import distill as distill_lib
from etjax.algorithms import layer_map as lm
from etjax.algorithms import metaft as mf
from etjax.algorithms import prototypes as proto
from etjax.algorithms.finetune import LossFn, model_inputs
from etjax.algorithms.step import Batch, TrainStep

PyTree = Any

DEFAULT_LOSSES = {"kd": 1.0, "embedding_mse": 1.0, "hidden_mse": 1.0,
                  "attention_mse": 1.0}


@flax.struct.dataclass
class MetaKDState(distill_lib.DistillState):
  """A DistillState with the teacher's class prototypes (frozen).

  Attributes:
    prototypes_kcd: float32 [K, C, d] teacher feature mean per (domain, class).
    counts_kc: float32 [K, C] examples behind each prototype (0 = none).
  """
  prototypes_kcd: jax.Array
  counts_kc: jax.Array


def meta_teacher(model: nn.Module, tx: optax.GradientTransformation, *, num_domains: int,
                 **metaft_kwargs) -> TrainStep:
  """Stage 1: the meta-teacher, which is `etjax.algorithms.metaft.metaft`.

  Returns:
    metaft(model, tx, num_domains=num_domains, **metaft_kwargs); the teacher's params
    for stage 2 are state.params['model'].
  """
  return mf.metaft(model, tx, num_domains=num_domains, **metaft_kwargs)


def teacher_prototypes(model: nn.Module, params: PyTree, batches: Iterable[Batch], *,
                       num_domains: int) -> tuple[np.ndarray, np.ndarray]:
  """Class prototypes of the teacher's pooled features over a dataset.

  Args:
    model: the teacher classifier (returns `.features` [B, d]).
    params: its params (plain or boxed).
    batches: e.g. `etjax.data.eval_batches` of the teacher's training data.
    num_domains: K.

  Returns:
    (prototypes_kcd [K, C, d], counts_kc [K, C]) as in `metaft.dataset_prototypes`.
  """
  features = jax.jit(lambda p, b: model.apply({"params": p}, *model_inputs(b),
                                              deterministic=True).features)
  return mf.dataset_prototypes(lambda b: features(params, b), batches,
                               num_groups=num_domains,
                               num_classes=mf.num_labels_of(model, "metakd"))


def expertise_weights(logits_bc: jax.Array, features_bd: jax.Array, domains_b: jax.Array,
                      prototypes_kcd: jax.Array, counts_kc: jax.Array, *,
                      own_domain_weight: float = 0.5,
                      mask_b: Optional[jax.Array] = None) -> jax.Array:
  """The teacher's domain-expertise weights w_i (formula in the module docstring).

  Args:
    logits_bc: [B, C] teacher logits.
    features_bd: [B, d] teacher features.
    domains_b: [B] int domains.
    prototypes_kcd, counts_kc: the teacher's prototypes.
    own_domain_weight: a in [0, 1].
    mask_b: optional [B], nonzero for rows to weight.

  Returns:
    [B] float32 constants (stop_gradient), mean one over the masked rows, 0 elsewhere.
  """
  logits_bc = jax.lax.stop_gradient(jnp.asarray(logits_bc, jnp.float32))
  probs_bc = jax.nn.softmax(logits_bc)
  scores_b = proto.typicality_scores(jax.lax.stop_gradient(features_bd),
                                     probs_bc.argmax(-1), domains_b, prototypes_kcd,
                                     counts_kc, own_domain_weight=own_domain_weight)
  expertise_b = probs_bc.max(-1) * (1.0 + scores_b) / 2.0
  valid_b = (jnp.ones_like(expertise_b, bool) if mask_b is None
             else jnp.asarray(mask_b) != 0)
  mean = (jnp.sum(jnp.where(valid_b, expertise_b, 0.0))
          / jnp.maximum(jnp.sum(valid_b), 1))
  return jnp.where(valid_b, expertise_b / jnp.maximum(mean, 1e-12), 0.0)


def metakd(student: Union[nn.Module, LossFn], teacher: tuple[nn.Module, PyTree],
           tx: optax.GradientTransformation, *,
           prototypes: tuple[Any, Any],
           losses: Mapping[str, float] = tuple(DEFAULT_LOSSES.items()),
           temperature: float = 1.0, layer_map: lm.Strategy = "skip",
           own_domain_weight: float = 0.5,
           student_init: Optional[Callable[[jax.Array, Batch], PyTree]] = None,
           pretrained: Optional[Mapping[str, Any]] = None) -> TrainStep:
  """Stage 2: meta-distillation of a frozen meta-teacher into a student.

  Args:
    student: a Linen module or a LossFn, as in `distill`.
    teacher: (classifier module returning `.logits` and `.features`, params).
    tx: the student's optimizer.
    prototypes: (prototypes_kcd [K, C, d], counts_kc [K, C]) from
      `teacher_prototypes`; K bounds batch['domain'].
    losses, temperature, layer_map, student_init, pretrained: as in `distill`.
    own_domain_weight: a of the expertise score.

  Returns:
    A TrainStep over `MetaKDState`; metrics as `distill`'s plus 'expertise_min' and
    'expertise_max'; predict gives the student's logits.
  """
  teacher_model, _ = teacher
  protos_kcd = jnp.asarray(prototypes[0], jnp.float32)
  counts_kc = jnp.asarray(prototypes[1], jnp.float32)
  num_classes = mf.num_labels_of(teacher_model, "metakd")
  if protos_kcd.ndim != 3 or counts_kc.shape != protos_kcd.shape[:2] \
      or protos_kcd.shape[1] != num_classes:
    raise ValueError(f"metakd: prototypes must be ([K, C={num_classes}, d], [K, C]), got "
                     f"{protos_kcd.shape} and {counts_kc.shape}")
  if not 0.0 <= own_domain_weight <= 1.0:
    raise ValueError(f"metakd: own_domain_weight must be in [0, 1], got "
                     f"{own_domain_weight}")
  objective = distill_lib.DistillLoss(student, teacher, dict(losses),
                                      temperature=temperature, layer_map=layer_map,
                                      student_init=student_init, pretrained=pretrained)

  def init(rng, batch):
    params_rng, state_rng = jax.random.split(rng)
    params, teacher_params = objective.init(params_rng, batch)
    return MetaKDState(step=jnp.zeros((), jnp.int32), params=params,
                       opt_state=tx.init(params), rng=state_rng,
                       teacher_params=teacher_params, prototypes_kcd=protos_kcd,
                       counts_kc=counts_kc)

  def update(state, batch):
    mf.require_domain(batch, "metakd")
    out = teacher_model.apply({"params": jax.lax.stop_gradient(state.teacher_params)},
                              *model_inputs(batch), deterministic=True)
    valid_b = jnp.asarray(batch.get("weight", jnp.ones(out.logits.shape[:1])),
                          jnp.float32)
    weights_b = expertise_weights(out.logits, out.features, batch["domain"],
                                  state.prototypes_kcd, state.counts_kc,
                                  own_domain_weight=own_domain_weight,
                                  mask_b=valid_b > 0)
    state, metrics = distill_lib.distill_update(objective, tx, state,
                                                dict(batch, weight=valid_b * weights_b))
    metrics = dict(metrics)
    masked = lambda fill: jnp.where(valid_b > 0, weights_b, fill)
    metrics["expertise_min"] = masked(jnp.inf).min()
    metrics["expertise_max"] = masked(-jnp.inf).max()
    return state, metrics

  return TrainStep(init=init, update=update,
                   predict=distill_lib.student_predict(objective))
