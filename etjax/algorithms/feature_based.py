"""Feature-based TL as TrainSteps: FullyShared, SharedPrivate(-Adv), DRSS(-Adv).

All five train a `SharedPrivateClassifier` on batches that mix source and target rows
(batch['domain'] says which domain each row is from) by minimizing

    L = CE(logits, labels)                                   task loss (weighted)
      + difference_weight  * sum_k || S_k^T P_k ||_F^2        orthogonality, per domain
      + adversarial_weight * CE(D(R(S)), domain)              gradient-reversal adversary
      + drss_weight        * tr(W Omega^-1 W^T)                DRSS matrix-normal prior

(`loss_terms.task_loss` composed with three terms, the adversary being the
`loss_terms.domain_adversary` that MGTL and MetaFT use too) where W holds each
domain's output weights on the shared features (one column per domain). Each method
is a FeatureModel (its parts) and FeatureTL settings over its defaults.

DRSS alternates: a gradient step on every parameter with Omega fixed, then
Omega <- (W^T W + eps I)^(1/2) / tr(same) in closed form, W scaled to unit norm so
that the ridge is relative (every `omega_every` steps). Omega lives in the state
(`FeatureTLState.omega`); `domain_relationships` turns it into the correlation matrix
to report.

    step = drss_adv(lambda: BagOfEmbeddings(vocab_size=500), tx, num_domains=3)
    state = step.init(rng, batch)
    state, metrics = step.update(state, batch)   # metrics['omega/0_1'], ...

Single sentences and sentence pairs differ only in the batch's token_type_ids.

`domain_blocked=True` trains on domain-blocked batches (K equal contiguous blocks, block
k of domain k: etjax.data.streams.domain_blocked_stream), so each row passes through the
shared encoder and its own domain's private encoder only; prediction on rows of any
domains runs every private encoder and picks each row's own (the same mathematics).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from etjax.algorithms import loss_terms
from etjax.algorithms.feature_losses import (difference_loss, matrix_normal_regularizer,
                                             omega_closed_form, omega_correlation)
from etjax.algorithms.finetune import model_inputs, with_pretrained
from etjax.algorithms.reversal import grl_schedule
from etjax.algorithms.settings import settings_from
from etjax.algorithms.shared_private import (SharedPrivateClassifier,
                                             shared_head_weights)
from etjax.algorithms.step import (Batch, TrainState, TrainStep, apply_gradients,
                                   gradient_step, unbox)

EncoderFactory = Callable[[], nn.Module]


@flax.struct.dataclass
class FeatureTLState(TrainState):
  """TrainState plus DRSS's domain covariance.

  Attributes:
    omega: [K, K] Omega (symmetric PSD, trace 1), or None for methods without DRSS.
  """
  omega: Optional[jax.Array] = None


def _domain_ids(batch: Batch) -> jax.Array:
  if "domain" not in batch:
    raise ValueError("feature-based TL batches need a 'domain' entry (int32 [batch]) "
                     "saying which domain each row comes from")
  return batch["domain"]


def _check_domains(batch: Batch, num_domains: int) -> None:
  """Rejects out-of-range domain ids when they are concrete (not under tracing)."""
  domain = _domain_ids(batch)
  if isinstance(domain, jax.core.Tracer) or isinstance(domain, jax.ShapeDtypeStruct):
    return
  domain = np.asarray(domain)
  if domain.size and (domain.min() < 0 or domain.max() >= num_domains):
    raise ValueError(f"batch['domain'] holds ids {sorted(set(domain.tolist()))}; the "
                     f"model has num_domains={num_domains}, so ids must be in "
                     f"[0, {num_domains}) (remap the data's domain ids first)")


def _check_blocks(batch: Batch, num_domains: int) -> None:
  """Rejects a concrete batch that is not domain-blocked (block k all of domain k).
  Under jit the layout is trusted: domain_blocked_stream builds it."""
  domain = _domain_ids(batch)
  if isinstance(domain, (jax.core.Tracer, jax.ShapeDtypeStruct)):
    return
  domain = np.asarray(domain)
  if domain.shape[0] % num_domains or not np.array_equal(
      domain, np.repeat(np.arange(num_domains), domain.shape[0] // num_domains)):
    raise ValueError(f"domain_blocked=True needs batches of {num_domains} equal "
                     f"contiguous blocks, block k of domain k (see etjax.data.streams."
                     f"domain_blocked_stream); got batch['domain'] = {domain.tolist()}")


@dataclasses.dataclass(frozen=True)
class FeatureTL:
  """How a feature-based step trains its SharedPrivateClassifier.

  Attributes:
    difference_weight, adversarial_weight, drss_weight: weights of the module
      docstring's terms (0 = off).
    omega_every: update Omega in closed form after every this many gradient steps.
    omega_eps: ridge of the closed form relative to tr(W^T W) (keeps Omega well
      conditioned: an absolute ridge on large, nearly collinear W let the
      regularizer's gradient blow up).
    grl_scale: the gradient-reversal lambda.
    grl_warmup_steps: > 0 ramps lambda from 0 to grl_scale over these steps with
      Ganin's schedule; 0 uses grl_scale throughout.
    label_smoothing: of the task loss.
    pretrained: plain arrays for a sub-tree of the params (see `with_pretrained`),
      e.g. `encoders_pretrained(encoder_params, num_domains)`.
    domain_blocked: training batches are domain-blocked (K equal contiguous blocks,
      block k of domain k; etjax.data.streams.domain_blocked_stream), so each private
      encoder runs on its own domain's block only. predict takes rows of any domains.
  """
  difference_weight: float = 0.0
  adversarial_weight: float = 0.0
  drss_weight: float = 0.0
  omega_every: int = 1
  omega_eps: float = 1e-3
  grl_scale: float = 1.0
  grl_warmup_steps: int = 0
  label_smoothing: float = 0.0
  pretrained: Optional[Mapping[str, Any]] = None
  domain_blocked: bool = False


def _forward(model: SharedPrivateClassifier):
  """The model's outputs the loss terms read: logits, features, shared, own_private,
  domain_logits (those the model has). ctx: grl_scale, domain_blocks."""
  def forward(params, batch, rng, deterministic, *, grl_scale=1.0, domain_blocks=0,
              **_):
    domain_b = _domain_ids(batch)
    if domain_blocks:
      _check_blocks(batch, model.num_domains)
    out = model.apply({"params": params}, *model_inputs(batch), domain_b,
                      deterministic=deterministic, grl_scale=grl_scale,
                      domain_blocks=domain_blocks, rngs={"dropout": rng})
    named = {"logits": out.logits, "features": out.features, "shared": out.shared,
             "own_private": out.own_private, "domain_logits": out.domain_logits}
    return {name: value for name, value in named.items() if value is not None}
  return forward


def _difference(num_domains: int) -> loss_terms.Term:
  """Term: the orthogonality loss summed over domains (aux 'difference_loss')."""
  def term(params, batch, aux, ctx):
    del params, ctx
    domain_b, weights_b = batch["domain"], batch.get("weight")
    # Per domain d, S and P over d's rows only; each row's P is its own domain's
    # private features (own_private), whichever way the encoders ran.
    valid_b = jnp.ones_like(domain_b) if weights_b is None else weights_b > 0
    diff = sum(difference_loss(aux["shared"], aux["own_private"],
                               mask_b=valid_b * (domain_b == d))
               for d in range(num_domains))
    return diff, {"difference_loss": diff}
  return term


def _drss_prior(params, batch, aux, ctx):
  """Term: tr(W Omega^-1 W^T) with ctx['omega'] (aux 'drss_regularizer')."""
  del batch, aux
  reg = matrix_normal_regularizer(shared_head_weights(unbox(params)), ctx["omega"])
  return reg, {"drss_regularizer": reg}


def feature_tl_loss(model: SharedPrivateClassifier, *, difference_weight: float = 0.0,
                    adversarial_weight: float = 0.0, drss_weight: float = 0.0,
                    label_smoothing: float = 0.0):
  """The combined loss of the module docstring: the task loss composed with the
  orthogonality, domain-adversary and DRSS terms (etjax.algorithms.loss_terms).

  Returns:
    loss_fn(params, batch, rng, deterministic, omega=None, grl_scale=1.0,
    domain_blocks=0) -> (loss [], aux), domain_blocks as SharedPrivateClassifier's
    (K for a domain-blocked batch), with aux: logits [B, C], features [B, F], the
    model's other outputs, and scalars accuracy, task_loss, difference_loss,
    domain_loss, domain_accuracy, drss_regularizer (each only where its weight is
    non-zero).
  """
  loss = loss_terms.compose(
      loss_terms.task_loss(_forward(model), label_smoothing),
      [(difference_weight, _difference(model.num_domains)),
       (adversarial_weight, loss_terms.domain_adversary), (drss_weight, _drss_prior)])

  def loss_fn(params, batch, rng, deterministic, omega=None, grl_scale=1.0,
              domain_blocks=0):
    return loss(params, batch, rng, deterministic, omega=omega, grl_scale=grl_scale,
                domain_blocks=domain_blocks)
  return loss_fn


def feature_tl_step(model: SharedPrivateClassifier, tx: optax.GradientTransformation,
                    settings: FeatureTL = FeatureTL()) -> TrainStep:
  """A TrainStep minimizing `feature_tl_loss`, with DRSS's alternating Omega update.

  Args:
    model: the SharedPrivateClassifier.
    tx: the optimizer of every parameter (encoders, heads, discriminator).
    settings: loss weights and step options (see FeatureTL).

  Returns:
    TrainStep over FeatureTLState. Metrics: loss, grad_norm, the aux scalars, and for
    DRSS 'omega/i_j', the correlation of domains i < j under Omega.
  """
  _check_config(model, settings)
  loss_fn = feature_tl_loss(model, difference_weight=settings.difference_weight,
                            adversarial_weight=settings.adversarial_weight,
                            drss_weight=settings.drss_weight,
                            label_smoothing=settings.label_smoothing)
  step = _FeatureStep(model, tx, settings, loss_fn)
  return gradient_step(step.init, step.grad, step.apply, step.predict)


@dataclasses.dataclass(frozen=True, eq=False)
class _FeatureStep:
  """The pieces of `feature_tl_step`, one screen each."""
  model: SharedPrivateClassifier
  tx: optax.GradientTransformation
  settings: FeatureTL
  loss_fn: Callable

  def init(self, rng, batch):
    # The parameters do not depend on the path, and the Trainer may init from any
    # example batch (e.g. one row), so init runs the rows-of-any-domains path.
    k = self.model.num_domains
    _check_domains(batch, k)
    params_rng, state_rng = jax.random.split(rng)
    params = self.model.init({"params": params_rng, "dropout": params_rng},
                             *model_inputs(batch), _domain_ids(batch))["params"]
    if self.settings.pretrained:
      params = with_pretrained(params, self.settings.pretrained)
    omega = jnp.eye(k, dtype=jnp.float32) / k if self.settings.drss_weight else None
    return FeatureTLState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=self.tx.init(params), rng=state_rng, omega=omega)

  def grad(self, state, batch, rng):
    s = self.settings
    lam = _grl_scale(state.step, s.grl_scale, s.grl_warmup_steps)
    blocks = self.model.num_domains if s.domain_blocked and self.model.private else 0
    (loss, aux), grads = jax.value_and_grad(self.loss_fn, has_aux=True)(
        state.params, batch, rng, False, state.omega, lam, blocks)
    metrics = {"loss": loss, **loss_terms.scalars(aux)}
    if s.adversarial_weight:
      metrics["grl_scale"] = lam
    return grads, metrics

  def apply(self, state, grads, rng):
    new_state = apply_gradients(state, grads, self.tx, rng=rng)
    if not self.settings.drss_weight:
      return new_state, {}
    omega, metrics = _omega_update(new_state, state.omega, self.settings)
    return new_state.replace(omega=omega), metrics

  def predict(self, state, batch):
    out = _forward(self.model)(state.params, batch, state.rng, True, grl_scale=0.0)
    return {"logits": out["logits"], "features": out["features"]}


def _check_config(model: SharedPrivateClassifier, settings: FeatureTL) -> None:
  """Raises ValueError for a loss term the model has no parts for, or bad counts."""
  if settings.drss_weight and not model.domain_heads:
    raise ValueError("drss_weight > 0 needs per-domain heads (domain_heads=True)")
  if settings.adversarial_weight and model.discriminator_hidden is None:
    raise ValueError("adversarial_weight > 0 needs a discriminator "
                     "(discriminator_hidden=int)")
  if settings.difference_weight and not model.private:
    raise ValueError("difference_weight > 0 needs private encoders")
  if settings.omega_every < 1:
    raise ValueError(f"omega_every must be >= 1, got {settings.omega_every}")
  if settings.grl_warmup_steps < 0:
    raise ValueError(f"grl_warmup_steps must be >= 0, got {settings.grl_warmup_steps}")


def _grl_scale(step, grl_scale: float, warmup_steps: int) -> jax.Array:
  """The gradient-reversal lambda at `step`: constant, or Ganin's ramp over warmup."""
  if not warmup_steps:
    return jnp.float32(grl_scale)
  return grl_scale * grl_schedule(jnp.minimum(step / warmup_steps, 1.0))


def _omega_update(new_state, omega, settings: FeatureTL):
  """DRSS's alternating step: Omega in closed form from the updated shared-head
  weights every `settings.omega_every` steps (else kept). Returns (Omega, metrics with
  the domain correlations 'omega/i_j' under it)."""
  w_dk = shared_head_weights(unbox(new_state.params))
  # Omega does not depend on W's scale; dividing W by its norm makes the ridge
  # relative, so W^T W's smallest eigenvalues stay above omega_eps of the total
  # and Omega^-1 in the next gradient step stays bounded whatever W's scale.
  fresh = omega_closed_form(w_dk / jnp.maximum(jnp.linalg.norm(w_dk), 1e-12),
                            eps=settings.omega_eps)
  omega = jnp.where(new_state.step % settings.omega_every == 0, fresh, omega)
  corr = omega_correlation(omega)
  k = omega.shape[0]
  return omega, {f"omega/{i}_{j}": corr[i, j] for i in range(k) for j in range(i + 1, k)}


def domain_relationships(state: FeatureTLState) -> np.ndarray:
  """DRSS's learned domain relationships: Omega_ij / sqrt(Omega_ii Omega_jj), [K, K].

  Raises:
    ValueError: for a state without Omega (not DRSS).
  """
  if state.omega is None:
    raise ValueError("this state has no Omega; only DRSS and DRSS-Adv learn one")
  return np.asarray(omega_correlation(state.omega))


def encoders_pretrained(encoder_params: Mapping[str, Any], num_private: int) -> dict:
  """The `pretrained` sub-tree loading one encoder's weights into the shared encoder
  and each of `num_private` private encoders."""
  out = {"shared": encoder_params}
  out.update({f"private_{i}": encoder_params for i in range(num_private)})
  return out


@dataclasses.dataclass(frozen=True)
class FeatureModel:
  """The SharedPrivateClassifier of a feature-based method.

  Attributes:
    num_domains: K (rows' 'domain' ids are in [0, K)).
    num_labels: C.
    dropout_rate: on the head's input.
    private: per-domain private encoders (all methods but FullyShared).
    domain_heads: one output layer per domain (DRSS).
    discriminator_hidden: the adversarial domain discriminator's width; None for none.
    common_head: with domain_heads, one output layer shared by all domains beside them,
      so that the per-domain layers model departures from it.
    make_private_encoder: () -> a private encoder (default: make_encoder), e.g. a
      smaller one.
  """
  num_domains: int
  num_labels: int = 2
  dropout_rate: float = 0.1
  private: bool = False
  domain_heads: bool = False
  discriminator_hidden: Optional[int] = None
  common_head: bool = False
  make_private_encoder: Optional[EncoderFactory] = None


def feature_model(make_encoder: EncoderFactory,
                  settings: FeatureModel) -> SharedPrivateClassifier:
  """The SharedPrivateClassifier `settings` describe, encoders from `make_encoder`."""
  if settings.num_domains < 1:
    raise ValueError(f"num_domains must be >= 1, got {settings.num_domains}")
  make_private = settings.make_private_encoder or make_encoder
  return SharedPrivateClassifier(
      shared=make_encoder(),
      private=(tuple(make_private() for _ in range(settings.num_domains))
               if settings.private else ()),
      num_domains=settings.num_domains, num_labels=settings.num_labels,
      domain_heads=settings.domain_heads,
      discriminator_hidden=settings.discriminator_hidden,
      dropout_rate=settings.dropout_rate, common_head=settings.common_head)


# Per method: its model's parts and its default settings (a gin/algorithms file's
# bindings go over these). A method takes FeatureTL's settings, FeatureModel's
# num_domains, num_labels and dropout_rate, and the model settings of its parts:
# make_private_encoder (private), discriminator_hidden (adversary), common_head
# (domain_heads).
_ADV = {"adversarial_weight": 0.05, "discriminator_hidden": 64}
_METHODS: dict[str, tuple[dict, dict]] = {
    "fully_shared": ({}, {}),
    "shared_private": ({"private": True}, {"difference_weight": 0.05}),
    "shared_private_adv": ({"private": True}, {"difference_weight": 0.05, **_ADV}),
    "drss": ({"private": True, "domain_heads": True},
             {"difference_weight": 0.05, "drss_weight": 1e-3}),
    "drss_adv": ({"private": True, "domain_heads": True},
                 {"difference_weight": 0.05, "drss_weight": 1e-3, **_ADV}),
}


def _method_settings(method: str, settings: Mapping[str, Any]
                     ) -> tuple[FeatureModel, FeatureTL]:
  """(model settings, step settings) of `method` with `settings` over its defaults.

  Raises:
    ValueError: naming the method and the setting, for one it does not take.
  """
  parts, defaults = _METHODS[method]
  settings = {**defaults, **settings}
  takes = {"num_domains", "num_labels", "dropout_rate"}
  takes |= {"make_private_encoder"} if parts.get("private") else set()
  takes |= {"discriminator_hidden"} if "discriminator_hidden" in defaults else set()
  takes |= {"common_head"} if parts.get("domain_heads") else set()
  model_names = {f.name for f in dataclasses.fields(FeatureModel)}
  model = {k: v for k, v in settings.items() if k in model_names}
  if set(model) - takes:
    raise ValueError(f"{method}: unknown setting(s) {sorted(set(model) - takes)}; its "
                     f"model settings are {sorted(takes)}")
  step = {k: v for k, v in settings.items() if k not in model_names}
  return (settings_from(FeatureModel, method, {**parts, **model}),
          settings_from(FeatureTL, method, step))


def build_feature_step(method: str, make_encoder: EncoderFactory,
                       tx: optax.GradientTransformation, **settings) -> TrainStep:
  """The TrainStep of a feature-based method by name (what a gin job binds).

  Args:
    method: one of FEATURE_METHODS ('fully_shared', 'shared_private',
      'shared_private_adv', 'drss', 'drss_adv').
    make_encoder: () -> a fresh encoder module (e.g. a zoo Encoder or BagOfEmbeddings).
    tx: the optimizer.
    **settings: the method's settings over its defaults: num_domains (required),
      num_labels, dropout_rate, its parts' model settings (see `_METHODS`) and any of
      FeatureTL's (loss weights, label_smoothing, pretrained, domain_blocked, ...).
  """
  if method not in _METHODS:
    raise ValueError(f"unknown feature-based method {method!r}; expected one of "
                     f"{sorted(_METHODS)}")
  model, step = _method_settings(method, settings)
  return feature_tl_step(feature_model(make_encoder, model), tx, step)


def fully_shared(make_encoder: EncoderFactory, tx: optax.GradientTransformation,
                 **settings) -> TrainStep:
  """FullyShared: one encoder and one head trained on mixed source and target rows.
  Settings as `build_feature_step`."""
  return build_feature_step("fully_shared", make_encoder, tx, **settings)


def shared_private(make_encoder: EncoderFactory, tx: optax.GradientTransformation,
                   **settings) -> TrainStep:
  """SharedPrivate: shared and per-domain private encoders, one head on [s; p], and
  the orthogonality loss between s and p (difference_weight 0.05 by default)."""
  return build_feature_step("shared_private", make_encoder, tx, **settings)


def shared_private_adv(make_encoder: EncoderFactory, tx: optax.GradientTransformation,
                       **settings) -> TrainStep:
  """SharedPrivate-Adv: SharedPrivate plus a domain discriminator on the shared
  features behind gradient reversal (adversarial_weight 0.05, discriminator_hidden 64;
  grl_scale, grl_warmup_steps)."""
  return build_feature_step("shared_private_adv", make_encoder, tx, **settings)


def drss(make_encoder: EncoderFactory, tx: optax.GradientTransformation,
         **settings) -> TrainStep:
  """DRSS: the shared-private model with one output layer per domain whose
  shared-feature weights carry the matrix-normal prior with learned Omega
  (drss_weight 1e-3, omega_every; common_head adds one output layer shared by all
  domains, so that the per-domain layers model departures from it)."""
  return build_feature_step("drss", make_encoder, tx, **settings)


def drss_adv(make_encoder: EncoderFactory, tx: optax.GradientTransformation,
             **settings) -> TrainStep:
  """DRSS-Adv: DRSS plus the adversarial domain discriminator."""
  return build_feature_step("drss_adv", make_encoder, tx, **settings)


FEATURE_METHODS: dict[str, Callable[..., TrainStep]] = {
    "fully_shared": fully_shared, "shared_private": shared_private,
    "shared_private_adv": shared_private_adv, "drss": drss, "drss_adv": drss_adv}
