"""Device meshes with etjax's axis names.

Axes, outermost first: `dcn_data`, `data`, `fsdp`, `stage`, `model`. Every mesh has all
five (unused ones have size 1), so every rules preset can name every axis on every mesh
and Linen's logical constraints never meet an axis the mesh lacks.

`dcn_data` is the axis across the slow network between hosts or slices (DCN). With
`dcn_data` > 1 the devices are grouped into granules (TPU slices, or processes where
devices carry no slice index), each granule holds one contiguous [1, data, fsdp, stage,
model] block laid out for its fast interconnect (ICI/NVLink), and the blocks are stacked
along `dcn_data` (`jax.experimental.mesh_utils.create_hybrid_device_mesh`). Collectives
over `data`, `fsdp`, `stage` or `model` then stay inside a granule, and a gradient mean
over ('dcn_data', 'data', ...) can be done hierarchically, reducing inside each granule
before anything crosses the slow network: Whale's hierarchical all-reduce
(etjax.sharding.grad_comm with hierarchical=True does it explicitly; TPU multi-slice
and NCCL also decompose such all-reduces this way).

Within one process whose devices have no slice index (CPU tests, one GPU host) there
are no granules to find; the devices are then split in order into `dcn_data` equal
groups that stand in for them, so meshes and shardings can be tested on fake devices.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "stage", "model")
ALL_AXES = ("dcn_data",) + MESH_AXES


def parse_mesh_spec(spec: str) -> dict[str, int]:
  """Parses 'data=2,fsdp=4,model=8' into {'data': 2, 'fsdp': 4, 'model': 8}."""
  sizes = {}
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, sep, value = part.partition("=")
    value = value.strip()
    if not sep or not (value.isdigit() or value == "-1"):
      raise ValueError(f"mesh spec {spec!r}: expected NAME=SIZE, got {part!r}")
    name = name.strip()
    if name not in ALL_AXES:
      raise ValueError(f"mesh spec {spec!r}: unknown axis {name!r}; "
                       f"known axes: {', '.join(ALL_AXES)}")
    sizes[name] = int(value)
  return sizes


def resolve_axis_sizes(axis_sizes: Optional[Mapping[str, int]],
                       num_devices: int) -> dict[str, int]:
  """Fills in missing axes (size 1) and the one -1 axis; checks the device count.

  Returns:
    {axis: size} for all of ALL_AXES, whose product is `num_devices`.

  Raises:
    ValueError: on an unknown axis, a size below 1 other than -1, two -1 axes, or a
      mesh that does not use exactly `num_devices` devices.
  """
  sizes = dict(axis_sizes or {"data": -1})
  unknown = sorted(set(sizes) - set(ALL_AXES))
  if unknown:
    raise ValueError(f"unknown mesh axes {unknown}; known: {ALL_AXES}")
  bad = {n: s for n, s in sizes.items() if s == 0 or s < -1}
  if bad:
    raise ValueError(f"mesh axis sizes must be positive or -1, got {bad}")
  free = [n for n in ALL_AXES if sizes.get(n) == -1]
  if len(free) > 1:
    raise ValueError(f"only one mesh axis may be -1, got {free}")
  known = math.prod(sizes.get(n, 1) for n in ALL_AXES if n not in free)
  if free:
    if num_devices % known:
      raise ValueError(f"{num_devices} devices do not divide into axes {sizes}: the "
                       f"fixed axes need a multiple of {known}")
    sizes[free[0]] = num_devices // known
  full = {n: sizes.get(n, 1) for n in ALL_AXES}
  if math.prod(full.values()) != num_devices:
    raise ValueError(f"mesh {full} needs {math.prod(full.values())} devices, "
                     f"but {num_devices} are available")
  return full


def _granules(devices: Sequence[jax.Device], count: int) -> list[list[jax.Device]]:
  """Devices grouped by slice, else by process, else (one process) in order."""
  for attr, what in (("slice_index", "slices"), ("process_index", "processes")):
    keys = sorted({getattr(d, attr, None) for d in devices} - {None})
    if len(keys) > 1:
      groups = [[d for d in devices if getattr(d, attr) == k] for k in keys]
      if len(groups) != count:
        raise ValueError(f"dcn_data={count} but the devices span {len(groups)} "
                         f"{what}; dcn_data must equal that number")
      return groups
  per = len(devices) // count
  return [list(devices[i * per:(i + 1) * per]) for i in range(count)]


def make_mesh(axis_sizes: Optional[Mapping[str, int]] = None, *,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """Builds a mesh over `devices` (default: all) with axes dcn_data/data/fsdp/stage/model.

  Args:
    axis_sizes: sizes by axis name; missing axes are 1. With no sizes at all, every
      device goes on `data`. One axis may be -1 to take the remaining devices.
    devices: the devices to use; default `jax.devices()` (all processes' devices).

  Returns:
    A `jax.sharding.Mesh` of shape [dcn_data, data, fsdp, stage, model] with Auto axis
    types (Linen's logical constraints need Auto). Within each dcn_data granule the
    device order comes from `mesh_utils.create_device_mesh` (topology-aware on TPU).

  Raises:
    ValueError: see `resolve_axis_sizes`; also when dcn_data > 1 does not match the
      number of slices or processes the devices span.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = resolve_axis_sizes(axis_sizes, len(devices))
  ici_shape = tuple(sizes[n] for n in MESH_AXES)
  dcn = sizes["dcn_data"]
  if dcn == 1:
    device_array = mesh_utils.create_device_mesh(
        ici_shape, devices, allow_split_physical_axes=True)
  else:
    blocks = [mesh_utils.create_device_mesh(ici_shape, group,
                                            allow_split_physical_axes=True)
              for group in _granules(devices, dcn)]
    device_array = np.stack(blocks)
  device_array = device_array.reshape((dcn,) + ici_shape)
  return Mesh(device_array, ALL_AXES, axis_types=(AxisType.Auto,) * len(ALL_AXES))
