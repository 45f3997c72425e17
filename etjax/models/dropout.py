"""The Linen dropout layer; its masks come from etjax.pallas.dropout (Threefry-4x32, see
there why), which the RSA kernels' XLA path shares.
"""

from __future__ import annotations

import flax.linen as nn
import jax

# keep_mask is re-exported: the layer and its masks are one public surface.
from etjax.pallas.dropout import dropout, keep_mask  # noqa: F401


class Dropout(nn.Module):
  """flax.linen.Dropout's interface, drawing its mask through `keep_mask`."""
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    return dropout(x, self.rate, self.make_rng("dropout"))
