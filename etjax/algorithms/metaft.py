"""Meta fine-tuning (MetaFT; Wang et al., EMNLP 2020) as a train-step transform.

    step = metaft(model, tx, num_domains=4)          # the meta-learner, across domains
    ...train step on batches mixing every domain (batch['domain'] says which)...
    target = finetune_from(meta_state.params["model"], model, tx_target)

The meta-learner is one classifier trained on all domains at once with

    L = sum_i w_i CE(x_i, y_i) / sum_i w_i                  (typicality-weighted task loss)
      + corruption_weight * CE(D(h(x_i)), d~_i)              (corrupted-domain loss)
      + meta_weight * L_query(theta - alpha grad L_support)  (optional episode, below)

Choices where the paper leaves details open (each is tested):

- Typicality (`etjax.algorithms.prototypes`): w_i = n softmax(t_i / temperature) where
  t_i is the cosine of the example's feature h(x_i) (the classifier's pooled feature)
  to the prototypes of its class in the OTHER domains (own_domain_weight mixes in its
  own domain's). MFT computes prototypes once from a fixed pretrained encoder; a model
  trained from scratch has no fixed encoder, so etjax keeps the prototypes as
  meta-learner statistics in the state: per (domain, class), an exponential moving
  average over batches (`update_prototypes`: the first batch that sees a class sets its
  prototype, later ones mix in with 1 - momentum), updated from the current batch's
  stop-gradient features before the scores are taken. The weights are constants.
- Corrupted-domain loss: a linear domain head D on h(x) is trained, jointly with the
  model, to predict domain labels d~ = corrupt_domains(d, rate) (each label replaced by
  another domain with probability `rate`), as in MFT: the shared features are only
  rewarded for the (1 - rate)-clean part of the domain signal, and at
  rate = (K - 1) / K the labels carry none. With reversal_scale > 0 the features reach
  D through a gradient-reversal layer instead (DANN style): D still learns the
  corrupted labels while the encoder is pushed to defeat it, removing domain
  information actively. The default (0) is MFT's plain form. Rows with weight 0
  (padding) count in neither loss.
- Episodes (off by default, inner_steps = 0, which is MFT): with inner_steps > 0 each
  step also samples one domain g (that of a random valid row, so domains are drawn in
  proportion to their share of the batch), adapts the classifier by `inner_steps` SGD
  steps of lr `inner_lr` on the batch's rows of g (the support) and adds the weighted
  loss of the adapted classifier on the other rows (the query), differentiated through
  the inner updates by `etjax.algorithms.meta.inner_adapt` (first_order=True for
  FOMAML). Support and query keep the typicality weights. The episode term
  (`loss_terms.episode_term`) is shared with MetaDTL, where the groups are tasks.

The state is a `MetaState`: the boxed params {'model', 'domain_head'} plus the
prototypes. `finetune_from` turns the meta-learner into an ordinary fine-tuning step.
MetaKD's meta-teacher (etjax.algorithms.metakd) is this same step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from etjax.algorithms import loss_terms
from etjax.algorithms import prototypes as proto
from etjax.algorithms.finetune import (classifier_loss, finetune, init_params,
                                       model_inputs, weighted_accuracy,
                                       weighted_cross_entropy, with_pretrained)
from etjax.algorithms.reversal import gradient_reversal
from etjax.algorithms.settings import settings_from
from etjax.algorithms.step import (Batch, TrainState, TrainStep, apply_gradients, next_rng,
                                   unbox)
from etjax.models import layers

PyTree = Any


@flax.struct.dataclass
class MetaState(TrainState):
  """A TrainState with class prototypes kept as meta-learner statistics.

  Attributes:
    prototypes_kcd: float32 [K, C, d] moving-average feature per (group, class).
    counts_kc: float32 [K, C] examples seen per (group, class); 0 = no prototype yet.
  """
  prototypes_kcd: jax.Array
  counts_kc: jax.Array


def update_prototypes(prototypes_kcd: jax.Array, counts_kc: jax.Array,
                      features_bd: jax.Array, labels_b: jax.Array, groups_b: jax.Array,
                      *, momentum: float, mask_b: Optional[jax.Array] = None
                      ) -> tuple[jax.Array, jax.Array]:
  """Moving-average prototypes after one batch (features under stop_gradient).

  For each (k, c) present in the batch with batch mean m_kc: p <- m_kc if no example
  of (k, c) was seen before, else momentum * p + (1 - momentum) * m_kc; absent pairs
  keep p. Counts add the batch's.

  Returns:
    (prototypes_kcd [K, C, d], counts_kc [K, C]).
  """
  if not 0.0 <= momentum < 1.0:
    raise ValueError(f"prototype momentum must be in [0, 1), got {momentum}")
  num_groups, num_classes = counts_kc.shape
  batch_kcd, batch_kc = proto.class_prototypes(
      jax.lax.stop_gradient(features_bd), labels_b, groups_b, num_classes=num_classes,
      num_domains=num_groups, mask_b=mask_b)
  seen_kc1 = (counts_kc > 0)[..., None]
  mixed_kcd = jnp.where(seen_kc1, momentum * prototypes_kcd + (1 - momentum) * batch_kcd,
                        batch_kcd)
  new_kcd = jnp.where((batch_kc > 0)[..., None], mixed_kcd, prototypes_kcd)
  return new_kcd, counts_kc + batch_kc


def domain_head(num_domains: int) -> layers.Dense:
  """The linear domain classifier D: features [B, d] -> logits [B, K]."""
  return layers.Dense((num_domains,), ("embed",), ("classes",), name="domain_head")


def feature_width(model: nn.Module, batch: Batch) -> int:
  """Width d of the model's `.features` for the shapes of `batch`."""
  out = jax.eval_shape(lambda: model.init_with_output(
      {"params": jax.random.PRNGKey(0)}, *model_inputs(batch))[0])
  return out.features.shape[-1]


