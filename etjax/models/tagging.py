"""Sequence labeling and span extraction heads over an encoder's token states.

TokenTagger scores one tag per WORD: the encoder's state at each word's first
sub-token (`word_index`) is gathered, optionally run through a BiLSTM, and projected
to tag emissions; with `use_crf` the output also carries the CRF's (constrained)
start/transition/end scores for etjax.models.crf. SpanExtractor gives start and end
logits per token for reading comprehension.
"""

from __future__ import annotations

from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from etjax.models import layers
from etjax.models.crf import CRF


@flax.struct.dataclass
class TaggerOutput:
  """emissions [batch, words, tags]; crf_scores (start [T], transitions [T, T],
  end [T]) or None without a CRF."""
  emissions: jax.Array
  crf_scores: Optional[tuple] = None


class TokenTagger(nn.Module):
  """Encoder -> first sub-token of each word -> (BiLSTM) -> dense -> tag emissions.

  Attributes:
    encoder: a module returning `.last_hidden_state` [B, L, H] (parameters under
      'encoder').
    num_tags: T.
    lstm_size: hidden size of each direction of a BiLSTM over the words (0: none).
    use_crf: add CRF parameters (see etjax.models.crf).
    allowed: BIO constraints for the CRF (crf.bio_allowed), or None.
  """
  encoder: nn.Module
  num_tags: int
  dropout_rate: float = 0.1
  lstm_size: int = 0
  use_crf: bool = False
  allowed: Optional[Any] = None
  initializer_range: float = 0.02

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids, word_index, word_mask, *,
               deterministic: bool = True) -> TaggerOutput:
    enc = self.encoder(input_ids, attention_mask, token_type_ids,
                       deterministic=deterministic)
    x_bld = enc.last_hidden_state
    x_bwd = jnp.take_along_axis(x_bld, word_index[..., None].astype(jnp.int32), axis=1)
    if self.lstm_size:
      lengths_b = word_mask.astype(jnp.int32).sum(-1)
      x_bwd = nn.Bidirectional(nn.RNN(nn.OptimizedLSTMCell(self.lstm_size)),
                               nn.RNN(nn.OptimizedLSTMCell(self.lstm_size)),
                               name="bilstm")(x_bwd, seq_lengths=lengths_b)
    x_bwd = layers.Dropout(self.dropout_rate)(x_bwd, deterministic=deterministic)
    emissions_bwt = layers.Dense((self.num_tags,), ("embed",), ("classes",),
                                 init_stddev=self.initializer_range, name="classifier",
                                 dtype=jnp.float32)(x_bwd)
    scores = None
    if self.use_crf:
      scores = CRF(self.num_tags, allowed=self.allowed, name="crf").scores()
    return TaggerOutput(emissions=emissions_bwt.astype(jnp.float32), crf_scores=scores)


@flax.struct.dataclass
class SpanOutput:
  """start_logits, end_logits [batch, length]."""
  start_logits: jax.Array
  end_logits: jax.Array


class SpanExtractor(nn.Module):
  """Encoder -> dense(2) per token -> start and end logits."""
  encoder: nn.Module
  initializer_range: float = 0.02

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids, *,
               deterministic: bool = True) -> SpanOutput:
    enc = self.encoder(input_ids, attention_mask, token_type_ids,
                       deterministic=deterministic)
    logits_bl2 = layers.Dense((2,), ("embed",), (None,), init_stddev=self.initializer_range,
                              name="span", dtype=jnp.float32)(enc.last_hidden_state)
    logits_bl2 = logits_bl2.astype(jnp.float32)
    return SpanOutput(start_logits=logits_bl2[..., 0], end_logits=logits_bl2[..., 1])
