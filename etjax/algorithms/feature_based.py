"""Feature-based TL as TrainSteps: FullyShared, SharedPrivate(-Adv), DRSS(-Adv).

All five train a `SharedPrivateClassifier` on batches that mix source and target rows
(batch['domain'] says which domain each row is from) by minimizing

    L = CE(logits, labels)                                   task loss (weighted)
      + difference_weight  * sum_k || S_k^T P_k ||_F^2        orthogonality, per domain
      + adversarial_weight * CE(D(R(S)), domain)              gradient-reversal adversary
      + drss_weight        * tr(W Omega^-1 W^T)                DRSS matrix-normal prior

where W holds each domain's output weights on the shared features (one column per
domain). DRSS alternates: a gradient step on every parameter with Omega fixed, then
Omega <- (W^T W + eps I)^(1/2) / tr(same) in closed form, W scaled to unit norm so
that the ridge is relative (every `omega_every` steps). Omega lives in the state
(`FeatureTLState.omega`); `domain_relationships`
turns it into the correlation matrix to report.

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

from typing import Any, Callable, Mapping, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from etjax.algorithms.feature_losses import (difference_loss, matrix_normal_regularizer,
                                             omega_closed_form, omega_correlation)
from etjax.algorithms.finetune import (model_inputs, weighted_accuracy,
                                       weighted_cross_entropy, with_pretrained)
from etjax.algorithms.reversal import grl_schedule
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


def feature_tl_loss(model: SharedPrivateClassifier, *, difference_weight: float = 0.0,
                    adversarial_weight: float = 0.0, drss_weight: float = 0.0,
                    label_smoothing: float = 0.0):
  """The combined loss of the module docstring.

  Returns:
    loss_fn(params, batch, rng, deterministic, omega=None, grl_scale=1.0,
    domain_blocks=0) -> (loss [], aux), domain_blocks as SharedPrivateClassifier's
    (K for a domain-blocked batch), with aux: logits [B, C], features [B, F], and scalars accuracy,
    task_loss, difference_loss, domain_loss, domain_accuracy, drss_regularizer (each
    only where its weight is non-zero).
  """
  k = model.num_domains

  def loss_fn(params, batch, rng, deterministic, omega=None, grl_scale=1.0,
              domain_blocks=0):
    domain_b = _domain_ids(batch)
    if domain_blocks:
      _check_blocks(batch, k)
    out = model.apply({"params": params}, *model_inputs(batch), domain_b,
                      deterministic=deterministic, grl_scale=grl_scale,
                      domain_blocks=domain_blocks, rngs={"dropout": rng})
    weights_b = batch.get("weight")
    task = weighted_cross_entropy(out.logits, batch["labels"], weights_b, label_smoothing)
    aux = {"logits": out.logits, "features": out.features, "task_loss": task,
           "accuracy": weighted_accuracy(out.logits, batch["labels"], weights_b)}
    loss = task
    if difference_weight:
      # Per domain d, S and P over d's rows only; each row's P is its own domain's
      # private features (own_private), whichever way the encoders ran.
      valid_b = jnp.ones_like(domain_b) if weights_b is None else weights_b > 0
      diff = sum(difference_loss(out.shared, out.own_private,
                                 mask_b=valid_b * (domain_b == d)) for d in range(k))
      aux["difference_loss"] = diff
      loss = loss + difference_weight * diff
    if adversarial_weight:
      domain_loss = weighted_cross_entropy(out.domain_logits, domain_b, weights_b)
      aux["domain_loss"] = domain_loss
      aux["domain_accuracy"] = weighted_accuracy(out.domain_logits, domain_b, weights_b)
      loss = loss + adversarial_weight * domain_loss
    if drss_weight:
      reg = matrix_normal_regularizer(shared_head_weights(unbox(params)), omega)
      aux["drss_regularizer"] = reg
      loss = loss + drss_weight * reg
    return loss, aux

  return loss_fn


def feature_tl_step(model: SharedPrivateClassifier, tx: optax.GradientTransformation, *,
                    difference_weight: float = 0.0, adversarial_weight: float = 0.0,
                    drss_weight: float = 0.0, omega_every: int = 1,
                    omega_eps: float = 1e-3, grl_scale: float = 1.0,
                    grl_warmup_steps: int = 0, label_smoothing: float = 0.0,
                    pretrained: Optional[Mapping[str, Any]] = None,
                    domain_blocked: bool = False) -> TrainStep:
  """A TrainStep minimizing `feature_tl_loss`, with DRSS's alternating Omega update.

  Args:
    model: the SharedPrivateClassifier.
    tx: the optimizer of every parameter (encoders, heads, discriminator).
    difference_weight, adversarial_weight, drss_weight: loss weights (0 = off).
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

  Returns:
    TrainStep over FeatureTLState. Metrics: loss, grad_norm, the aux scalars, and for
    DRSS 'omega/i_j', the correlation of domains i < j under Omega.
  """
  _check_config(model, difference_weight=difference_weight,
                adversarial_weight=adversarial_weight, drss_weight=drss_weight,
                omega_every=omega_every, grl_warmup_steps=grl_warmup_steps)
  k = model.num_domains
  loss_fn = feature_tl_loss(model, difference_weight=difference_weight,
                            adversarial_weight=adversarial_weight,
                            drss_weight=drss_weight, label_smoothing=label_smoothing)

  blocks = k if domain_blocked and model.private else 0

  def init(rng, batch):
    # The parameters do not depend on the path, and the Trainer may init from any
    # example batch (e.g. one row), so init runs the rows-of-any-domains path.
    _check_domains(batch, k)
    params_rng, state_rng = jax.random.split(rng)
    params = model.init({"params": params_rng, "dropout": params_rng},
                        *model_inputs(batch), _domain_ids(batch))["params"]
    if pretrained:
      params = with_pretrained(params, pretrained)
    omega = jnp.eye(k, dtype=jnp.float32) / k if drss_weight else None
    return FeatureTLState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params), rng=state_rng, omega=omega)

  def grad(state, batch, rng):
    lam = _grl_scale(state.step, grl_scale, grl_warmup_steps)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch, rng, False, state.omega, lam, blocks)
    metrics = {"loss": loss, **{n: v for n, v in aux.items() if jnp.ndim(v) == 0}}
    if adversarial_weight:
      metrics["grl_scale"] = lam
    return grads, metrics

  def apply(state, grads, rng):
    new_state = apply_gradients(state, grads, tx, rng=rng)
    if not drss_weight:
      return new_state, {}
    omega, metrics = _omega_update(new_state, state.omega, omega_every, omega_eps)
    return new_state.replace(omega=omega), metrics

  def predict(state, batch):
    batch = dict(batch)
    if "labels" not in batch:
      batch["labels"] = jnp.zeros(batch["input_ids"].shape[:1], jnp.int32)
    _, aux = loss_fn(state.params, batch, state.rng, True, state.omega, 0.0)
    return {"logits": aux["logits"], "features": aux["features"]}

  return gradient_step(init, grad, apply, predict)


def _check_config(model, *, difference_weight, adversarial_weight, drss_weight,
                  omega_every, grl_warmup_steps) -> None:
  """Raises ValueError for a loss term the model has no parts for, or bad counts."""
  if drss_weight and not model.domain_heads:
    raise ValueError("drss_weight > 0 needs per-domain heads (domain_heads=True)")
  if adversarial_weight and model.discriminator_hidden is None:
    raise ValueError("adversarial_weight > 0 needs a discriminator "
                     "(discriminator_hidden=int)")
  if difference_weight and not model.private:
    raise ValueError("difference_weight > 0 needs private encoders")
  if omega_every < 1:
    raise ValueError(f"omega_every must be >= 1, got {omega_every}")
  if grl_warmup_steps < 0:
    raise ValueError(f"grl_warmup_steps must be >= 0, got {grl_warmup_steps}")


def _grl_scale(step, grl_scale: float, warmup_steps: int) -> jax.Array:
  """The gradient-reversal lambda at `step`: constant, or Ganin's ramp over warmup."""
  if not warmup_steps:
    return jnp.float32(grl_scale)
  return grl_scale * grl_schedule(jnp.minimum(step / warmup_steps, 1.0))