def num_labels_of(model: nn.Module, who: str) -> int:
  """The classifier's `num_labels`; ValueError (naming `who`) if it has none."""
  num = getattr(model, "num_labels", None)
  if not isinstance(num, int):
    raise ValueError(f"{who}: model must be a classifier with an int num_labels "
                     f"(e.g. SequenceClassifier), got {type(model).__name__}")
  return num


def require_domain(batch: Batch, who: str) -> None:
  """ValueError (naming `who`) unless the batch has 'domain'."""
  if "domain" not in batch:
    raise ValueError(f"{who}: the batch needs 'domain' (int32 [batch]); it has "
                     f"{sorted(batch)}")


@dataclasses.dataclass(frozen=True)
class MetaFTSettings:
  """Settings of the MetaFT meta-learner (gin/algorithms/metaft.gin's bindings).

  Attributes:
    num_domains: K; batch['domain'] in [0, K).
    corruption_weight: weight of the corrupted-domain loss (0 = off).
    corruption_rate: probability of replacing a domain label by another domain.
    reversal_scale: > 0 puts a gradient-reversal layer (this lambda) before D.
    typicality: False gives every row weight 1 (an ablation: plain multi-domain).
    own_domain_weight: a of the typicality score.
    temperature: tau of the typicality weights.
    momentum: of the prototype moving average.
    inner_lr, inner_steps, first_order, meta_weight: the optional episode term.
    pretrained: plain arrays for a sub-tree of the model's params.
  """
  num_domains: int
  corruption_weight: float = 0.1
  corruption_rate: float = 0.5
  reversal_scale: float = 0.0
  typicality: bool = True
  own_domain_weight: float = 0.0
  temperature: float = 0.5
  momentum: float = 0.9
  inner_lr: Optional[float] = None
  inner_steps: int = 0
  first_order: bool = False
  meta_weight: float = 1.0
  pretrained: Optional[Mapping[str, Any]] = None

  def __post_init__(self):
    if not isinstance(self.num_domains, int) or self.num_domains < 1:
      raise ValueError(f"metaft: num_domains must be an int >= 1, got "
                       f"{self.num_domains!r}")
    for name in ("corruption_weight", "reversal_scale", "meta_weight"):
      if not getattr(self, name) >= 0:
        raise ValueError(f"metaft: {name} must be >= 0, got {getattr(self, name)}")
    if self.corruption_weight > 0 and not 0.0 <= self.corruption_rate <= 1.0:
      raise ValueError(f"metaft: corruption_rate must be in [0, 1], got "
                       f"{self.corruption_rate}")
    if self.corruption_weight > 0 and self.corruption_rate > 0 and self.num_domains < 2:
      raise ValueError("metaft: corrupting domain labels needs num_domains >= 2")
    if not self.temperature > 0:
      raise ValueError(f"metaft: temperature must be > 0, got {self.temperature}")
    if not 0.0 <= self.own_domain_weight <= 1.0:
      raise ValueError(f"metaft: own_domain_weight must be in [0, 1], got "
                       f"{self.own_domain_weight}")
    if not 0.0 <= self.momentum < 1.0:
      raise ValueError(f"metaft: momentum must be in [0, 1), got {self.momentum}")
    loss_terms.check_episode(self.inner_lr, self.inner_steps)


