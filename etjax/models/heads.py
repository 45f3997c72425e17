"""Task heads on top of an encoder."""

from __future__ import annotations

from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from etjax.models import layers


@flax.struct.dataclass
class ClassifierOutput:
  """logits [batch, classes]; features [batch, hidden] fed to the classifier; encoder
  output of the backbone (hidden states and attentions when requested)."""
  logits: jax.Array
  features: jax.Array
  encoder: Any


class SequenceClassifier(nn.Module):
  """Sentence (or sentence-pair) classification: dropout(pooled) -> dense -> logits.

  The backbone is any module returning an output with `.pooled_output`
  (e.g. etjax.models.bert.Encoder); its parameters live under 'encoder'.
  """
  encoder: nn.Module
  num_labels: int
  dropout_rate: float = 0.1
  initializer_range: float = 0.02

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None,
               token_type_ids: Optional[jax.Array] = None, *, deterministic: bool = True,
               output_hidden_states: bool = False,
               output_attentions: bool = False) -> ClassifierOutput:
    if self.num_labels < 1:
      raise ValueError(f"num_labels must be positive, got {self.num_labels}")
    enc = self.encoder(input_ids, attention_mask, token_type_ids,
                       deterministic=deterministic,
                       output_hidden_states=output_hidden_states,
                       output_attentions=output_attentions)
    features_bd = enc.pooled_output
    x_bd = layers.Dropout(self.dropout_rate)(features_bd, deterministic=deterministic)
    logits_bc = layers.Dense((self.num_labels,), ("embed",), ("classes",),
                             init_stddev=self.initializer_range, name="classifier",
                             dtype=jnp.float32)(x_bd)
    return ClassifierOutput(logits=logits_bc.astype(jnp.float32), features=features_bd,
                            encoder=enc)
