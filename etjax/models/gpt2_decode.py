"""Text generation for decoder-only language models (GPT-2) with a key/value cache.

The prompt fills the cache in one call; then a `lax.while_loop` emits one token per
step (greedy, or sampled with temperature, top-k and top-p), stopping early once
every row has emitted a stop token, with static shapes throughout. As in
etjax.models.t5_decode, the cached module is the same module with `decode=True`
and the same parameters.

Prompts are left-padded (transformers' convention for batched generation): the last
column holds every row's last prompt token, and padded positions are numbered as
transformers' generate numbers them (cumsum(mask) - 1).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from etjax.models.gpt2 import GPT2, positions_from_mask


class GenerateOutput(NamedTuple):
  """tokens: int32 [batch, max_new_tokens], the generated ids (a row ends with its
  stop token, then pad ids); logits: float32 [batch, max_new_tokens, vocab], the
  model's raw scores each token was chosen from (only with return_logits)."""
  tokens: jax.Array
  logits: Optional[jax.Array] = None


def top_k_filter(logits_bv: jax.Array, k: int) -> jax.Array:
  """Keeps each row's k highest scores (and ties with the k-th), -inf elsewhere, as
  transformers' TopKLogitsWarper. k <= 0 keeps everything."""
  if k <= 0 or k >= logits_bv.shape[-1]:
    return logits_bv
  kth_b1 = jax.lax.top_k(logits_bv, k)[0][..., -1:]
  return jnp.where(logits_bv < kth_b1, -jnp.inf, logits_bv)


def top_p_filter(logits_bv: jax.Array, p: float) -> jax.Array:
  """Nucleus filtering: keeps the fewest highest-probability tokens whose probability
  sums to at least p (always the most likely one), -inf elsewhere, as transformers'
  TopPLogitsWarper. p >= 1 keeps everything."""
  if p >= 1.0:
    return logits_bv
  sorted_bv = jnp.sort(logits_bv, axis=-1)[..., ::-1]
  probs_bv = jax.nn.softmax(sorted_bv.astype(jnp.float32), axis=-1)
  # A token stays when the tokens ranked above it hold less than p.
  before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
  keep_bv = before_bv < p
  smallest_kept_b1 = jnp.min(jnp.where(keep_bv, sorted_bv, jnp.inf), axis=-1,
                             keepdims=True)
  return jnp.where(logits_bv < smallest_kept_b1, -jnp.inf, logits_bv)