def _omega_update(new_state, omega, omega_every: int, omega_eps: float):
  """DRSS's alternating step: Omega in closed form from the updated shared-head
  weights every `omega_every` steps (else kept). Returns (Omega, metrics with the
  domain correlations 'omega/i_j' under it)."""
  w_dk = shared_head_weights(unbox(new_state.params))
  # Omega does not depend on W's scale; dividing W by its norm makes the ridge
  # relative, so W^T W's smallest eigenvalues stay above omega_eps of the total
  # and Omega^-1 in the next gradient step stays bounded whatever W's scale.
  fresh = omega_closed_form(w_dk / jnp.maximum(jnp.linalg.norm(w_dk), 1e-12),
                            eps=omega_eps)
  omega = jnp.where(new_state.step % omega_every == 0, fresh, omega)
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


def _model(make_encoder: EncoderFactory, *, num_domains: int, num_labels: int,
           private: bool, domain_heads: bool, discriminator_hidden: Optional[int],
           dropout_rate: float, make_private_encoder: Optional[EncoderFactory] = None,
           common_head: bool = False) -> SharedPrivateClassifier:
  if num_domains < 1:
    raise ValueError(f"num_domains must be >= 1, got {num_domains}")
  make_private = make_private_encoder or make_encoder
  return SharedPrivateClassifier(
      shared=make_encoder(),
      private=tuple(make_private() for _ in range(num_domains)) if private else (),
      num_domains=num_domains, num_labels=num_labels, domain_heads=domain_heads,
      discriminator_hidden=discriminator_hidden, dropout_rate=dropout_rate,
      common_head=common_head)


