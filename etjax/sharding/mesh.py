"""Device meshes with etjax's axis names.

Axes, outermost first: `dcn_data` (only when a mesh spans several hosts or slices),
`data`, `fsdp`, `stage`, `model`. Unused axes have size 1, so every rules preset can
name every axis on every mesh.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "stage", "model")


def parse_mesh_spec(spec: str) -> dict[str, int]:
  """Parses 'data=2,fsdp=4,model=8' into {'data': 2, 'fsdp': 4, 'model': 8}."""
  sizes = {}
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, sep, value = part.partition("=")
    if not sep or not value.strip().isdigit():
      raise ValueError(f"mesh spec {spec!r}: expected NAME=SIZE, got {part!r}")
    name = name.strip()
    if name not in MESH_AXES + ("dcn_data",):
      raise ValueError(f"mesh spec {spec!r}: unknown axis {name!r}; "
                       f"known axes: {', '.join(('dcn_data',) + MESH_AXES)}")
    sizes[name] = int(value)
  return sizes


def make_mesh(axis_sizes: Optional[Mapping[str, int]] = None, *,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """Builds a mesh over `devices` (default: all) with axes dcn_data?/data/fsdp/stage/model.

  Args:
    axis_sizes: sizes by axis name; missing axes are 1. With no sizes at all, every
      device goes on `data`. One axis may be -1 to take the remaining devices.
    devices: the devices to use; default `jax.devices()`.

  Returns:
    A `jax.sharding.Mesh` with Auto axis types (Linen's logical constraints need Auto).
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = dict(axis_sizes or {"data": -1})
  names = (("dcn_data",) if "dcn_data" in sizes else ()) + MESH_AXES
  unknown = set(sizes) - set(names)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; known: {names}")
  free = [n for n in names if sizes.get(n) == -1]
  if len(free) > 1:
    raise ValueError(f"only one mesh axis may be -1, got {free}")
  known = int(np.prod([sizes.get(n, 1) for n in names if n not in free]))
  if free:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not divide into axes {sizes}")
    sizes[free[0]] = len(devices) // known
  shape = tuple(sizes.get(n, 1) for n in names)
  total = int(np.prod(shape))
  if total != len(devices):
    raise ValueError(f"mesh {dict(zip(names, shape))} needs {total} devices, "
                     f"but {len(devices)} are available")
  device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, names, axis_types=(AxisType.Auto,) * len(names))