def valid_weights(batch: Batch) -> jax.Array:
  """[B] float32 batch['weight'] (ones without one): the rows that count."""
  return jnp.asarray(batch.get("weight", jnp.ones(batch["labels"].shape)), jnp.float32)


class MetaFTObjective:
  """The MetaFT loss and its parameters (see the module docstring): the
  typicality-weighted task loss composed with the corrupted-domain term and the
  optional episode term (etjax.algorithms.loss_terms).

  Attributes:
    init: (rng, batch) -> boxed params {'model', 'domain_head'}.
    loss: (params, prototypes_kcd, counts_kc, batch, rng, deterministic) -> (loss, aux)
      with aux: 'logits' [B, C], 'features' [B, d], 'typicality' [B] scores,
      'weights' [B], 'corrupted_domains' [B], 'domain_logits' [B, K], the updated
      'prototypes_kcd'/'counts_kc', and scalars 'task_loss', 'domain_loss',
      'domain_accuracy', 'meta_loss', 'episode_group' (the support domain; -1 without
      episodes), 'accuracy'.
  """

  def __init__(self, model: nn.Module, settings: MetaFTSettings):
    self.num_classes = num_labels_of(model, "metaft")
    self.model, self.s = model, settings
    self.head = domain_head(settings.num_domains)
    loss = loss_terms.with_term(self._weighted_task, settings.corruption_weight,
                                self._corrupted_domain)
    if settings.inner_steps > 0:
      model_loss = classifier_loss(model)
      loss = loss_terms.with_term(loss, settings.meta_weight, loss_terms.episode_term(
          lambda p, b, ctx: model_loss(p, b, *ctx["dropout"])[0],
          inner_lr=settings.inner_lr, inner_steps=settings.inner_steps,
          first_order=settings.first_order))
    self._loss = loss

  def init(self, rng: jax.Array, batch: Batch) -> dict:
    model_rng, head_rng = jax.random.split(rng)
    d = feature_width(self.model, batch)
    return {"model": init_params(self.model, model_rng, batch, self.s.pretrained),
            "domain_head": self.head.init(head_rng, jnp.zeros((1, d)))["params"]}

  def loss(self, params, prototypes_kcd, counts_kc, batch, rng, deterministic=False):
    require_domain(batch, "metaft")
    drop_rng, corrupt_rng, episode_rng = jax.random.split(rng, 3)
    return self._loss(params, batch, drop_rng, deterministic,
                      prototypes_kcd=prototypes_kcd, counts_kc=counts_kc,
                      corrupt_rng=corrupt_rng, episode_rng=episode_rng,
                      dropout=(drop_rng, deterministic))

  def _weighted_task(self, params, batch, rng, deterministic, *, prototypes_kcd,
                     counts_kc, **_):
    """The base loss: the task loss with typicality weights from the prototypes
    updated by this batch."""
    out = self.model.apply({"params": params["model"]}, *model_inputs(batch),
                           deterministic=deterministic, rngs={"dropout": rng})
    labels_b, domains_b, valid_b = batch["labels"], batch["domain"], valid_weights(batch)
    prototypes_kcd, counts_kc = update_prototypes(
        prototypes_kcd, counts_kc, out.features, labels_b, domains_b,
        momentum=self.s.momentum, mask_b=valid_b > 0)
    scores_b = proto.typicality_scores(jax.lax.stop_gradient(out.features), labels_b,
                                       domains_b, prototypes_kcd, counts_kc,
                                       own_domain_weight=self.s.own_domain_weight)
    weights_b = loss_terms.instance_weights(scores_b, valid_b, self.s.typicality,
                                            self.s.temperature)
    task = weighted_cross_entropy(out.logits, labels_b, weights_b)
    return task, {"logits": out.logits, "features": out.features,
                  "typicality": scores_b, "weights": weights_b,
                  "prototypes_kcd": prototypes_kcd, "counts_kc": counts_kc,
                  "task_loss": task, **loss_terms.no_episode(),
                  "accuracy": weighted_accuracy(out.logits, labels_b, valid_b)}

  def _corrupted_domain(self, params, batch, aux, ctx):
    """Term: the domain head D (behind reversal when reversal_scale > 0) on the
    corrupted domain labels, every valid row weighted 1: the domain adversary's
    loss on {'domain': corrupted labels, 'weight': valid rows}."""
    corrupted_b = batch["domain"]
    if self.s.corruption_rate > 0 and self.s.num_domains > 1:
      corrupted_b = proto.corrupt_domains(ctx["corrupt_rng"], batch["domain"],
                                          num_domains=self.s.num_domains,
                                          rate=self.s.corruption_rate)
    features_bd = aux["features"]
    if self.s.reversal_scale > 0:
      features_bd = gradient_reversal(features_bd, self.s.reversal_scale)
    domain_logits_bk = self.head.apply({"params": params["domain_head"]}, features_bd)
    domain, more = loss_terms.domain_adversary(
        params, {"domain": corrupted_b, "weight": valid_weights(batch)},
        {"domain_logits": domain_logits_bk}, ctx)
    return domain, {"corrupted_domains": corrupted_b, "domain_logits": domain_logits_bk,
                    **more}


