"""Fine-tuning: the plainest TrainStep, and the loss-function form TL algorithms build on.

A `LossFn` is `(params, batch, rng, deterministic) -> (loss, aux)` where aux holds at
least 'logits' [batch, classes]. `step_from_loss` turns one into a TrainStep;
`finetune` is `step_from_loss(classifier_loss(model), ...)`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from etjax.algorithms.step import (Batch, TrainState, TrainStep, apply_gradients,
                                  gradient_step)

LossFn = Callable[[Any, Batch, jax.Array, bool], tuple[jax.Array, dict]]

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def model_inputs(batch: Batch) -> tuple:
  """(input_ids, attention_mask, token_type_ids) of a batch; absent ones are None."""
  return tuple(batch.get(name) for name in MODEL_INPUTS)


def weighted_cross_entropy(logits_bc: jax.Array, labels_b: jax.Array,
                           weights_b: Optional[jax.Array] = None,
                           label_smoothing: float = 0.0) -> jax.Array:
  """Mean cross-entropy, weighted per example (weight-0 rows are padding): scalar."""
  num_classes = logits_bc.shape[-1]
  targets_bc = optax.smooth_labels(jax.nn.one_hot(labels_b, num_classes), label_smoothing) \
      if label_smoothing else jax.nn.one_hot(labels_b, num_classes)
  # At least float32 (bf16 logits widen); float64 stays float64 for exact-math tests.
  logits_bc = logits_bc.astype(jnp.promote_types(logits_bc.dtype, jnp.float32))
  losses_b = optax.softmax_cross_entropy(logits_bc, targets_bc)
  if weights_b is None:
    return losses_b.mean()
  weights_b = weights_b.astype(losses_b.dtype)
  return (losses_b * weights_b).sum() / jnp.maximum(weights_b.sum(), 1e-9)


def weighted_accuracy(logits_bc: jax.Array, labels_b: jax.Array,
                      weights_b: Optional[jax.Array] = None) -> jax.Array:
  """Fraction of correct argmax predictions, weighted per example: scalar."""
  # The default float: float32, or float64 under x64 (exact-math tests).
  correct_b = (logits_bc.argmax(-1) == labels_b).astype(jnp.result_type(float))
  if weights_b is None:
    return correct_b.mean()
  weights_b = weights_b.astype(correct_b.dtype)
  return (correct_b * weights_b).sum() / jnp.maximum(weights_b.sum(), 1e-9)


def classifier_loss(model: nn.Module, label_smoothing: float = 0.0) -> LossFn:
  """The LossFn of a classifier (a module whose output has `.logits`).

  aux: 'logits' [B, C], 'features' [B, H] (when the output has them), 'accuracy'.
  """
  def loss_fn(params, batch, rng, deterministic=False):
    out = model.apply({"params": params}, *model_inputs(batch),
                      deterministic=deterministic, rngs={"dropout": rng})
    weights = batch.get("weight")
    loss = weighted_cross_entropy(out.logits, batch["labels"], weights, label_smoothing)
    aux = {"logits": out.logits,
           "accuracy": weighted_accuracy(out.logits, batch["labels"], weights)}
    if getattr(out, "features", None) is not None:
      aux["features"] = out.features
    return loss, aux
  return loss_fn


def with_pretrained(boxed_params: Any, pretrained: Mapping[str, Any],
                    where: str = "params") -> Any:
  """Replaces values in a boxed param tree by the arrays of `pretrained` (a sub-tree).

  Every leaf of `pretrained` must exist in `boxed_params` with the same shape; leaves
  not in `pretrained` (a new classifier head) keep their fresh initialisation.
  """
  if not isinstance(boxed_params, Mapping):
    raise ValueError(f"pretrained weights given for {where}, which is not a sub-tree")
  out = dict(boxed_params)
  for key, value in pretrained.items():
    path = f"{where}/{key}"
    if key not in boxed_params:
      raise ValueError(f"pretrained weights have {path}, which the model lacks; "
                       f"it has {sorted(boxed_params)}")
    target = boxed_params[key]
    if isinstance(value, Mapping):
      out[key] = with_pretrained(target, value, path)
      continue
    box = target if isinstance(target, nn.LogicallyPartitioned) else None
    current = box.value if box is not None else target
    if tuple(np.shape(value)) != tuple(current.shape):
      raise ValueError(f"pretrained {path} has shape {tuple(np.shape(value))}, the model "
                       f"expects {tuple(current.shape)}")
    array = jnp.asarray(value, current.dtype)
    out[key] = box.replace_boxed(array) if box is not None else array
  return type(boxed_params)(out) if not isinstance(boxed_params, dict) else out


def init_params(model: nn.Module, rng: jax.Array, batch: Batch,
                pretrained: Optional[Mapping[str, Any]] = None) -> Any:
  """Boxed params of `model` for the shapes of `batch`, with `pretrained` merged in."""
  params = model.init({"params": rng, "dropout": rng}, *model_inputs(batch))["params"]
  return with_pretrained(params, pretrained) if pretrained else params


def step_from_loss(loss_fn: LossFn, init_fn: Callable[[jax.Array, Batch], Any],
                   tx: optax.GradientTransformation) -> TrainStep:
  """A TrainStep that minimises `loss_fn` with `tx`.

  Args:
    loss_fn: (params, batch, rng, deterministic) -> (loss, aux with 'logits').
    init_fn: (rng, example_batch) -> boxed params.
    tx: the optimizer.
  Metrics: loss, grad_norm and every scalar of aux.
  """
  def init(rng, batch):
    params_rng, state_rng = jax.random.split(rng)
    params = init_fn(params_rng, batch)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), rng=state_rng)

  def grad(state, batch, rng):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch, rng, False)
    metrics = {"loss": loss}
    metrics.update({k: v for k, v in aux.items() if jnp.ndim(v) == 0})
    return grads, metrics

  def apply(state, grads, rng):
    return apply_gradients(state, grads, tx, rng=rng), {}

  def predict(state, batch):
    _, aux = loss_fn(state.params, _with_dummy_labels(batch), state.rng, True)
    return {k: v for k, v in aux.items() if jnp.ndim(v) > 0}

  return gradient_step(init, grad, apply, predict)


def _with_dummy_labels(batch: Batch) -> dict:
  # Prediction inputs may come without labels; the loss needs some, and is discarded.
  batch = dict(batch)
  if "labels" not in batch:
    batch["labels"] = jnp.zeros(batch["input_ids"].shape[:1], jnp.int32)
  return batch


def finetune(model: nn.Module, tx: optax.GradientTransformation, *,
             pretrained: Optional[Mapping[str, Any]] = None,
             label_smoothing: float = 0.0) -> TrainStep:
  """Fine-tunes a classifier (single sentences or sentence pairs: the batch's
  token_type_ids tell them apart) with cross-entropy.

  Args:
    model: e.g. SequenceClassifier(Encoder(config), num_labels).
    tx: an optax optimizer (see etjax.algorithms.optim.make_optimizer).
    pretrained: plain arrays for a sub-tree of the params, e.g. {'encoder': params}
      from etjax.models.from_pretrained; the rest is freshly initialised.
  """
  return step_from_loss(
      classifier_loss(model, label_smoothing),
      lambda rng, batch: init_params(model, rng, batch, pretrained), tx)
