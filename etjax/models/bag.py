"""A bag-of-embeddings encoder with the Encoder calling convention.

It returns an `EncoderOutput` whose `pooled_output` feeds heads, and reads sentence
pairs through token_type_ids: the two segments are averaged separately and combined as
[a, b, a * b, |a - b|] (the usual sentence-pair features), so one module serves single
sentences (b = 0) and pairs. It lets the TL algorithms be tested and benchmarked in
seconds on two CPU cores; any etjax.models Encoder can replace it.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from etjax.models import layers
from etjax.models.bert import EncoderOutput

Dtype = Any


def _masked_mean(x_bld: jax.Array, mask_bl: jax.Array) -> jax.Array:
  """Mean over the rows of `x_bld` where `mask_bl` is 1: [B, D] (0 where none)."""
  m_bl1 = mask_bl[..., None].astype(x_bld.dtype)
  return (x_bld * m_bl1).sum(1) / jnp.maximum(m_bl1.sum(1), 1.0)


class BagOfEmbeddings(nn.Module):
  """Mean word embeddings per segment, then a tanh projection: [B, L] ids -> [B, H].

  Attributes:
    vocab_size: rows of the embedding table.
    hidden_size: H, the embedding and output width.
    dropout_rate: dropout on the pooled output.
    initializer_range: stddev of the normal initializers.
  """
  vocab_size: int
  hidden_size: int = 64
  dropout_rate: float = 0.0
  initializer_range: float = 0.1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None,
               token_type_ids: Optional[jax.Array] = None, *, deterministic: bool = True,
               output_hidden_states: bool = False,
               output_attentions: bool = False) -> EncoderOutput:
    """Returns EncoderOutput(last_hidden_state [B, L, H] embeddings, pooled_output
    [B, H])."""
    if output_hidden_states or output_attentions:
      raise ValueError("BagOfEmbeddings has no layers: output_hidden_states and "
                       "output_attentions must be False")
    ids_bl = layers.constrain(jnp.asarray(input_ids, jnp.int32), ("batch", "length"))
    mask_bl = (jnp.ones_like(ids_bl) if attention_mask is None
               else jnp.asarray(attention_mask, jnp.int32))
    types_bl = (jnp.zeros_like(ids_bl) if token_type_ids is None
                else jnp.asarray(token_type_ids, jnp.int32))
    x_bld = layers.Embed(self.vocab_size, self.hidden_size,
                         init_stddev=self.initializer_range, dtype=self.dtype,
                         name="embed")(ids_bl)
    a_bd = _masked_mean(x_bld, mask_bl * (types_bl == 0))
    b_bd = _masked_mean(x_bld, mask_bl * (types_bl == 1))
    pair_bf = jnp.concatenate([a_bd, b_bd, a_bd * b_bd, jnp.abs(a_bd - b_bd)], -1)
    pooled_bd = jnp.tanh(layers.Dense((self.hidden_size,), ("mlp",), ("embed",),
                                      init_stddev=self.initializer_range,
                                      dtype=self.dtype, name="pool")(pair_bf))
    pooled_bd = layers.constrain(pooled_bd, ("batch", "embed"))
    pooled_bd = layers.Dropout(self.dropout_rate)(pooled_bd, deterministic=deterministic)
    return EncoderOutput(last_hidden_state=x_bld, pooled_output=pooled_bd)
