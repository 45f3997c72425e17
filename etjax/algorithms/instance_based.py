"""Instance-based TL as TrainSteps: RTL and MGTL, reinforced source-data selectors.

Each update sees a source batch, a target batch and a target development batch:

    batch = {'source': {...}, 'target': {...}, 'dev': {...}}   (each a DESIGN.md batch)

1. The TL model looks at every source example (deterministically): representation
   f_b, prediction softmax(logits_b), loss l_b under the example's own label (and, for
   MGTL, the discriminator's probability that it is target-like). These are the
   selector's input; the selector policy (etjax.algorithms.policy.SelectorPolicy)
   turns them into select probabilities and samples select/skip actions a_b.
2. The TL model takes one optimizer step on the target batch plus the selected source
   examples (weights a_b): `loss_terms.task_loss`, for MGTL composed with the
   `loss_terms.domain_adversary` the feature-based methods use (target = domain 1).
3. Delayed reward (RTL): the change of the target development metric made by
   training on the selected data. By default ('source_gain') it is measured against
   the same step without the source examples, R = metric(dev; after) -
   metric(dev; after a target-only step), so that the target batch's own effect,
   which no action controls, cancels; 'gain' measures it against the metric before
   the step. (On the label-noise tests the plain 'gain' gives a far noisier
   REINFORCE signal.)
   MGTL adds a domain discriminator on the TL model's features (behind gradient
   reversal, so the TL model learns domain-invariant features against it) and an
   immediate reward per selected example, a_b (p_target(b) - 1/2): selecting
   target-like examples pays.
4. The selector takes a REINFORCE step with a moving-average baseline (both live in
   the state), plus an optional entropy bonus that keeps it exploring.

`instance_batches` zips three encoded datasets into such batches.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from etjax.algorithms import loss_terms
from etjax.algorithms.finetune import (model_inputs, weighted_accuracy,
                                       weighted_cross_entropy, with_pretrained)
from etjax.algorithms.policy import (SelectorPolicy, entropy, reinforce_loss,
                                     sample_actions, update_baseline)
from etjax.algorithms.reversal import gradient_reversal
from etjax.algorithms.settings import settings_from
from etjax.algorithms.step import (Batch, TrainState, TrainStep, apply_gradients,
                                   next_rng)
from etjax.algorithms.tl_modules import DomainDiscriminator
from etjax.data.streams import NamedStreams, named_streams

PyTree = Any
PARTS = ("source", "target", "dev")
DEV_METRICS = ("neg_loss", "accuracy")
REWARDS = ("gain", "source_gain")


@flax.struct.dataclass
class SelectionState(TrainState):
  """TrainState (of the TL model) plus the selector.

  Attributes:
    selector_params: the SelectorPolicy's parameters (boxed).
    selector_opt_state: their optax state.
    baseline: [] moving average of the rewards (REINFORCE baseline).
    reward_var: [] moving average of (reward - baseline)^2, which scales the
      advantages to unit size when `normalize_rewards` is on.
  """
  selector_params: PyTree
  selector_opt_state: PyTree
  baseline: jax.Array
  reward_var: jax.Array


class SelectionTLModel(nn.Module):
  """A classifier with, for MGTL, a source/target discriminator on its features.

  Attributes:
    classifier: a module with the classifier call convention whose output has
      `.logits` [B, C] and `.features` [B, H] (e.g. etjax.models.SequenceClassifier).
    discriminator_hidden: hidden width of the discriminator; None for none (RTL).
  """
  classifier: nn.Module
  discriminator_hidden: Optional[int] = None

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *,
               deterministic: bool = True, grl_scale: Any = 1.0):
    """Returns (logits [B, C], features [B, H], target logit [B] or None)."""
    out = self.classifier(input_ids, attention_mask, token_type_ids,
                          deterministic=deterministic)
    target_logit_b = None
    if self.discriminator_hidden is not None:
      logits_b2 = DomainDiscriminator(2, self.discriminator_hidden, name="discriminator")(
          gradient_reversal(out.features, grl_scale))
      # Binary source (0) / target (1): the difference of the two logits.
      target_logit_b = logits_b2[:, 1] - logits_b2[:, 0]
    return out.logits, out.features, target_logit_b


def _per_example_ce(logits_bc: jax.Array, labels_b: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(
      logits_bc.astype(jnp.float32), labels_b)


def _check_batch(batch: Mapping[str, Any]) -> None:
  if not isinstance(batch, Mapping) or not set(PARTS) <= set(batch):
    raise ValueError(f"instance-based TL batches are dicts with {list(PARTS)} entries "
                     f"(each a batch dict); got keys "
                     f"{sorted(batch) if isinstance(batch, Mapping) else type(batch)}")
  src, tgt = batch["source"], batch["target"]
  if src["input_ids"].shape[1:] != tgt["input_ids"].shape[1:]:
    raise ValueError(f"source and target batches need one sequence length to be "
                     f"trained together: input_ids {src['input_ids'].shape} vs "
                     f"{tgt['input_ids'].shape}")


def _concat(a: Batch, b: Batch, keys) -> dict:
  return {k: jnp.concatenate([jnp.asarray(a[k]), jnp.asarray(b[k])]) for k in keys}


def _weights(batch: Batch) -> jax.Array:
  w = batch.get("weight")
  return (jnp.ones(batch["input_ids"].shape[:1], jnp.float32) if w is None
          else jnp.asarray(w, jnp.float32))


@dataclasses.dataclass(frozen=True)
class SelectionSettings:
  """Settings of RTL and MGTL (the bindings of gin/algorithms/rtl.gin, mgtl.gin).

  Attributes:
    selector_hidden: hidden width of the selector MLP (0: linear policy).
    dev_metric: 'neg_loss' (minus the dev cross-entropy; smooth) or 'accuracy'.
    reward: 'gain', the dev metric after the step minus before it (RTL's delayed
      reward), or 'source_gain', after the step minus after the same step without
      the source examples (isolates what the selected data did; one more backward
      pass and dev evaluation per step).
    baseline_decay: of the reward moving averages (baseline and spread).
    normalize_rewards: divide advantages by the running reward spread.
    entropy_weight: bonus on the policy's mean entropy (exploration).
    discriminator_hidden: None (RTL) or the discriminator's hidden width (MGTL).
    adversarial_weight: weight of the discriminator's loss in the TL loss.
    immediate_weight: weight of the discriminator's immediate rewards.
    grl_scale: gradient-reversal lambda between the features and the discriminator.
    label_smoothing: of the TL model's task loss.
    pretrained: plain arrays for a sub-tree of the TL model's params, e.g.
      {'classifier': {'encoder': encoder_params}}.
  """
  selector_hidden: int = 32
  dev_metric: str = "neg_loss"
  reward: str = "source_gain"
  baseline_decay: float = 0.9
  normalize_rewards: bool = True
  entropy_weight: float = 0.0
  discriminator_hidden: Optional[int] = None
  adversarial_weight: float = 0.0
  immediate_weight: float = 0.0
  grl_scale: float = 1.0
  label_smoothing: float = 0.0
  pretrained: Optional[Mapping[str, Any]] = None

  def __post_init__(self):
    if self.reward not in REWARDS:
      raise ValueError(f"reward must be one of {REWARDS}, got {self.reward!r}")
    if self.dev_metric not in DEV_METRICS:
      raise ValueError(f"dev_metric must be one of {DEV_METRICS}, got "
                       f"{self.dev_metric!r}")
    if ((self.adversarial_weight or self.immediate_weight)
        and self.discriminator_hidden is None):
      raise ValueError("adversarial_weight / immediate_weight need a discriminator "
                       "(discriminator_hidden=int)")


def selection_step(classifier: nn.Module, tx: optax.GradientTransformation,
                   selector_tx: optax.GradientTransformation,
                   settings: SelectionSettings = SelectionSettings()) -> TrainStep:
  """The shared machinery of RTL (no discriminator) and MGTL (with one).

  Args:
    classifier: the TL model (see SelectionTLModel).
    tx: optimizer of the TL model (and discriminator).
    selector_tx: optimizer of the selector policy. (Its own optax state, not a group
      of one `optax.multi_transform` with tx: the selector's gradient needs the TL
      model's params after tx's step, so the two updates happen one after the other.)
    settings: see SelectionSettings.

  Returns:
    TrainStep over SelectionState; update takes {'source', 'target', 'dev'} batches.
    Metrics: loss (the TL loss), task_loss, accuracy (on target + selected source),
    dev_before (the dev metric before the step), reward (the delayed reward),
    baseline, selected_fraction, selector_loss, policy_entropy; MGTL adds
    domain_loss, domain_accuracy, immediate_reward and source_target_prob (the
    discriminator's mean target probability of the source batch).
    predict(state, batch) on a plain batch gives logits [B, C], features [B, H] and
    select_prob [B] (the policy's probability of selecting each labeled example).
  """
  model = SelectionTLModel(classifier, settings.discriminator_hidden)
  parts = _Selection(model, SelectorPolicy(hidden=settings.selector_hidden), tx,
                     selector_tx, settings)
  return TrainStep(init=parts.init, update=parts.update, predict=parts.predict)


_TL_KEYS = ("input_ids", "attention_mask", "token_type_ids", "labels")


@dataclasses.dataclass(frozen=True, eq=False)
class _Selection:
  """The pieces of a selection step, one screen each; arguments as `selection_step`."""
  model: SelectionTLModel
  selector: SelectorPolicy
  tx: optax.GradientTransformation
  selector_tx: optax.GradientTransformation
  s: SelectionSettings

  @property
  def mgtl(self) -> bool:
    return self.model.discriminator_hidden is not None

  def forward(self, params, part, *, deterministic, rng=None):
    return self.model.apply({"params": params}, *model_inputs(part),
                            deterministic=deterministic, grl_scale=self.s.grl_scale,
                            rngs={"dropout": rng} if rng is not None else {})

  def selector_inputs(self, params, part):
    """[B, H + C + 1 (+1)] what the selector sees of each labeled example."""
    logits_bc, features_bh, target_logit_b = jax.lax.stop_gradient(
        self.forward(params, part, deterministic=True))
    loss_b = _per_example_ce(logits_bc, part["labels"])
    cols = [features_bh.astype(jnp.float32), jax.nn.softmax(logits_bc), loss_b[:, None]]
    if self.mgtl:
      cols.append(jax.nn.sigmoid(target_logit_b)[:, None])
    return jnp.concatenate(cols, -1), target_logit_b

  def dev_value(self, params, dev):
    logits_bc, _, _ = self.forward(params, dev, deterministic=True)
    w = _weights(dev)
    if self.s.dev_metric == "accuracy":
      return weighted_accuracy(logits_bc, dev["labels"], w)
    return -weighted_cross_entropy(logits_bc, dev["labels"], w)

  def init(self, rng, batch):
    if isinstance(batch, Mapping) and "source" in batch:
      batch = batch["source"]
    model_rng, selector_rng, state_rng = jax.random.split(rng, 3)
    params = self.model.init({"params": model_rng, "dropout": model_rng},
                             *model_inputs(batch))["params"]
    if self.s.pretrained:
      params = with_pretrained(params, self.s.pretrained)
    x_bf, _ = self.selector_inputs(params, {**batch, "labels": jnp.zeros(
        batch["input_ids"].shape[:1], jnp.int32)})
    selector_params = self.selector.init(selector_rng, x_bf)["params"]
    return SelectionState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=self.tx.init(params), rng=state_rng,
                          selector_params=selector_params,
                          selector_opt_state=self.selector_tx.init(selector_params),
                          baseline=jnp.zeros((), jnp.float32),
                          reward_var=jnp.ones((), jnp.float32))

  def tl_loss(self, params, batch, rng):
    """The TL model's loss on `batch` (target + source rows, weighted by
    batch['weight']; batch['domain'] is 1 on target rows): the task loss plus, for
    MGTL, the domain adversary (etjax.algorithms.loss_terms). (loss, aux)."""
    def forward(params, batch, rng, deterministic):
      logits_bc, features_bh, d_logit_b = self.forward(
          params, batch, deterministic=deterministic, rng=rng)
      out = {"logits": logits_bc, "features": features_bh}
      if self.mgtl:  # source (0) / target (1) logits of the binary discriminator
        out["domain_logits"] = jnp.stack([jnp.zeros_like(d_logit_b), d_logit_b], -1)
      return out
    loss = loss_terms.task_loss(forward, self.s.label_smoothing)
    if self.mgtl:
      loss = loss_terms.with_term(loss, self.s.adversarial_weight,
                                  loss_terms.domain_adversary)
    return loss(params, batch, rng, False)

  def delayed_reward(self, state, new_state, dev, dev_before, target_only_loss, rng):
    """What this step did to the target dev metric (step 3 of the module docstring)."""
    dev_reference = dev_before
    if self.s.reward == "source_gain":
      # Against the same step without source data: the target batch's own effect on
      # the dev metric, which does not depend on the actions, cancels.
      target_grads = jax.grad(target_only_loss)(state.params)
      dev_reference = self.dev_value(
          apply_gradients(state, target_grads, self.tx, rng=rng).params, dev)
    return self.dev_value(new_state.params, dev) - dev_reference

  def advantages(self, state, delayed, actions_b, valid_b, target_logit_b):
    """(advantages [B], new reward_var, metrics) for REINFORCE on the selector.

    Dev-metric changes are tiny and shrink as training converges; dividing the
    advantage by the running spread of the delayed reward keeps the policy's step
    size (and the weights of the entropy bonus and immediate rewards) steady.
    """
    advantage = delayed - state.baseline
    scale = jnp.sqrt(state.reward_var) + 1e-8 if self.s.normalize_rewards else 1.0
    decay = self.s.baseline_decay
    reward_var = jnp.where(state.step == 0, advantage**2,
                           decay * state.reward_var + (1 - decay) * advantage**2)
    advantages, metrics = advantage / scale, {}
    if self.mgtl:
      # Immediate rewards: a selected example earns how much more target-like the
      # discriminator finds it than the batch's source examples on average (in
      # standard deviations), so they steer WHICH examples, not how many.
      p_b = jax.nn.sigmoid(target_logit_b)
      n = jnp.maximum(jnp.sum(valid_b), 1.0)
      mean = jnp.sum(p_b * valid_b) / n
      std = jnp.sqrt(jnp.sum((p_b - mean)**2 * valid_b) / n)
      immediate_b = actions_b * valid_b * (p_b - mean) / (std + 1e-6)
      advantages = advantages + self.s.immediate_weight * immediate_b
      metrics = {"immediate_reward": jnp.sum(immediate_b) / n,
                 "source_target_prob": mean}
    return advantages, reward_var, metrics

  def selector_update(self, state, x_bf, actions_b, valid_b, advantages):
    """One REINFORCE step of the selector: (new selector fields, metrics)."""
    def selector_loss(selector_params):
      logits_b = self.selector.apply({"params": selector_params}, x_bf)
      pg = reinforce_loss(logits_b, actions_b, advantages, mask_b=valid_b,
                          reduction="mean")
      ent = jnp.sum(entropy(logits_b) * valid_b) / jnp.maximum(jnp.sum(valid_b), 1.0)
      return pg - self.s.entropy_weight * ent, ent
    (sel_loss, ent), sel_grads = jax.value_and_grad(selector_loss, has_aux=True)(
        state.selector_params)
    sel_updates, selector_opt_state = self.selector_tx.update(
        sel_grads, state.selector_opt_state, state.selector_params)
    fields = {"selector_params": optax.apply_updates(state.selector_params, sel_updates),
              "selector_opt_state": selector_opt_state}
    return fields, {"selector_loss": sel_loss, "policy_entropy": ent}

  def update(self, state, batch):
    _check_batch(batch)
    src, tgt, dev = batch["source"], batch["target"], batch["dev"]
    step_rng, rng = next_rng(state)
    sample_rng, dropout_rng = jax.random.split(step_rng)
    valid_b = (_weights(src) > 0).astype(jnp.float32)
    # 1. The selector acts on the source batch.
    x_bf, target_logit_b = self.selector_inputs(state.params, src)
    z_b = self.selector.apply({"params": state.selector_params}, x_bf)
    actions_b = sample_actions(sample_rng, z_b) * valid_b.astype(jnp.int32)
    # 2. The TL model trains on the target batch plus the selected source examples.
    w_b = jnp.concatenate([_weights(tgt), _weights(src) * actions_b])
    is_target_b = jnp.concatenate([jnp.ones_like(_weights(tgt), jnp.int32),
                                   jnp.zeros_like(actions_b)])
    both = {**_concat(tgt, src, _TL_KEYS), "weight": w_b, "domain": is_target_b}
    dev_before = self.dev_value(state.params, dev)
    (loss, aux), grads = jax.value_and_grad(self.tl_loss, has_aux=True)(
        state.params, both, dropout_rng)
    new_state = apply_gradients(state, grads, self.tx, rng=rng)
    # 3. Delayed reward; 4. REINFORCE on the selector.
    delayed = self.delayed_reward(
        state, new_state, dev, dev_before,
        lambda p: self.tl_loss(p, {**both, "weight": w_b * is_target_b}, dropout_rng)[0],
        rng)
    advantages, reward_var, reward_metrics = self.advantages(
        state, delayed, actions_b, valid_b, target_logit_b)
    fields, selector_metrics = self.selector_update(state, x_bf, actions_b, valid_b,
                                                    advantages)
    new_state = new_state.replace(
        **fields, reward_var=reward_var,
        baseline=update_baseline(state.baseline, delayed, decay=self.s.baseline_decay))
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               **loss_terms.scalars(aux),
               "dev_before": dev_before, "reward": delayed, **reward_metrics,
               "baseline": state.baseline, **selector_metrics,
               "selected_fraction": jnp.sum(actions_b * valid_b) / jnp.maximum(
                   jnp.sum(valid_b), 1.0)}
    return new_state, metrics

  def predict(self, state, batch):
    logits_bc, features_bh, _ = self.forward(state.params, batch, deterministic=True)
    out = {"logits": logits_bc, "features": features_bh}
    if "labels" in batch:
      x_bf, _ = self.selector_inputs(state.params, batch)
      out["select_prob"] = jax.nn.sigmoid(
          self.selector.apply({"params": state.selector_params}, x_bf))
    return out


def rtl(classifier: nn.Module, tx: optax.GradientTransformation,
        selector_tx: optax.GradientTransformation, **settings) -> TrainStep:
  """RTL (Qu et al. 2019): a reinforced selector with the delayed dev reward only.

  Settings as SelectionSettings (without the discriminator's).
  """
  for name in ("discriminator_hidden", "adversarial_weight", "immediate_weight"):
    if settings.get(name):
      raise ValueError(f"rtl takes no {name}; use mgtl for a discriminator")
  return selection_step(classifier, tx, selector_tx,
                        settings_from(SelectionSettings, "rtl", settings))


MGTL_DEFAULTS = {"discriminator_hidden": 64, "adversarial_weight": 0.1,
                 "immediate_weight": 0.1}


def mgtl(classifier: nn.Module, tx: optax.GradientTransformation,
         selector_tx: optax.GradientTransformation, **settings) -> TrainStep:
  """MGTL (Wang et al. 2019): RTL plus a source/target discriminator that the TL
  model's features play against (gradient reversal) and that pays immediate rewards
  for selecting target-like examples. Settings as SelectionSettings, over
  MGTL_DEFAULTS."""
  return selection_step(classifier, tx, selector_tx, settings_from(
      SelectionSettings, "mgtl", {**MGTL_DEFAULTS, **settings}))


def instance_batches(source: Mapping[str, np.ndarray], target: Mapping[str, np.ndarray],
                     dev: Mapping[str, np.ndarray], *, source_batch_size: int,
                     target_batch_size: int, dev_batch_size: int, seed: int
                     ) -> NamedStreams:
  """Endless {'source', 'target', 'dev'} batches from three encoded datasets: an
  etjax.data.streams iterator (each part reshuffled every epoch of its own; extra
  per-example arrays such as 'index' ride along; position saved by the Trainer).

  Args:
    source, target, dev: encoded data (dicts of arrays [N, ...]).
    source_batch_size, target_batch_size, dev_batch_size: rows of each part.
    seed: shuffling seed.
  """
  return named_streams({"source": source, "target": target, "dev": dev},
                       {"source": source_batch_size, "target": target_batch_size,
                        "dev": dev_batch_size}, seed=seed)


INSTANCE_METHODS = {"rtl": rtl, "mgtl": mgtl}


def build_instance_step(method: str, classifier: nn.Module,
                        tx: optax.GradientTransformation,
                        selector_tx: Optional[optax.GradientTransformation] = None, *,
                        selector_learning_rate: float = 1e-2, **kwargs) -> TrainStep:
  """The TrainStep of RTL or MGTL by name (what a gin job binds).

  Args:
    method: 'rtl' or 'mgtl'.
    classifier, tx: as `selection_step`.
    selector_tx: the selector's optimizer; None for Adam at selector_learning_rate.
    selector_learning_rate: used when selector_tx is None.
    **kwargs: the method's settings (see SelectionSettings).
  """
  if method not in INSTANCE_METHODS:
    raise ValueError(f"unknown instance-based method {method!r}; expected one of "
                     f"{sorted(INSTANCE_METHODS)}")
  if selector_tx is None:
    selector_tx = optax.adam(selector_learning_rate)
  return INSTANCE_METHODS[method](classifier, tx, selector_tx, **kwargs)
