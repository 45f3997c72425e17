"""Masked-language-model training (BERT's objective) as a TrainStep.

Masking happens inside the step, from the step's key, so the same encoded texts give
fresh masks every step and a resumed run draws the masks an uninterrupted run would.
BERT's rule: each maskable token is selected with probability mask_prob (with
whole-word masking, each word, all its pieces together); a selected token becomes
[MASK] with probability 0.8, a uniformly random token with 0.1, and stays itself with
0.1; the loss is the cross-entropy of the original tokens at the selected positions.

Batch keys: input_ids, attention_mask, token_type_ids [B, L]; with whole-word masking
also word_start [B, L] (int32: the position of the first piece of each token's word,
see `word_starts`).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from etjax.algorithms.finetune import LossFn, init_params, model_inputs, step_from_loss
from etjax.algorithms.seq2seq import token_cross_entropy
from etjax.algorithms.step import TrainStep

IGNORE = -100  # target of a position that does not count (transformers' convention)


def mask_tokens(rng: jax.Array, input_ids: jax.Array, maskable: jax.Array, *,
                vocab_size: int, mask_id: int, mask_prob: float = 0.15,
                word_start: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
  """BERT's 80/10/10 masking.

  Args:
    rng: a PRNG key.
    input_ids: int [B, L].
    maskable: bool [B, L], False on special tokens and padding.
    vocab_size, mask_id: random replacements are drawn from [0, vocab_size).
    mask_prob: the probability that a token (or word) is selected.
    word_start: int [B, L], each token's word's first position: selection is then
      per word (a word is selected when its first piece is).

  Returns:
    (inputs int32 [B, L] with the replacements, targets int32 [B, L]: the original id
    at selected positions, IGNORE elsewhere).
  """
  if not 0.0 < mask_prob < 1.0:
    raise ValueError(f"mask_prob must lie in (0, 1), got {mask_prob}")
  input_ids = jnp.asarray(input_ids, jnp.int32)
  select_rng, how_rng, token_rng = jax.random.split(rng, 3)
  u_bl = jax.random.uniform(select_rng, input_ids.shape)
  if word_start is not None:
    u_bl = jnp.take_along_axis(u_bl, jnp.asarray(word_start, jnp.int32), axis=1)
  selected_bl = jnp.logical_and(u_bl < mask_prob, maskable)
  how_bl = jax.random.uniform(how_rng, input_ids.shape)
  random_bl = jax.random.randint(token_rng, input_ids.shape, 0, vocab_size, jnp.int32)
  replaced_bl = jnp.where(how_bl < 0.8, mask_id,
                          jnp.where(how_bl < 0.9, random_bl, input_ids))
  inputs_bl = jnp.where(selected_bl, replaced_bl, input_ids)
  targets_bl = jnp.where(selected_bl, input_ids, IGNORE)
  return inputs_bl, targets_bl


def word_starts(input_ids: np.ndarray, tokenizer: Any) -> np.ndarray:
  """int32 [B, L]: for each token, the position of its word's first piece, from a
  WordPiece tokenizer's '##' continuation marks (etjax.data.tokenizers.Tokenizer).
  A continuation piece at position 0 starts its own word."""
  input_ids = np.asarray(input_ids)
  vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
  continues = np.zeros(max(vocab.values()) + 1, bool)
  for token, index in vocab.items():
    continues[index] = token.startswith("##")
  cont_bl = continues[input_ids]
  cont_bl[:, 0] = False
  positions = np.broadcast_to(np.arange(input_ids.shape[1]), input_ids.shape)
  starts = np.where(cont_bl, 0, positions)
  return np.maximum.accumulate(starts, axis=1).astype(np.int32)


def mlm_loss(model: nn.Module, *, vocab_size: int, mask_id: int,
             special_ids: Sequence[int], mask_prob: float = 0.15,
             whole_word: bool = False) -> LossFn:
  """The LossFn of a masked LM (a module whose output has `.logits` [B, L, V]).

  Tokens in `special_ids` and padding (attention_mask 0) are never selected.
  aux: 'logits' [B, L, V], 'masked_accuracy', 'num_masked' (scalars).
  """
  special = jnp.asarray(tuple(special_ids), jnp.int32)

  def loss_fn(params, batch, rng, deterministic=False):
    mask_rng, dropout_rng = jax.random.split(rng)
    ids, mask, types = model_inputs(batch)
    maskable = jnp.logical_not(jnp.isin(ids, special))
    if mask is not None:
      maskable = jnp.logical_and(maskable, mask != 0)
    if whole_word and "word_start" not in batch:
      raise ValueError("whole-word masking needs 'word_start' in the batch "
                       "(etjax.algorithms.mlm.word_starts)")
    inputs, targets = mask_tokens(mask_rng, ids, maskable, vocab_size=vocab_size,
                                  mask_id=mask_id, mask_prob=mask_prob,
                                  word_start=batch["word_start"] if whole_word else None)
    out = model.apply({"params": params}, inputs, mask, types,
                      deterministic=deterministic, rngs={"dropout": dropout_rng})
    loss = token_cross_entropy(out.logits, targets)
    counted = targets != IGNORE
    correct = jnp.logical_and(out.logits.argmax(-1) == targets, counted)
    num_masked = counted.sum()
    return loss, {"logits": out.logits, "num_masked": num_masked,
                  "masked_accuracy": correct.sum() / jnp.maximum(num_masked, 1)}
  return loss_fn


def mlm(model: nn.Module, tx: optax.GradientTransformation, *, vocab_size: int,
        mask_id: int, special_ids: Sequence[int], mask_prob: float = 0.15,
        whole_word: bool = False,
        pretrained: Optional[Mapping[str, Any]] = None) -> TrainStep:
  """A TrainStep that trains a masked LM (e.g. etjax.models.mlm.MaskedLM).

  Args:
    model: the masked LM.
    tx: the optimizer.
    vocab_size, mask_id, special_ids, mask_prob, whole_word: see mlm_loss.
    pretrained: plain arrays for a sub-tree of the params, e.g. {'encoder': params};
      the rest (a head the checkpoint lacks) is freshly initialised.
  """
  return step_from_loss(
      mlm_loss(model, vocab_size=vocab_size, mask_id=mask_id, special_ids=special_ids,
               mask_prob=mask_prob, whole_word=whole_word),
      lambda rng, batch: init_params(model, rng, batch, pretrained), tx)