def metaft(model: nn.Module, tx: optax.GradientTransformation,
           **settings) -> TrainStep:
  """The MetaFT meta-learner as a TrainStep (formulas in the module docstring).

  Args:
    model: a classifier returning `.logits` [B, C] and `.features` [B, d] (e.g.
      SequenceClassifier); C = model.num_labels.
    tx: optimizer of params {'model', 'domain_head'}.
    **settings: MetaFTSettings' fields (num_domains required).

  Returns:
    A TrainStep over `MetaState`; metrics: loss, grad_norm, task_loss, domain_loss,
    domain_accuracy, meta_loss, accuracy. predict gives 'logits' [B, C] and
    'features' [B, d].
  """
  objective = MetaFTObjective(model, settings_from(MetaFTSettings, "metaft", settings))
  return step_with_prototypes(objective, tx, objective.s.num_domains,
                              objective.num_classes)


def step_with_prototypes(objective, tx: optax.GradientTransformation, num_groups: int,
                         num_classes: int) -> TrainStep:
  """A TrainStep over `MetaState` minimising `objective.loss` (shared with MetaDTL).

  `objective` has init(rng, batch) -> params with a 'model' entry, and
  loss(params, prototypes_kcd, counts_kc, batch, rng, deterministic) -> (loss, aux)
  with the updated 'prototypes_kcd' [num_groups, num_classes, d] and 'counts_kc' in
  aux; `objective.model` predicts.
  """
  def init(rng, batch):
    params_rng, state_rng = jax.random.split(rng)
    params = objective.init(params_rng, batch)
    d = feature_width(objective.model, batch)
    return MetaState(step=jnp.zeros((), jnp.int32), params=params,
                     opt_state=tx.init(params), rng=state_rng,
                     prototypes_kcd=jnp.zeros((num_groups, num_classes, d), jnp.float32),
                     counts_kc=jnp.zeros((num_groups, num_classes), jnp.float32))

  def update(state, batch):
    step_rng, rng = next_rng(state)
    (loss, aux), grads = jax.value_and_grad(objective.loss, has_aux=True)(
        state.params, state.prototypes_kcd, state.counts_kc, batch, step_rng, False)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    metrics.update(loss_terms.scalars(aux))
    return apply_gradients(state, grads, tx, rng=rng,
                           prototypes_kcd=aux["prototypes_kcd"],
                           counts_kc=aux["counts_kc"]), metrics

  def predict(state, batch):
    out = objective.model.apply({"params": state.params["model"]}, *model_inputs(batch),
                                deterministic=True)
    return {"logits": out.logits, "features": out.features}

  return TrainStep(init=init, update=update, predict=predict)


