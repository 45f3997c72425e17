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

With `hierarchical=True` the mean over ('dcn_data', 'data', ...) is Whale's
hierarchical all-reduce: a reduce-scatter inside each dcn_data granule (fast network),
an all-reduce of each device's 1/n slice across granules (slow network), and an
all-gather inside the granule; the slow network carries 1/n of the gradient bytes.

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
from jax._src.lax.parallel import all_gather_invariant  # no public alias in jax 0.10
from jax.sharding import Mesh, PartitionSpec as P

DEFAULT_BATCH_AXES = ("dcn_data", "data", "fsdp")


def mean_in_dtype(tree: Any, axes: Sequence[str], comm_dtype: Any, *,
                  outer_axes: Sequence[str] = ()) -> Any:
  """Mean over mesh `axes` of every leaf, communicated in `comm_dtype` (inside shard_map).

  Args:
    tree: per-device values (inside a shard_map over `axes`).
    axes: the mesh axes to average over.
    comm_dtype: the dtype on the wire.
    outer_axes: those of `axes` that cross the slow network (e.g. ('dcn_data',)). When
      given and both parts are bigger than one device, the mean is hierarchical, as in
      Whale: a reduce-scatter over the inner (fast) axes, an all-reduce of each
      device's 1/n_inner slice over the outer axes, and an all-gather over the inner
      axes, so only 1/n_inner of the bytes cross the slow network.

  Returns:
    The tree of means, with its original dtypes.
  """
  axes = tuple(axes)
  if not axes:
    return tree
  outer = tuple(a for a in axes if a in tuple(outer_axes))
  inner = tuple(a for a in axes if a not in outer)
  count = jax.lax.psum(1, axes)
  hierarchical = bool(outer and inner) and jax.lax.psum(1, inner) > 1 and (
      jax.lax.psum(1, outer) > 1)

  def flat_reduce(x):
    total = jax.lax.psum(x.astype(comm_dtype), axes)
    return (total.astype(x.dtype) / count).astype(x.dtype)

  def hierarchical_reduce(x):
    n_inner = jax.lax.psum(1, inner)
    flat = jnp.ravel(x.astype(comm_dtype))
    flat = jnp.pad(flat, (0, -flat.size % n_inner))
    part = jax.lax.psum_scatter(flat, inner, scatter_dimension=0, tiled=True)
    part = jax.lax.psum(part, outer)
    # The gathered gradient is the same on every device: invariant, as out_specs P()
    # requires (jax.lax.all_gather would type it as varying).
    full = all_gather_invariant(part, inner, axis=0, tiled=True)
    total = jnp.reshape(full[:x.size], x.shape)
    return (total.astype(x.dtype) / count).astype(x.dtype)

  return jax.tree.map(hierarchical_reduce if hierarchical else flat_reduce, tree)


def _batch_axes(mesh: Mesh, batch_axes: Optional[Sequence[str]]) -> tuple[str, ...]:
  unknown = set(batch_axes or ()) - set(mesh.axis_names)
  if unknown:
    raise ValueError(f"batch_axes {sorted(unknown)} are not axes of the mesh "
                     f"{mesh.axis_names}")
  return tuple(a for a in (batch_axes or DEFAULT_BATCH_AXES) if a in mesh.axis_names)