def filter_logits(logits_bv: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
  """Sampling scores: logits / temperature, then top-k, then top-p (transformers'
  order). Returns float32 [batch, vocab] with -inf on removed tokens."""
  if temperature <= 0.0:
    raise ValueError(f"temperature must be positive, got {temperature} (use "
                     "do_sample=False for greedy decoding)")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
  scores_bv = logits_bv.astype(jnp.float32) / temperature
  return top_p_filter(top_k_filter(scores_bv, top_k), top_p)


def generate(module: GPT2, params: Any, prompt_ids: jax.Array,
             prompt_mask: Optional[jax.Array] = None, *, max_new_tokens: int,
             do_sample: bool = False, rng: Optional[jax.Array] = None,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             stop_tokens: Optional[Sequence[int]] = None,
             pad_token_id: Optional[int] = None,
             return_logits: bool = False) -> GenerateOutput:
  """Continues each prompt by up to `max_new_tokens` tokens.

  Greedy (do_sample=False) matches transformers' `generate(do_sample=False,
  num_beams=1)` without the prompt; sampling draws from `filter_logits` with `rng`.

  Args:
    module: a GPT2.
    params: its parameters (boxed or not).
    prompt_ids: int [batch, prompt_length], left-padded.
    prompt_mask: [batch, prompt_length], 0 on padding (default all ones).
    max_new_tokens: tokens to generate (static); prompt_length + max_new_tokens must
      fit the model's n_positions.
    do_sample, rng, temperature, top_k, top_p: sampling settings (see filter_logits).
    stop_tokens: ids that end a row, a sequence or an int array (may be traced;
      default: the config's eos_token_id); the stop token is kept, the rest of the
      row is pad_token_id.
    pad_token_id: default the config's, else its eos_token_id.
    return_logits: also return each step's raw logits.

  Returns:
    A GenerateOutput.
  """
  if not isinstance(module, GPT2):
    raise ValueError(f"generate needs a GPT2 module, got {type(module).__name__}")
  cfg = module.config
  prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
  batch, prompt_length = prompt_ids.shape
  total = prompt_length + max_new_tokens
  if max_new_tokens < 1:
    raise ValueError(f"generate: max_new_tokens must be positive, got {max_new_tokens}")
  if total > cfg.n_positions:
    raise ValueError(f"generate: prompt length {prompt_length} + max_new_tokens "
                     f"{max_new_tokens} exceeds the model's n_positions={cfg.n_positions}")
  if do_sample and rng is None:
    raise ValueError("generate: do_sample=True needs an rng key")
  if prompt_mask is None:
    prompt_mask = jnp.ones_like(prompt_ids)
  prompt_mask = jnp.asarray(prompt_mask, jnp.int32)
  stops = jnp.atleast_1d(jnp.asarray(cfg.eos_token_id if stop_tokens is None
                                     else stop_tokens, jnp.int32))
  pad = pad_token_id if pad_token_id is not None else (
      cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id)

  # The pipeline does not carry caches; the plain stack holds the same parameters.
  cached = GPT2(cfg.replace(pipeline_stages=1, pipeline_microbatches=1), decode=True)
  mask_bt = jnp.concatenate([prompt_mask, jnp.ones((batch, max_new_tokens), jnp.int32)], 1)

  def run(cache, ids_bn, positions_bn):
    out, variables = cached.apply({"params": params, "cache": cache}, ids_bn, mask_bt,
                                  None, positions_bn, mutable=["cache"])
    return out.logits[:, -1], variables["cache"]

  # Empty caches, shaped by a first call that is only traced.
  shapes = jax.eval_shape(lambda: cached.apply(
      {"params": params}, jnp.zeros((batch, total), jnp.int32), mask_bt, None,
      jnp.zeros((batch, total), jnp.int32), mutable=["cache"])[1]["cache"])
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  logits_bv, cache = run(cache, prompt_ids, positions_from_mask(prompt_mask))
  next_position_b = prompt_mask.sum(axis=1)

  def choose(step, logits_bv, rng):
    if not do_sample:
      return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    scores_bv = filter_logits(logits_bv, temperature=temperature, top_k=top_k,
                              top_p=top_p)
    return jax.random.categorical(jax.random.fold_in(rng, step), scores_bv
                                  ).astype(jnp.int32)

  def unfinished(state):
    step, _, done_b, *_ = state
    return jnp.logical_and(step < max_new_tokens, jnp.logical_not(jnp.all(done_b)))

  def step_fn(state):
    step, tokens_bn, done_b, logits_bv, cache, all_logits = state
    next_b = jnp.where(done_b, pad, choose(step, logits_bv, rng))
    tokens_bn = tokens_bn.at[:, step].set(next_b)
    if return_logits:
      all_logits = all_logits.at[:, step].set(logits_bv)
    done_b = jnp.logical_or(done_b, jnp.isin(next_b, stops))
    logits_bv, cache = run(cache, next_b[:, None], (next_position_b + step)[:, None])
    return step + 1, tokens_bn, done_b, logits_bv, cache, all_logits

  all_logits = jnp.zeros((batch, max_new_tokens, cfg.vocab_size) if return_logits
                         else (0,), jnp.float32)
  state = (jnp.int32(0), jnp.full((batch, max_new_tokens), pad, jnp.int32),
           jnp.zeros((batch,), bool), logits_bv, cache, all_logits)
  _, tokens_bn, _, _, _, all_logits = jax.lax.while_loop(unfinished, step_fn, state)
  return GenerateOutput(tokens=tokens_bn, logits=all_logits if return_logits else None)
