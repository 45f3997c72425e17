"""Data-parallel gradients with the all-reduce done in a chosen dtype.

The paper halves gradient traffic by communicating in half precision. Left to itself,
the SPMD partitioner reduces gradients in their own dtype (float32 for float32
parameters). `data_parallel_grad` instead computes each device's gradient of its own
batch shard inside `jax.shard_map` over the batch mesh axes, casts it to `comm_dtype`
(e.g. bfloat16), sums over the batch axes with `psum`, divides by the number of shards
and casts back, so the all-reduces carry `comm_dtype`. Only the communication is
rounded: the forward and backward passes run in the parameters' dtype.

On the CPU backend XLA has no bfloat16 all-reduce ("AllReduce for datatype 'bf16' is
not supported"), so its float normalisation widens the collective back to float32 after
the rounding: the numbers are those of bf16 communication, the bytes on the (host) wire
are not. GPU and TPU all-reduce bfloat16 natively; `all_reduce_bytes` reads either
the compiled program or, on CPU, the partitioned program before backend passes
(`jitted.lower(...).as_text(dialect="hlo")`), where the collectives are explicit.

Parameters are replicated over the batch axes inside the shard_map (data parallelism;
with fsdp sharding the partitioner's own reduce-scatter is the better tool). Logical
constraints inside the loss are switched off there, since a shard_map body is per
device; the caller's mesh and rules stay in force outside it.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

DEFAULT_BATCH_AXES = ("dcn_data", "data", "fsdp")


def mean_in_dtype(tree: Any, axes: Sequence[str], comm_dtype: Any) -> Any:
  """Mean over mesh `axes` of every leaf, communicated in `comm_dtype` (inside shard_map).

  Returns the tree with its original dtypes.
  """
  axes = tuple(axes)
  if not axes:
    return tree
  count = jax.lax.psum(1, axes)

  def reduce(x):
    total = jax.lax.psum(x.astype(comm_dtype), axes)
    return (total.astype(x.dtype) / count).astype(x.dtype)
  return jax.tree.map(reduce, tree)


def data_parallel_grad(loss_fn: Callable[..., Any], mesh: Mesh, *,
                       comm_dtype: Any = jnp.float32,
                       batch_axes: Optional[Sequence[str]] = None,
                       has_aux: bool = False) -> Callable[..., tuple[Any, Any]]:
  """value_and_grad of `loss_fn` with gradients all-reduced in `comm_dtype`.

  Args:
    loss_fn: (params, batch, rng) -> loss, or (loss, aux) with has_aux; a mean over the
      examples it is given. `params` may hold logical-partitioning boxes.
    mesh: the mesh whose batch axes split the batch.
    comm_dtype: dtype of the gradient all-reduce (jnp.float32 or jnp.bfloat16).
    batch_axes: mesh axes the batch's leading dimension is split over; default those of
      ('dcn_data', 'data', 'fsdp') that the mesh has.
    has_aux: whether loss_fn returns (loss, aux); aux leaves are averaged over shards
      in float32.

  Returns:
    grad_fn(params, batch, rng=None) -> (value, grads), like jax.value_and_grad: value
    is the loss (or (loss, aux)) averaged over the batch shards, grads have the
    structure, boxes and dtypes of params. Call it under jit; every batch leaf's leading
    dimension must divide by the product of the batch axes.
  """
  axes = tuple(a for a in (batch_axes or DEFAULT_BATCH_AXES) if a in mesh.axis_names)
  unknown = set(batch_axes or ()) - set(mesh.axis_names)
  if unknown:
    raise ValueError(f"batch_axes {sorted(unknown)} are not axes of the mesh "
                     f"{mesh.axis_names}")
  value_and_grad = jax.value_and_grad(loss_fn, has_aux=has_aux)

  def per_shard(params, batch, rng):
    if rng is not None:  # different dropout masks on different shards
      rng = jax.random.fold_in(rng, jax.lax.axis_index(axes))
    # Replicated parameters are invariant over the batch axes, and shard_map would
    # psum their gradients in float32 by itself (the transpose of the implicit
    # broadcast); marking them varying keeps each device's gradient its own.
    params = jax.lax.pcast(params, axes, to="varying")
    # Each device differentiates its own shard; no sharding constraints per device.
    with nn.logical_axis_rules(()):
      value, grads = value_and_grad(params, batch, rng)
    value = jax.tree.map(lambda v: v.astype(jnp.float32), value)
    return mean_in_dtype(value, axes, jnp.float32), mean_in_dtype(grads, axes, comm_dtype)

  def grad_fn(params, batch, rng=None):
    values = nn.meta.unbox(params)
    sharded = jax.shard_map(
        per_shard, mesh=mesh, in_specs=(P(), P(axes), P()), out_specs=(P(), P()))
    value, grads = sharded(values, batch, rng)
    boxed = jax.tree.map(lambda box, g: box.replace_boxed(g) if isinstance(
        box, nn.meta.AxisMetadata) else g, params, grads,
                         is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
    return value, boxed

  return grad_fn


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
                "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_ALL_REDUCE = re.compile(r"=\s*(.+?)\s+all-reduce(?:-start)?\(")
_ARRAY = re.compile(r"\b(pred|[a-z]+\d+)\[([\d,]*)\]")


def all_reduce_bytes(hlo_text: str, *, include_scalars: bool = False) -> dict[str, int]:
  """Bytes moved by the all-reduces of an HLO module, by element dtype.

  Args:
    hlo_text: HLO text, e.g. `jitted.lower(...).compile().as_text()` or
      `jitted.lower(...).as_text(dialect="hlo")`. Combined (tuple) all-reduces count
      every element; async all-reduce-start counts once (its -done is not counted).
    include_scalars: count rank-0 all-reduces (losses, metrics) too.

  Returns:
    {dtype: bytes}, e.g. {'bf16': 1184}; one device's operand bytes per step.
  """
  totals: dict[str, int] = {}
  for line in hlo_text.splitlines():
    match = _ALL_REDUCE.search(line)
    if not match:
      continue
    for dtype, dims in _ARRAY.findall(match.group(1)):
      if not dims and not include_scalars:
        continue
      count = 1
      for d in filter(None, dims.split(",")):
        count *= int(d)
      totals[dtype] = totals.get(dtype, 0) + count * _DTYPE_BYTES[dtype]
  return totals