def start_from(step: TrainStep, params: PyTree,
               tx: optax.GradientTransformation) -> TrainStep:
  """`step` with its initial params replaced by `params` (e.g. a meta-learner's).

  Args:
    step: any TrainStep whose state has `params` and `opt_state` (e.g. `finetune`).
    params: plain or boxed arrays for a sub-tree of the step's params; leaves not
      given (a new head) keep their fresh initialisation.
    tx: the optimizer `step` was built with (its state is re-made for the new params).

  Returns:
    A TrainStep whose init builds `step`'s state, swaps in `params` (boxes kept) and
    re-initialises the optimizer state; update and predict are `step`'s own function
    objects, so one jitted update can serve runs from fresh and from given params.
  """
  plain = jax.device_get(unbox(params))

  def init(rng, batch):
    state = step.init(rng, batch)
    new_params = with_pretrained(state.params, plain)
    return state.replace(params=new_params, opt_state=tx.init(new_params))

  return TrainStep(init=init, update=step.update, predict=step.predict)


def finetune_from(meta_params: PyTree, model: nn.Module, tx: optax.GradientTransformation,
                  **finetune_kwargs) -> TrainStep:
  """Fine-tuning that starts from a meta-learner's classifier.

  Args:
    meta_params: the meta-learner's model params (e.g. state.params['model'] of
      `metaft`; boxed or plain), a sub-tree of `model`'s.
    model: the classifier to fine-tune.
    tx: its optimizer.
    **finetune_kwargs: passed to `etjax.algorithms.finetune.finetune`.

  Returns:
    `finetune(model, tx, pretrained=<meta params>)`, a plain fine-tuning TrainStep.
  """
  return finetune(model, tx, pretrained=jax.device_get(unbox(meta_params)),
                  **finetune_kwargs)


def dataset_prototypes(features_fn: Callable[[Batch], jax.Array],
                       batches: Iterable[Batch], *, num_groups: int, num_classes: int,
                       group_key: str = "domain") -> tuple[np.ndarray, np.ndarray]:
  """Exact class prototypes over a whole dataset (rows with weight 0 left out).

  Args:
    features_fn: batch -> features [B, d] (e.g. a jitted deterministic forward).
    batches: the dataset's batches (e.g. `etjax.data.eval_batches`).
    num_groups, num_classes: K and C.
    group_key: the batch field holding each row's group.

  Returns:
    (prototypes_kcd [K, C, d] float32, counts_kc [K, C] float32): the mean feature of
    each (group, class) over all batches; 0 where a pair has no example.
  """
  sums, counts = None, np.zeros((num_groups, num_classes), np.float64)
  for batch in batches:
    features_bd = np.asarray(features_fn(batch), np.float64)
    mask_b = np.asarray(batch.get("weight", np.ones(len(features_bd)))) > 0
    groups_b, labels_b = np.asarray(batch[group_key]), np.asarray(batch["labels"])
    if sums is None:
      sums = np.zeros((num_groups, num_classes, features_bd.shape[-1]), np.float64)
    np.add.at(sums, (groups_b[mask_b], labels_b[mask_b]), features_bd[mask_b])
    np.add.at(counts, (groups_b[mask_b], labels_b[mask_b]), 1.0)
  if sums is None:
    raise ValueError("dataset_prototypes: no batches given")
  protos = sums / np.maximum(counts, 1.0)[..., None]
  return protos.astype(np.float32), counts.astype(np.float32)
