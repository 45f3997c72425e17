"""Ahead-of-time memory plans: compile a train step from shapes alone and read its memory.

`plan` traces `TrainStep.init` with `jax.eval_shape` (no parameter memory is allocated),
derives the state's shardings from its logical-axis metadata, lowers and compiles the
jitted `update` exactly as the trainer would (in/out shardings, the state donated) for
ShapeDtypeStructs, and reads XLA's memory analysis of the compiled program. Plans for
meshes bigger than this machine run on fake CPU devices (etjax.sharding.fake_devices);
XLA's CPU compiler then partitions the program as it would for the real mesh, so the
per-device figures are those of each shard (the CPU backend's temporary-buffer
assignment differs somewhat from GPU/TPU, so treat temporaries as an estimate).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh

from etjax.sharding.partitioning import (batch_sharding, state_shardings,
                                        validate_batch_divisibility)
from etjax.sharding.rules import Rules

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """Per-device memory of one compiled train step (bytes unless said otherwise).

  Attributes:
    mesh: axis sizes of the mesh.
    num_devices: devices in the mesh.
    parameter_count: total number of parameters (all shards).
    parameter_bytes: parameters held per device.
    optimizer_bytes: optimizer state held per device.
    other_state_bytes: the rest of the state per device (step, rng, a teacher, ...).
    gradient_bytes: gradients per device, estimated as the parameters' per-device bytes
      (gradients take the parameters' shardings and dtypes); they live in temporaries.
    temporary_bytes: XLA's temporary buffers per device (activations, gradients,
      communication buffers).
    argument_bytes, output_bytes, alias_bytes: XLA's figures for the step's inputs,
      outputs, and outputs that reuse donated inputs.
    peak_bytes: argument + output - alias + temporary: what the step needs at once.
    device_memory_bytes: the budget checked against, or None.
    fits: peak_bytes <= device_memory_bytes, or None without a budget.
    compile_seconds: wall time of lowering plus compiling.
  """
  mesh: Mapping[str, int]
  num_devices: int
  parameter_count: int
  parameter_bytes: int
  optimizer_bytes: int
  other_state_bytes: int
  gradient_bytes: int
  temporary_bytes: int
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  peak_bytes: int
  device_memory_bytes: Optional[int]
  fits: Optional[bool]
  compile_seconds: float

  def to_dict(self) -> dict[str, Any]:
    """The plan as plain JSON-serialisable values."""
    return {k: (dict(v) if isinstance(v, Mapping) else v)
            for k, v in dataclasses.asdict(self).items()}

  def format(self) -> str:
    """A human-readable table of the per-device figures."""
    rows = [("mesh", ",".join(f"{k}={v}" for k, v in self.mesh.items())),
            ("devices", str(self.num_devices)),
            ("parameters", f"{self.parameter_count:,}")]
    for label, value in (("parameter memory", self.parameter_bytes),
                         ("optimizer state", self.optimizer_bytes),
                         ("other state", self.other_state_bytes),
                         ("gradients (est.)", self.gradient_bytes),
                         ("temporaries", self.temporary_bytes),
                         ("peak", self.peak_bytes)):
      rows.append((label + " / device", human_bytes(value)))
    if self.device_memory_bytes is not None:
      rows.append(("device memory", human_bytes(self.device_memory_bytes)))
      rows.append(("fits", "yes" if self.fits else "NO"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def human_bytes(num: int) -> str:
  """'1.50 GiB', '12.0 MiB', '512 B': binary units, three significant figures."""
  for unit, size in (("GiB", GIB), ("MiB", 1024 ** 2), ("KiB", 1024)):
    if num >= size:
      return f"{num / size:.3g} {unit}" if num < 100 * size else f"{num / size:.0f} {unit}"
  return f"{num} B"


def _abstract(x: Any) -> jax.ShapeDtypeStruct:
  """A ShapeDtypeStruct from a ShapeDtypeStruct, a (shape, dtype) pair or an array."""
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  if isinstance(x, tuple) and len(x) == 2:
    return jax.ShapeDtypeStruct(tuple(x[0]), np.dtype(x[1]))
  dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
  return jax.ShapeDtypeStruct(np.shape(x), dtype)


def _per_device_bytes(tree: Any, shardings: Any) -> int:
  """Bytes of one device's shards of every leaf (leaves replicated count fully)."""
  leaves = jax.tree.leaves(nn.meta.unbox(tree))
  sh_leaves = jax.tree.leaves(shardings)
  if len(leaves) != len(sh_leaves):
    raise ValueError(f"{len(leaves)} leaves but {len(sh_leaves)} shardings")
  return sum(math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
             for x, s in zip(leaves, sh_leaves))


def parameter_count(params: Any) -> int:
  """Total number of elements of all (unboxed) leaves of `params`."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(params)))


def plan(train_step: Any, batch_shapes_dtypes: Mapping[str, Any], mesh: Mesh,
         rules: Rules, device_memory_gib: Optional[float] = None) -> MemoryPlan:
  """Compiles `train_step.update` from abstract shapes on `mesh` and reports its memory.

  Args:
    train_step: an etjax TrainStep (init, update); the state must have `params` and
      `opt_state` fields (etjax TrainState or a subclass).
    batch_shapes_dtypes: {name: ShapeDtypeStruct or (shape, dtype)} of a GLOBAL batch.
    mesh: the mesh to plan for (on fake devices for big meshes).
    rules: the logical-axis rules table.
    device_memory_gib: a per-device budget to check the peak against.

  Returns:
    A MemoryPlan.

  Raises:
    ValueError: from the divisibility checks, naming a parameter or batch array that
      the mesh does not divide.
  """
  batch = {k: _abstract(v) for k, v in batch_shapes_dtypes.items()}
  validate_batch_divisibility(batch, mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract_state = jax.eval_shape(train_step.init, jax.random.PRNGKey(0), batch)
    shardings = state_shardings(abstract_state, mesh, rules)
    batch_sh = jax.tree.map(lambda _: batch_sharding(mesh, rules), batch)
    start = time.perf_counter()
    jitted = jax.jit(train_step.update, in_shardings=(shardings, batch_sh),
                     out_shardings=(shardings, None), donate_argnums=(0,))
    compiled = jitted.lower(abstract_state, batch).compile()
    compile_seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  if memory is None:
    raise RuntimeError("this backend gives no memory analysis for compiled programs")

  param_sh = state_shardings(abstract_state.params, mesh, rules)
  opt_sh = state_shardings(abstract_state.opt_state, mesh, rules)
  param_bytes = _per_device_bytes(abstract_state.params, param_sh)
  opt_bytes = _per_device_bytes(abstract_state.opt_state, opt_sh)
  state_bytes = _per_device_bytes(abstract_state, shardings)
  temp = int(memory.temp_size_in_bytes)
  args = int(memory.argument_size_in_bytes)
  out = int(memory.output_size_in_bytes)
  alias = int(memory.alias_size_in_bytes)
  peak = args + out - alias + temp
  budget = None if device_memory_gib is None else int(device_memory_gib * GIB)
  return MemoryPlan(
      mesh=dict(mesh.shape), num_devices=int(mesh.devices.size),
      parameter_count=parameter_count(abstract_state.params),
      parameter_bytes=param_bytes, optimizer_bytes=opt_bytes,
      other_state_bytes=state_bytes - param_bytes - opt_bytes,
      gradient_bytes=param_bytes, temporary_bytes=temp, argument_bytes=args,
      output_bytes=out, alias_bytes=alias, peak_bytes=peak,
      device_memory_bytes=budget, fits=None if budget is None else peak <= budget,
      compile_seconds=round(compile_seconds, 3))
