"""Optimizer presets through optax: AdamW, SGD and Adafactor with warmup + linear decay.

Every preset clips gradients by global norm first and applies weight decay only where
`decay_mask` says so (not on biases, norm scales and norm biases). Parameters inside a
`TrainState` keep their flax `LogicallyPartitioned` boxes; the mask and the optimizer
states keep that structure, so the trainer can shard optimizer state like parameters.

    tx = make_optimizer('adamw', learning_rate=2e-5, warmup_steps=100, total_steps=1000)
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import optax

PyTree = Any

# Regexes searched in a leaf's '/'-joined path (box wrappers left out): biases
# anywhere, norm scales, and every leaf of a module whose name mentions 'norm'.
DEFAULT_NO_DECAY: tuple[str, ...] = (r"(^|/)bias$", r"(^|/)scale$",
                                     r"(?i)(^|/)[^/]*norm[^/]*/[^/]+$")


def warmup_linear_decay(learning_rate: float, warmup_steps: int,
                        total_steps: int) -> optax.Schedule:
  """Learning rate rising linearly from 0 to `learning_rate` over `warmup_steps`,
  then falling linearly to 0 at `total_steps` (and staying 0 after).

  Returns:
    An optax schedule: step (int scalar) -> learning rate (float32 scalar).
  """
  if total_steps <= 0:
    raise ValueError(f"total_steps must be positive, got {total_steps}")
  if not 0 <= warmup_steps <= total_steps:
    raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], "
                     f"got {warmup_steps}")
  warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
  decay = optax.linear_schedule(learning_rate, 0.0, total_steps - warmup_steps)
  if warmup_steps == 0:
    return decay
  return optax.join_schedules([warmup, decay], [warmup_steps])


def path_name(path: Sequence[Any]) -> str:
  """'/'-joined names of a key path, without the `.value` of logical boxes."""
  names = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      names.append(str(key.key))
    elif isinstance(key, jax.tree_util.SequenceKey):
      names.append(str(key.idx))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      if key.name != "value":
        names.append(key.name)
    else:
      names.append(str(key))
  return "/".join(names)


def decay_mask(params: PyTree, no_decay: Sequence[str] = DEFAULT_NO_DECAY) -> PyTree:
  """Which leaves get weight decay.

  Args:
    params: a parameter pytree, with or without `LogicallyPartitioned` boxes.
    no_decay: regexes; a leaf whose path (see `path_name`) matches any is not decayed.

  Returns:
    A pytree with the structure of `params` (boxes kept) and bool leaves.
  """
  patterns = [re.compile(p) for p in no_decay]
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not any(p.search(path_name(path)) for p in patterns), params)


def unboxed_state(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """Runs `tx` on plain arrays and gives updates back in the boxed structure.

  For transforms whose state leaves do not have their parameter's shape (Adafactor's
  factored moments): a logical box around such a leaf would name the wrong axes.
  Their state is then unboxed (replicated by the trainer).
  """
  def init_fn(params):
    return tx.init(nn.meta.unbox(params))

  def update_fn(updates, state, params=None):
    plain_params = None if params is None else nn.meta.unbox(params)
    new_updates, state = tx.update(nn.meta.unbox(updates), state, plain_params)
    return (jax.tree.unflatten(jax.tree.structure(updates), jax.tree.leaves(new_updates)),
            state)

  return optax.GradientTransformation(init_fn, update_fn)


def adamw(*, learning_rate: float, total_steps: int, warmup_steps: int = 0,
          weight_decay: float = 0.01, b1: float = 0.9, b2: float = 0.999,
          eps: float = 1e-8, max_grad_norm: float | None = 1.0,
          no_decay: Sequence[str] = DEFAULT_NO_DECAY) -> optax.GradientTransformation:
  """AdamW (decoupled decay, scaled by the schedule as in PyTorch) with warmup and
  linear decay; global-norm clipping at `max_grad_norm` (None: no clipping)."""
  schedule = warmup_linear_decay(learning_rate, warmup_steps, total_steps)
  return _with_clipping(
      optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                  mask=lambda p: decay_mask(p, no_decay)), max_grad_norm)


def sgd(*, learning_rate: float, total_steps: int, warmup_steps: int = 0,
        momentum: float | None = 0.9, nesterov: bool = False, weight_decay: float = 0.0,
        max_grad_norm: float | None = 1.0,
        no_decay: Sequence[str] = DEFAULT_NO_DECAY) -> optax.GradientTransformation:
  """SGD with optional momentum and masked (coupled, L2-style) weight decay."""
  schedule = warmup_linear_decay(learning_rate, warmup_steps, total_steps)
  parts = []
  if weight_decay:
    parts.append(optax.add_decayed_weights(weight_decay,
                                           mask=lambda p: decay_mask(p, no_decay)))
  parts.append(optax.sgd(schedule, momentum=momentum or None, nesterov=nesterov))
  return _with_clipping(optax.chain(*parts), max_grad_norm)


def adafactor(*, learning_rate: float, total_steps: int, warmup_steps: int = 0,
              weight_decay: float = 0.0, decay_rate: float = 0.8,
              min_dim_size_to_factor: int = 128, max_grad_norm: float | None = 1.0,
              no_decay: Sequence[str] = DEFAULT_NO_DECAY) -> optax.GradientTransformation:
  """Adafactor (factored second moments, no first moment) with warmup and linear
  decay; decay masked as for AdamW. Its state is kept unboxed (see `unboxed_state`)."""
  schedule = warmup_linear_decay(learning_rate, warmup_steps, total_steps)
  inner = optax.adafactor(schedule, decay_rate=decay_rate,
                          min_dim_size_to_factor=min_dim_size_to_factor,
                          clipping_threshold=None, weight_decay_rate=weight_decay or None,
                          weight_decay_mask=lambda p: decay_mask(p, no_decay))
  return _with_clipping(unboxed_state(inner), max_grad_norm)


def _with_clipping(tx: optax.GradientTransformation,
                   max_grad_norm: float | None) -> optax.GradientTransformation:
  if max_grad_norm is None:
    return tx
  if max_grad_norm <= 0:
    raise ValueError(f"max_grad_norm must be positive or None, got {max_grad_norm}")
  return optax.chain(optax.clip_by_global_norm(max_grad_norm), tx)


def path_labels(params: PyTree, patterns: Sequence[tuple[str, str]],
                default: str) -> PyTree:
  """A label per leaf: that of the first (regex, label) whose regex its path (see
  `path_name`) matches, else `default`. Same structure as `params` (boxes kept)."""
  compiled = [(re.compile(p), label) for p, label in patterns]

  def label(path, _):
    name = path_name(path)
    return next((lab for regex, lab in compiled if regex.search(name)), default)
  return jax.tree_util.tree_map_with_path(label, params)


def _is_box(x) -> bool:
  return isinstance(x, nn.meta.AxisMetadata)


def _drop_empty_boxes(tree: PyTree) -> PyTree:
  """Replaces each logical box that holds no array by its (empty) content."""
  return jax.tree.map(lambda x: x.unbox() if _is_box(x) and not jax.tree.leaves(x) else x,
                      tree, is_leaf=_is_box)


def without_empty_boxes(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx` whose state has no logical box around an empty node.

  optax's `masked` (and so `multi_transform`) puts a MaskedNode where a parameter is
  not its own; over boxed parameters that node sits in the parameter's box, whose axis
  names then describe nothing and which no sharding can follow. The state keeps the
  MaskedNode unboxed; `update` puts the boxes back (the structure `tx.init` gives for
  these parameters) before calling `tx`, so `tx` sees exactly its own state.
  """
  def init_fn(params):
    return _drop_empty_boxes(tx.init(params))

  def update_fn(updates, state, params=None, **extra):
    expected = jax.tree.structure(jax.eval_shape(
        tx.init, updates if params is None else params))
    full = jax.tree.unflatten(expected, jax.tree.leaves(state))
    updates, state = tx.update(updates, full, params, **extra)
    return updates, _drop_empty_boxes(state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def param_groups(transforms: Mapping[str, optax.GradientTransformation],
                 patterns: Sequence[tuple[str, str]],
                 default: str) -> optax.GradientTransformation:
  """Several optimizers over one parameter tree: `optax.multi_transform` with leaves
  grouped by path regexes, e.g. a small learning rate for a pretrained encoder and a
  large one for a new head:

      param_groups({'pretrained': adamw(learning_rate=2e-5, ...),
                    'new': adamw(learning_rate=1e-3, ...)},
                   [(r'^encoder/', 'pretrained')], default='new')

  Each group's state holds optax MaskedNodes where the other groups' parameters are,
  kept out of the parameters' logical boxes (`without_empty_boxes`), so the state
  shards like the parameters.
  """
  unknown = sorted(({label for _, label in patterns} | {default}) - set(transforms))
  if unknown:
    raise ValueError(f"param_groups: labels {unknown} have no transform; the "
                     f"transforms are {sorted(transforms)}")
  return without_empty_boxes(optax.multi_transform(
      dict(transforms), lambda params: path_labels(params, patterns, default)))


OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "adamw": adamw, "sgd": sgd, "adafactor": adafactor}


def make_optimizer(name: str = "adamw", **kwargs) -> optax.GradientTransformation:
  """Builds a named optimizer preset ('adamw', 'sgd', 'adafactor') from its keyword
  arguments (see each preset's signature).

  Returns:
    An optax GradientTransformation whose state mirrors (boxed) parameters.
  """
  if name not in OPTIMIZERS:
    raise ValueError(f"unknown optimizer {name!r}; known optimizers: "
                     f"{', '.join(sorted(OPTIMIZERS))}")
  try:
    return OPTIMIZERS[name](**kwargs)
  except TypeError as e:
    raise ValueError(f"optimizer {name!r}: bad arguments {sorted(kwargs)}: {e}") from e
