"""From logical-axis metadata to concrete shardings on a mesh."""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from etjax.sharding.rules import Rules


def _drop_missing_axes(spec: PartitionSpec, mesh: Mesh) -> PartitionSpec:
  """Removes mesh axes the mesh lacks (e.g. dcn_data on a one-host mesh)."""
  def keep(entry):
    if entry is None:
      return None
    axes = tuple(a for a in (entry if isinstance(entry, tuple) else (entry,))
                 if a in mesh.axis_names)
    return axes if len(axes) > 1 else (axes[0] if axes else None)
  return PartitionSpec(*(keep(e) for e in spec))


def logical_to_mesh_sharding(logical_specs: Any, mesh: Mesh, rules: Rules) -> Any:
  """Maps a pytree of logical PartitionSpecs to NamedShardings on `mesh`."""
  mesh_specs = nn.logical_to_mesh(logical_specs, rules)
  return jax.tree.map(
      lambda s: NamedSharding(mesh, _drop_missing_axes(s, mesh)), mesh_specs,
      is_leaf=lambda x: isinstance(x, PartitionSpec))


def state_shardings(abstract_state: Any, mesh: Mesh, rules: Rules) -> Any:
  """Shardings for every leaf of a (boxed) state, from its logical metadata.

  Leaves without metadata (step counters, rng keys, scalars) are replicated. Every
  boxed dimension is first checked against the mesh (`validate_divisibility`), so a
  parameter that a mesh axis does not divide fails here, before anything compiles.

  Returns:
    A pytree of `NamedSharding` with the structure of the unboxed state.
  """
  validate_divisibility(abstract_state, mesh, rules)
  logical_specs = nn.get_partition_spec(abstract_state)
  return logical_to_mesh_sharding(logical_specs, mesh, rules)


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """The sharding of every batch array: leading axis by the 'batch' rule."""
  return logical_to_mesh_sharding(PartitionSpec("batch"), mesh, rules)


def path_str(path: Sequence[Any]) -> str:
  """'params/encoder/layers/mlp/wi/kernel' from a jax key path."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def _axes_of(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, tuple) else (entry,)


def validate_divisibility(abstract_state: Any, mesh: Mesh, rules: Rules) -> None:
  """Checks that every boxed dimension is divisible by the mesh axes it maps to.

  Args:
    abstract_state: a pytree whose partitioned leaves are `nn.Partitioned` /
      `nn.LogicallyPartitioned` boxes around arrays or ShapeDtypeStructs (as from
      `jax.eval_shape(step.init, ...)`).
    mesh: the device mesh.
    rules: the logical-axis rules table.

  Raises:
    ValueError: naming the parameter path, its shape, the dimension, its logical axis
      and the mesh axes (with sizes) that do not divide it. All offending parameters
      are listed, one per line.
  """
  boxes, _ = jax.tree_util.tree_flatten_with_path(
      abstract_state, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
  problems = []
  for path, box in boxes:
    if not isinstance(box, nn.Partitioned):
      continue
    if not jax.tree.leaves(box):
      # optax.masked / multi_transform over boxed parameters leave a MaskedNode (no
      # array) in the box of each parameter a transform does not own.
      problems.append(f"{path_str(path)}: a logical box {tuple(box.names)} holds no "
                      f"array ({type(box.value).__name__}); for several optimizers "
                      "over boxed parameters use etjax.algorithms.optim.param_groups "
                      "(or wrap the transform in optim.without_empty_boxes)")
      continue
    shape = tuple(jax.numpy.shape(box.value))
    names = tuple(box.names)
    if len(names) != len(shape):
      problems.append(f"{path_str(path)}: shape {shape} has {len(shape)} dimensions "
                      f"but {len(names)} logical axis names {names}")
      continue
    mesh_spec = _drop_missing_axes(nn.logical_to_mesh_axes(names, rules), mesh)
    for dim, (size, logical, entry) in enumerate(zip(shape, names, mesh_spec)):
      axes = _axes_of(entry)
      shards = math.prod(mesh.shape[a] for a in axes)
      if shards > 1 and size % shards:
        axes_desc = " x ".join(f"{a!r} (size {mesh.shape[a]})" for a in axes)
        problems.append(
            f"{path_str(path)}: shape {shape}, dimension {dim} of size {size} "
            f"(logical axis {logical!r}) is not divisible by mesh axis {axes_desc}")
  if problems:
    raise ValueError("parameters do not divide over the mesh "
                     f"{dict(mesh.shape)}:\n  " + "\n  ".join(problems))


def validate_batch_divisibility(batch: Any, mesh: Mesh, rules: Rules) -> None:
  """Checks that every batch array's leading dimension divides over the batch axes.

  Args:
    batch: a dict (or pytree) of arrays or ShapeDtypeStructs with a leading batch axis.

  Raises:
    ValueError: naming the batch key, its shape and the mesh axes of 'batch'.
  """
  spec = batch_sharding(mesh, rules).spec
  axes = _axes_of(spec[0]) if len(spec) else ()
  shards = math.prod(mesh.shape[a] for a in axes)
  problems = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]:
    shape = tuple(jax.numpy.shape(leaf))
    if not shape or shape[0] % shards:
      problems.append(f"batch[{path_str(path)!r}] of shape {shape}")
  if problems:
    axes_desc = " x ".join(f"{a!r} (size {mesh.shape[a]})" for a in axes)
    raise ValueError(f"the batch's leading dimension must be divisible by {shards}, the "
                     f"mesh axes {axes_desc} that 'batch' maps to: "
                     + ", ".join(problems))
