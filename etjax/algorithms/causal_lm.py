"""Causal language-model training (GPT-2's objective) as a TrainStep.

Each position predicts the next token: the targets are input_ids shifted left by one,
with the last position and padding (attention_mask 0) not counted, as transformers'
GPT2LMHeadModel(labels=input_ids) computes its loss when padding is labelled -100.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from etjax.algorithms.finetune import LossFn, init_params, step_from_loss
from etjax.algorithms.mlm import IGNORE
from etjax.algorithms.seq2seq import token_cross_entropy
from etjax.algorithms.step import TrainStep


def next_token_targets(input_ids: jax.Array,
                       attention_mask: Optional[jax.Array] = None) -> jax.Array:
  """int32 [B, L]: input_ids[:, t + 1] at position t; IGNORE at the last position and
  where the next token is padding."""
  input_ids = jnp.asarray(input_ids, jnp.int32)
  ignore = jnp.full(input_ids.shape[:1] + (1,), IGNORE, jnp.int32)
  targets = jnp.concatenate([input_ids[:, 1:], ignore], axis=1)
  if attention_mask is not None:
    next_mask = jnp.concatenate([attention_mask[:, 1:], jnp.zeros_like(ignore)], axis=1)
    targets = jnp.where(next_mask != 0, targets, IGNORE)
  return targets


def causal_lm_loss(model: nn.Module) -> LossFn:
  """LossFn of a decoder-only LM (output `.logits` [B, L, V]; e.g. etjax.models.GPT2).

  aux: 'logits' [B, L, V], 'token_accuracy' (scalar).
  """
  def loss_fn(params, batch, rng, deterministic=False):
    mask = batch.get("attention_mask")
    out = model.apply({"params": params}, batch["input_ids"], mask,
                      deterministic=deterministic, rngs={"dropout": rng})
    targets = next_token_targets(batch["input_ids"], mask)
    counted = targets != IGNORE
    correct = jnp.logical_and(out.logits.argmax(-1) == targets, counted)
    return token_cross_entropy(out.logits, targets), {
        "logits": out.logits,
        "token_accuracy": correct.sum() / jnp.maximum(counted.sum(), 1)}
  return loss_fn


def causal_lm(model: nn.Module, tx: optax.GradientTransformation, *,
              pretrained: Optional[Mapping[str, Any]] = None) -> TrainStep:
  """A TrainStep that trains a causal LM on next-token cross-entropy.

  pretrained: plain arrays for (a sub-tree of) the params, e.g. from
  etjax.models.from_pretrained.
  """
  return step_from_loss(causal_lm_loss(model),
                        lambda rng, batch: init_params(model, rng, batch, pretrained), tx)