def fully_shared(make_encoder: EncoderFactory, tx: optax.GradientTransformation, *,
                 num_domains: int, num_labels: int = 2, dropout_rate: float = 0.1,
                 **step_kwargs) -> TrainStep:
  """FullyShared: one encoder and one head trained on mixed source and target rows.

  Args:
    make_encoder: () -> a fresh encoder module (e.g. a zoo Encoder or BagOfEmbeddings).
    tx: the optimizer.
    num_domains: K (rows' 'domain' ids are in [0, K)).
    num_labels: C.
    dropout_rate: on the head's input.
    **step_kwargs: more `feature_tl_step` arguments (label_smoothing, pretrained,
      domain_blocked).
  """
  return feature_tl_step(
      _model(make_encoder, num_domains=num_domains, num_labels=num_labels, private=False,
             domain_heads=False, discriminator_hidden=None, dropout_rate=dropout_rate),
      tx, **step_kwargs)


def shared_private(make_encoder: EncoderFactory, tx: optax.GradientTransformation, *,
                   num_domains: int, num_labels: int = 2, difference_weight: float = 0.05,
                   dropout_rate: float = 0.1,
                   make_private_encoder: Optional[EncoderFactory] = None,
                   **step_kwargs) -> TrainStep:
  """SharedPrivate: shared and per-domain private encoders, one head on [s; p], and
  the orthogonality loss between s and p. Arguments as `fully_shared`, plus
  make_private_encoder (default make_encoder) for smaller private encoders."""
  return feature_tl_step(
      _model(make_encoder, num_domains=num_domains, num_labels=num_labels, private=True,
             domain_heads=False, discriminator_hidden=None, dropout_rate=dropout_rate,
             make_private_encoder=make_private_encoder),
      tx, difference_weight=difference_weight, **step_kwargs)


