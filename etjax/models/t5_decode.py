"""Greedy decoding for the T5 encoder-decoder, as one jit-friendly loop.

The source is encoded once; then a `lax.while_loop` emits one token per step (stopping
early once every sequence has ended), with static shapes throughout. The decoder keeps
each layer's self-attention keys and values in a [batch, max_length, heads, d_kv]
cache, and the cross-attention keys and values of the encoder output, projected once,
and runs only the newest token each step (T5Model(use_cache=True), the same
parameters).
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from etjax.models.t5 import T5Model


def greedy_decode(module: T5Model, params: Any, input_ids: jax.Array,
                  attention_mask: Optional[jax.Array] = None, *, max_length: int,
                  eos_token_id: Optional[int] = None) -> jax.Array:
  """Generates up to `max_length` tokens per example by taking the argmax each step.

  Matches transformers' `generate(do_sample=False, num_beams=1,
  max_new_tokens=max_length)` without its leading start token: after a sequence emits
  `eos_token_id` the rest of its row is pad_token_id.

  Args:
    module: a T5Model.
    params: its parameters (boxed or not).
    input_ids: source tokens [batch, source_length].
    attention_mask: [batch, source_length], default all ones.
    max_length: how many tokens to generate (static).
    eos_token_id: the end token (may be traced); default the config's.

  Returns:
    int32 [batch, max_length] generated token ids.
  """
  if not isinstance(module, T5Model):
    raise ValueError(f"greedy_decode needs a T5Model, got {type(module).__name__}")
  if max_length < 1:
    raise ValueError(f"greedy_decode: max_length must be positive, got {max_length}")
  cfg = module.config
  eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
  input_ids = jnp.asarray(input_ids, jnp.int32)
  if attention_mask is None:
    attention_mask = jnp.ones_like(input_ids)
  encoded_bsd = module.apply({"params": params}, input_ids, attention_mask,
                             method=T5Model.encode)
  batch = input_ids.shape[0]
  # tokens_bt[:, 0] is the start token; step t writes position t + 1.
  tokens_bt = jnp.full((batch, max_length + 1), cfg.pad_token_id, jnp.int32)
  tokens_bt = tokens_bt.at[:, 0].set(cfg.decoder_start_token_id)

  # The pipeline does not carry caches; the plain stack holds the same parameters.
  cached = T5Model(cfg.replace(pipeline_stages=1, pipeline_microbatches=1),
                   use_cache=True)
  # The first decode call makes the caches: empty self-attention ones, and the
  # cross-attention keys and values of the encoder output.
  _, variables = cached.apply({"params": params}, tokens_bt[:, :max_length], encoded_bsd,
                              attention_mask, method=T5Model.decode, mutable=["cache"])

  def next_logits(step, tokens_bt, cache):
    """Logits [batch, vocab] after the tokens up to `step`, and the updated cache."""
    token_b1 = jax.lax.dynamic_slice_in_dim(tokens_bt, step, 1, axis=1)
    (_, logits_b1v), variables = cached.apply(
        {"params": params, "cache": cache}, token_b1, encoded_bsd, attention_mask,
        method=T5Model.decode, mutable=["cache"])
    return logits_b1v[:, 0], variables["cache"]

  def unfinished(state):
    step, _, done_b, _ = state
    return jnp.logical_and(step < max_length, jnp.logical_not(jnp.all(done_b)))

  def step_fn(state):
    step, tokens_bt, done_b, cache = state
    logits_bv, cache = next_logits(step, tokens_bt, cache)
    next_b = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    next_b = jnp.where(done_b, cfg.pad_token_id, next_b)
    tokens_bt = jax.lax.dynamic_update_slice_in_dim(tokens_bt, next_b[:, None], step + 1,
                                                    axis=1)
    return step + 1, tokens_bt, jnp.logical_or(done_b, next_b == eos), cache

  state = (jnp.int32(0), tokens_bt, jnp.zeros((batch,), bool), variables["cache"])
  _, tokens_bt, _, _ = jax.lax.while_loop(unfinished, step_fn, state)
  return tokens_bt[:, 1:]
