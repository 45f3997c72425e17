"""Small Linen modules the feature- and instance-based TL algorithms share.

- `DomainDiscriminator`: an MLP from features to domain logits, placed behind a
  gradient-reversal layer by SharedPrivate-Adv, DRSS-Adv and MGTL.
(The bag-of-embeddings encoder they are benchmarked with is etjax.models.bag.)
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from etjax.models import layers


class DomainDiscriminator(nn.Module):
  """features [B, D] -> domain logits [B, num_domains] through one tanh layer.

  The caller applies gradient reversal to the features first (see
  etjax.algorithms.reversal), so one minimization trains this module to tell
  domains apart and the encoder to make them indistinguishable.
  """
  num_domains: int
  hidden: int = 64
  initializer_range: float = 0.1

  @nn.compact
  def __call__(self, features_bd: jax.Array) -> jax.Array:
    if self.num_domains < 2:
      raise ValueError(f"DomainDiscriminator needs num_domains >= 2, got "
                       f"{self.num_domains}")
    x_bd = jnp.asarray(features_bd, jnp.float32)
    if self.hidden:
      x_bd = jnp.tanh(layers.Dense((self.hidden,), ("embed",), ("mlp",),
                                   init_stddev=self.initializer_range,
                                   name="hidden")(x_bd))
    return layers.Dense((self.num_domains,), ("mlp" if self.hidden else "embed",),
                        ("classes",), init_stddev=self.initializer_range,
                        name="out")(x_bd)