def _at_least_f32(x):
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _rebox(boxed: Any, values: Any) -> Any:
  """`values` (plain arrays) in the logical boxes of `boxed` (same structure)."""
  return jax.tree.map(lambda box, g: box.replace_boxed(g) if isinstance(
      box, nn.meta.AxisMetadata) else g, boxed, values,
                      is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def _sharded_grad(grad_fn, mesh, axes, comm_dtype, hierarchical, get_params, set_params):
  """grad_fn(state, batch, rng) -> (value, grads like get_params(state)), run per
  batch shard in a shard_map; value averaged in (at least) float32, grads in
  comm_dtype. The state is replicated; its params become varying over `axes`."""
  def per_shard(state, batch, rng):
    if rng is not None:  # different dropout masks on different shards
      rng = jax.random.fold_in(rng, jax.lax.axis_index(axes))
    # Replicated parameters are invariant over the batch axes, and shard_map would
    # psum their gradients in float32 by itself (the transpose of the implicit
    # broadcast); marking them varying keeps each device's gradient its own.
    state = set_params(state, jax.lax.pcast(get_params(state), axes, to="varying"))
    # Each device differentiates its own shard; no sharding constraints per device.
    with nn.logical_axis_rules(()):
      value, grads = grad_fn(state, batch, rng)
    value = jax.tree.map(lambda v: mean_in_dtype(_at_least_f32(v), axes,
                                                 _at_least_f32(v).dtype), value)
    outer = ("dcn_data",) if hierarchical else ()
    return value, mean_in_dtype(grads, axes, comm_dtype, outer_axes=outer)

  def sharded_grad(state, batch, rng=None):
    sharded = jax.shard_map(
        per_shard, mesh=mesh, in_specs=(P(), P(axes), P()), out_specs=(P(), P()))
    value, grads = sharded(nn.meta.unbox(state), batch, rng)
    return value, _rebox(get_params(state), grads)

  return sharded_grad


def data_parallel_grad(loss_fn: Callable[..., Any], mesh: Mesh, *,
                       comm_dtype: Any = jnp.float32,
                       batch_axes: Optional[Sequence[str]] = None,
                       has_aux: bool = False,
                       hierarchical: bool = False) -> Callable[..., tuple[Any, Any]]:
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
    hierarchical: reduce gradients inside each `dcn_data` granule first and send only
      a 1/n slice across the slow network (see `mean_in_dtype`).

  Returns:
    grad_fn(params, batch, rng=None) -> (value, grads), like jax.value_and_grad: value
    is the loss (or (loss, aux)) averaged over the batch shards, grads have the
    structure, boxes and dtypes of params. Call it under jit; every batch leaf's leading
    dimension must divide by the product of the batch axes.
  """
  axes = _batch_axes(mesh, batch_axes)
  return _sharded_grad(jax.value_and_grad(loss_fn, has_aux=has_aux), mesh, axes,
                       comm_dtype, hierarchical, lambda params: params,
                       lambda _, params: params)


def data_parallel_state_grad(grad_fn: Callable[..., Any], mesh: Mesh, *,
                             comm_dtype: Any = jnp.float32,
                             batch_axes: Optional[Sequence[str]] = None,
                             hierarchical: bool = False) -> Callable[..., tuple[Any, Any]]:
  """`data_parallel_grad` for a gradient function of a whole training state.

  Args:
    grad_fn: (state, batch, rng) -> (value, grads), grads shaped like `state.params`;
      each device calls it on its own batch shard (with its own rng fold).
    mesh, comm_dtype, batch_axes, hierarchical: as for `data_parallel_grad`.

  Returns:
    fn(state, batch, rng=None) -> (value averaged over shards in at least float32,
    grads averaged over shards in comm_dtype, boxed like state.params).
  """
  axes = _batch_axes(mesh, batch_axes)
  return _sharded_grad(grad_fn, mesh, axes, comm_dtype, hierarchical,
                       lambda state: state.params,
                       lambda state, params: state.replace(params=params))


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
                "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_ARRAY = re.compile(r"\b(pred|[a-z]+\d+)\[([\d,]*)\]")


def collective_bytes(hlo_text: str, op: str = "all-reduce", *,
                     include_scalars: bool = False) -> dict[str, int]:
  """Bytes of the results of one kind of collective in an HLO module, by dtype.

  Args:
    hlo_text: HLO text, e.g. `jitted.lower(...).compile().as_text()` or
      `jitted.lower(...).as_text(dialect="hlo")`. Combined (tuple) collectives count
      every element; an async `<op>-start` counts once (its -done is not counted).
    op: 'all-reduce', 'reduce-scatter', 'all-gather', 'collective-permute', ...
      For an all-reduce the result is the size of what each device sends and
      receives; for a reduce-scatter it is the slice each device keeps, for an
      all-gather the gathered whole.
    include_scalars: count rank-0 results (losses, metrics) too.

  Returns:
    {dtype: bytes}, e.g. {'bf16': 1184}, for one device and one step.
  """
  pattern = re.compile(r"=\s*(.+?)\s+" + re.escape(op) + r"(?:-start)?\(")
  totals: dict[str, int] = {}
  for line in hlo_text.splitlines():
    match = pattern.search(line)
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


def all_reduce_bytes(hlo_text: str, *, include_scalars: bool = False) -> dict[str, int]:
  """`collective_bytes(hlo_text, 'all-reduce')`: bytes all-reduced per device, by dtype."""
  return collective_bytes(hlo_text, "all-reduce", include_scalars=include_scalars)
