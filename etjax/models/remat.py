"""Rematerialization (activation checkpointing) policies by name.

A policy decides which intermediates of a layer are saved for the backward pass; the
rest are recomputed. 'none' means no rematerialization at all (everything the backward
pass needs stays in memory); 'full' (= 'save_nothing') keeps only the layer's inputs;
'dots' keeps matrix-multiply results; 'dots_with_no_batch_dims' keeps only the
weight-stationary ones (the projections, not attention scores); 'everything' saves all
intermediates (checkpointing with no savings, useful to measure its overhead).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax

_CP = jax.checkpoint_policies

# Dense layers compute their products inside a custom_vjp (etjax.models.projection),
# which hides the dot_general from jax's dots policies; those products carry the
# checkpoint name PROJECTION_NAME instead, and both 'dots' policies keep them.
PROJECTION_NAME = "projection"
_PROJECTIONS = _CP.save_only_these_names(PROJECTION_NAME)

REMAT_POLICIES: dict[str, Optional[Callable]] = {
    "none": None,
    "full": _CP.nothing_saveable,
    "save_nothing": _CP.nothing_saveable,
    "dots": _CP.save_from_both_policies(_CP.dots_saveable, _PROJECTIONS),
    "dots_with_no_batch_dims": _CP.save_from_both_policies(
        _CP.dots_with_no_batch_dims_saveable, _PROJECTIONS),
    "everything": _CP.everything_saveable,
}


def remat_policy(name: str) -> Optional[Callable]:
  """Returns the jax.checkpoint policy named `name` (None for 'none': no remat).

  Raises:
    ValueError: for an unknown name, listing the known ones.
  """
  if name not in REMAT_POLICIES:
    raise ValueError(f"unknown remat policy {name!r}; known policies: "
                     f"{', '.join(REMAT_POLICIES)}")
  return REMAT_POLICIES[name]


def remat_module(module_cls: type[nn.Module], name: str, *,
                 static_argnums: Sequence[int] = (4,)) -> type[nn.Module]:
  """`module_cls` wrapped in nn.remat with the named policy; unchanged for 'none'.

  The default static_argnums=(4,) (counting self as 0) keeps `deterministic` of the
  layer interface `layer(x_bld, side_b, shared, deterministic)` a Python bool.
  """
  policy = remat_policy(name)
  if name == "none":
    return module_cls
  # Inside nn.scan the loop boundary already stops XLA from merging the recomputation
  # into the forward pass, so CSE prevention is not needed.
  return nn.remat(module_cls, policy=policy, prevent_cse=False,
                  static_argnums=tuple(static_argnums))


def remat_function(fn: Callable, name: str, *,
                   static_argnums: Sequence[int] = ()) -> Callable:
  """`fn` wrapped in jax.checkpoint with the named policy; unchanged for 'none'."""
  policy = remat_policy(name)
  if name == "none":
    return fn
  return jax.checkpoint(fn, policy=policy, prevent_cse=False,
                        static_argnums=tuple(static_argnums))
