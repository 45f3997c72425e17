"""From logical-axis metadata to concrete shardings on a mesh."""

from __future__ import annotations

from typing import Any

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

  Leaves without metadata (step counters, rng keys, scalars) are replicated.
  """
  logical_specs = nn.get_partition_spec(abstract_state)
  return logical_to_mesh_sharding(logical_specs, mesh, rules)


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """The sharding of every batch array: leading axis by the 'batch' rule."""
  return logical_to_mesh_sharding(PartitionSpec("batch"), mesh, rules)
