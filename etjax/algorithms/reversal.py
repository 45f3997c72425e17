"""Gradient reversal (Ganin & Lempitsky 2015) for adversarial domain discriminators.

    forward:  R(x) = x
    backward: dL/dx = -lambda * dL/dR

Placed between a shared encoder and a domain discriminator, it lets one minimization
train the discriminator to tell domains apart while pushing the encoder to make them
indistinguishable.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


@jax.custom_vjp
def _reverse(x: PyTree, scale: jax.Array) -> PyTree:
  return x


def _reverse_fwd(x, scale):
  return x, scale


def _reverse_bwd(scale, g):
  # Keep each cotangent's dtype: a bf16 activation gets a bf16 gradient.
  flipped = jax.tree.map(lambda gi: (-scale * gi).astype(gi.dtype), g)
  return flipped, jnp.zeros_like(scale)


_reverse.defvjp(_reverse_fwd, _reverse_bwd)


def gradient_reversal(x: PyTree, scale: Any = 1.0) -> PyTree:
  """Identity forward; multiplies the incoming gradient by -scale backward.

  Args:
    x: an array or pytree of arrays.
    scale: lambda >= 0, a float or a traced scalar (e.g. from `grl_schedule`). It
      receives no gradient.

  Returns:
    x, unchanged, with the same structure, shapes and dtypes.
  """
  return _reverse(x, jnp.asarray(scale, jnp.float32))


def grl_schedule(progress: Any, gamma: float = 10.0) -> jax.Array:
  """Ganin & Lempitsky's ramp for lambda: 2 / (1 + exp(-gamma * p)) - 1.

  Args:
    progress: p in [0, 1], the fraction of training done.
    gamma: steepness.

  Returns:
    [] lambda, rising from 0 at p = 0 towards 1.
  """
  p = jnp.asarray(progress, jnp.float32)
  return 2.0 / (1.0 + jnp.exp(-gamma * p)) - 1.0