def shared_private_adv(make_encoder: EncoderFactory, tx: optax.GradientTransformation,
                       *, num_domains: int, num_labels: int = 2,
                       difference_weight: float = 0.05, adversarial_weight: float = 0.05,
                       discriminator_hidden: int = 64, dropout_rate: float = 0.1,
                       make_private_encoder: Optional[EncoderFactory] = None,
                       **step_kwargs) -> TrainStep:
  """SharedPrivate-Adv: SharedPrivate plus a domain discriminator on the shared
  features behind gradient reversal (grl_scale, grl_warmup_steps in step_kwargs)."""
  return feature_tl_step(
      _model(make_encoder, num_domains=num_domains, num_labels=num_labels, private=True,
             domain_heads=False, discriminator_hidden=discriminator_hidden,
             dropout_rate=dropout_rate, make_private_encoder=make_private_encoder),
      tx, difference_weight=difference_weight, adversarial_weight=adversarial_weight,
      **step_kwargs)


def drss(make_encoder: EncoderFactory, tx: optax.GradientTransformation, *,
         num_domains: int, num_labels: int = 2, difference_weight: float = 0.05,
         drss_weight: float = 1e-3, omega_every: int = 1, dropout_rate: float = 0.1,
         make_private_encoder: Optional[EncoderFactory] = None,
         common_head: bool = False, **step_kwargs) -> TrainStep:
  """DRSS: the shared-private model with one output layer per domain whose
  shared-feature weights carry the matrix-normal prior with learned Omega.
  common_head adds one output layer shared by all domains, so that the per-domain
  layers model departures from it (see SharedPrivateClassifier)."""
  return feature_tl_step(
      _model(make_encoder, num_domains=num_domains, num_labels=num_labels, private=True,
             domain_heads=True, discriminator_hidden=None, dropout_rate=dropout_rate,
             make_private_encoder=make_private_encoder, common_head=common_head),
      tx, difference_weight=difference_weight, drss_weight=drss_weight,
      omega_every=omega_every, **step_kwargs)


def drss_adv(make_encoder: EncoderFactory, tx: optax.GradientTransformation, *,
             num_domains: int, num_labels: int = 2, difference_weight: float = 0.05,
             drss_weight: float = 1e-3, omega_every: int = 1,
             adversarial_weight: float = 0.05, discriminator_hidden: int = 64,
             dropout_rate: float = 0.1,
             make_private_encoder: Optional[EncoderFactory] = None,
             common_head: bool = False, **step_kwargs) -> TrainStep:
  """DRSS-Adv: DRSS plus the adversarial domain discriminator."""
  return feature_tl_step(
      _model(make_encoder, num_domains=num_domains, num_labels=num_labels, private=True,
             domain_heads=True, discriminator_hidden=discriminator_hidden,
             dropout_rate=dropout_rate, make_private_encoder=make_private_encoder,
             common_head=common_head),
      tx, difference_weight=difference_weight, drss_weight=drss_weight,
      omega_every=omega_every, adversarial_weight=adversarial_weight, **step_kwargs)


FEATURE_METHODS: dict[str, Callable[..., TrainStep]] = {
    "fully_shared": fully_shared, "shared_private": shared_private,
    "shared_private_adv": shared_private_adv, "drss": drss, "drss_adv": drss_adv}


def build_feature_step(method: str, make_encoder: EncoderFactory,
                       tx: optax.GradientTransformation, **kwargs) -> TrainStep:
  """The TrainStep of a feature-based method by name (what a gin job binds).

  Args:
    method: one of FEATURE_METHODS ('fully_shared', 'shared_private',
      'shared_private_adv', 'drss', 'drss_adv').
    make_encoder: () -> a fresh encoder module.
    tx: the optimizer.
    **kwargs: that method's keyword arguments (num_domains, loss weights, ...).
  """
  if method not in FEATURE_METHODS:
    raise ValueError(f"unknown feature-based method {method!r}; expected one of "
                     f"{sorted(FEATURE_METHODS)}")
  return FEATURE_METHODS[method](make_encoder, tx, **kwargs)
