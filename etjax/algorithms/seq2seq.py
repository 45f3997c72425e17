"""Sequence-to-sequence training (T5): teacher-forced token cross-entropy as a TrainStep.

Batch keys: input_ids, attention_mask [B, L]; decoder_input_ids, targets [B, T]
(targets -100, or a decoder_mask of 0, mark positions that do not count).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from etjax.algorithms.finetune import LossFn, step_from_loss
from etjax.algorithms.step import TrainStep


def token_cross_entropy(logits_btv: jax.Array, targets_bt: jax.Array) -> jax.Array:
  """Mean cross-entropy over target tokens that are not -100: scalar."""
  valid_bt = targets_bt != -100
  losses_bt = optax.softmax_cross_entropy_with_integer_labels(
      logits_btv.astype(jnp.float32), jnp.where(valid_bt, targets_bt, 0))
  return (losses_bt * valid_bt).sum() / jnp.maximum(valid_bt.sum(), 1)


def seq2seq_loss(model: nn.Module) -> LossFn:
  """LossFn of an encoder-decoder whose output has `.logits` [B, T, V]."""
  def loss_fn(params, batch, rng, deterministic=False):
    out = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                      batch["decoder_input_ids"], deterministic=deterministic,
                      rngs={"dropout": rng})
    return token_cross_entropy(out.logits, batch["targets"]), {"logits": out.logits}
  return loss_fn


def seq2seq(model: nn.Module, tx: optax.GradientTransformation) -> TrainStep:
  """A TrainStep that trains `model` (e.g. etjax.models.t5.T5Model) on token CE."""
  def init_fn(rng, batch):
    return model.init({"params": rng, "dropout": rng}, batch["input_ids"],
                      batch["attention_mask"], batch["decoder_input_ids"])["params"]
  return step_from_loss(seq2seq_loss(model), init_fn, tx)
