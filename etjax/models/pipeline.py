"""Pipeline parallelism over the 'stage' mesh axis (GPipe and circular schedules).

A schedule of the model's own layer stack, so it lives with the models: like them it
names logical axes only ('stage', 'batch'); the job's rules table maps 'stage' to a
mesh axis (etjax.sharding.rules), and without such a mapping it computes the same
function with every device running every stage.

The plain layer stack (etjax.models.stack) scans one layer class over num_layers with
parameters stacked on a leading 'layers' axis:

    nn.scan(layer_cls, variable_axes={'params': 0},
            split_rngs={'params': True, 'dropout': True},
            in_axes=(nn.broadcast,) * 3, length=num_layers,
            metadata_params={nn.PARTITION_NAME: 'layers'})

with the layer interface `layer(x_bld, side_b, shared, deterministic) -> (x_bld, outputs)`.
`Pipeline` holds EXACTLY those parameters (same tree paths, shapes and logical names;
it shares its scope with such a scan, which also creates them at init), so one set of
parameters runs either way.

Applied, it groups the layers into S stages of L/S consecutive layers ([L, ...] ->
[S, L/S, ...], stage dimension on the 'stage' logical axis), splits the batch into M
microbatches (strided, see microbatch.py) and runs the GPipe schedule: at clock tick t
stage s works on microbatch t - s, all stages at once (a vmap over the stage dimension,
which the SPMD partitioner splits over the 'stage' mesh axis), and the stage outputs
move one stage on with a roll of the stage dimension, which XLA lowers to a collective
permute between neighbouring stages. After T = R*M + S - 1 ticks (R = 1 for GPipe)
every microbatch has left the last stage. The backward pass is the reverse schedule, by
differentiating the loop. Data and tensor parallelism compose through the other mesh
axes: the microbatch dimension keeps the 'batch' sharding, and the layer's own logical
constraints and parameter shardings apply inside each stage.

The circular schedule (num_repeats R > 1, as in MaxText and Megatron's interleaved
schedule) cuts the stack into S * R blocks; stage s runs blocks s, s + S, ..., so each
microbatch goes round the ring of stages R times, and the bubble shrinks from
(S-1)/(M+S-1) to (S-1)/(R*M+S-1) at the price of R times as many stage hand-overs and,
since each stage's blocks are strided in the stored [L, ...] order, an exchange of the
parameters between stages each step. It needs M >= S: a microbatch leaving the last
stage waits in a buffer until stage 0 is free to take it round again.

Idle stage slots (the bubble, a fraction `bubble_fraction(S, M, R)` of the ticks)
compute on placeholder inputs whose results are never used. Per-layer `outputs` are not
collected in pipeline mode (the call returns (x_bld, None)); use the plain stack where a
model needs per-layer hidden states. Only the 'params' collection is supported, and
dropout masks come from the 'dropout' rng folded with the layer and microbatch index,
so with dropout they differ from the plain stack's masks (deterministic runs are
identical). Under a rules table that maps 'stage' to no mesh axis (every preset but 3d)
the pipeline still computes the same function, with every device running every stage.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from etjax.models import microbatch
from etjax.models.remat import remat_function, remat_module

_FREE = PartitionSpec.UNCONSTRAINED


def bubble_fraction(num_stages: int, num_microbatches: int,
                    num_repeats: int = 1) -> float:
  """Fraction of stage-ticks the schedule leaves idle: (S-1)/(R*M+S-1).

  R = 1 is GPipe's (S-1)/(M+S-1); the circular schedule with R repeats divides the
  bubble by about R.
  """
  if min(num_stages, num_microbatches, num_repeats) < 1:
    raise ValueError(f"num_stages ({num_stages}), num_microbatches ({num_microbatches}) "
                     f"and num_repeats ({num_repeats}) must be >= 1")
  return (num_stages - 1) / (num_repeats * num_microbatches + num_stages - 1)


def scanned_layers(layer_cls: Any, num_layers: int, remat_policy: str = "none"):
  """The plain stack's module class: `layer_cls` scanned over a 'layers' axis.

  Returns a Linen module class; instantiate it with the layer's keyword arguments and
  call it as (x_bld, side_b, shared, deterministic) -> (x_bld, outputs stacked [L, ...]).
  """
  return nn.scan(
      remat_module(layer_cls, remat_policy),
      variable_axes={"params": 0},
      split_rngs={"params": True, "dropout": True},
      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
      length=num_layers,
      metadata_params={nn.PARTITION_NAME: "layers"},
  )


def _constrain(tree: Any, leading: tuple) -> Any:
  """Logical constraint: the given leading axes, every other dimension left free."""
  def constrain(x):
    return nn.with_logical_constraint(x, leading + (_FREE,) * (x.ndim - len(leading)))
  return jax.tree.map(constrain, tree)


class Pipeline(nn.Module):
  """num_layers applications of `layer_cls(**layer_kwargs)`, pipelined over stages.

  Attributes:
    layer_cls: the layer module class (interface in the module docstring).
    layer_kwargs: keyword arguments of the layer.
    num_layers: L, a multiple of num_stages * num_repeats.
    num_stages: S, the size of the 'stage' mesh axis the stages run on.
    num_microbatches: M; the batch must divide into M microbatches, and each
      microbatch by the mesh axes that 'batch' maps to.
    remat_policy: rematerialization per layer (etjax.models.remat names).
    num_repeats: R; 1 is GPipe, R > 1 the circular schedule (needs M >= S).
  """
  layer_cls: Any
  layer_kwargs: Mapping[str, Any]
  num_layers: int
  num_stages: int
  num_microbatches: int
  remat_policy: str = "none"
  num_repeats: int = 1

  def setup(self):
    blocks = self.num_stages * self.num_repeats
    if self.num_stages < 1 or self.num_repeats < 1 or self.num_layers % blocks:
      raise ValueError(f"Pipeline: num_layers={self.num_layers} does not split into "
                       f"num_stages={self.num_stages} x num_repeats={self.num_repeats} "
                       "equal blocks")
    if self.num_microbatches < 1:
      raise ValueError(f"Pipeline: num_microbatches={self.num_microbatches} must be >= 1")
    if self.num_repeats > 1 and self.num_microbatches < self.num_stages:
      raise ValueError(f"Pipeline: the circular schedule needs num_microbatches="
                       f"{self.num_microbatches} >= num_stages={self.num_stages}")
    # Sharing the scope gives this module exactly the plain stack's parameters.
    self.stack = scanned_layers(self.layer_cls, self.num_layers, self.remat_policy)(
        **self.layer_kwargs)
    nn.share_scope(self, self.stack)

  def __call__(self, x_bld: jax.Array, side_b: Mapping[str, jax.Array],
               shared: Mapping[str, jax.Array], deterministic: bool = True
               ) -> tuple[jax.Array, None]:
    """Returns (x_bld after all layers, None); x_bld keeps its shape [B, ...]."""
    side_b, shared = dict(side_b), dict(shared)
    if self.is_initializing():
      x_bld, _ = self.stack(x_bld, side_b, shared, deterministic)
      return x_bld, None
    microbatch.check_divisible(x_bld.shape[0], self.num_microbatches,
                               what="Pipeline: batch")
    rng = None if deterministic else self.make_rng("dropout")
    stage_params = self._stage_params()
    x_bld = self._run(stage_params, x_bld, side_b, shared, deterministic, rng)
    return x_bld, None

  def _stage_params(self) -> Any:
    """The stored [L, ...] parameters as [S, R, K, ...], stage dim on 'stage'.

    Layer block b = r * S + s (K = L / (S * R) consecutive layers) runs on stage s in
    repeat r. For R = 1 this is a reshape of contiguous blocks, which the 3d preset
    already stores on their stage; for R > 1 each stage's blocks are strided in L, so
    the parameters (and their gradients) are exchanged between stages once per step.
    """
    s, r = self.num_stages, self.num_repeats
    k = self.num_layers // (s * r)

    def group(leaf):
      names = getattr(leaf, "names", None)
      value = nn.meta.unbox(leaf)
      value = jnp.reshape(value, (r, s, k) + value.shape[1:])
      value = jnp.swapaxes(value, 0, 1)
      rest = tuple(names[1:]) if names else (_FREE,) * (value.ndim - 3)
      return nn.with_logical_constraint(value, ("stage", None, None) + rest)
    return jax.tree.map(group, self.variables["params"],
                        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))

  def _run(self, stage_params, x_bld, side_b, shared, deterministic, rng):
    s, m, r = self.num_stages, self.num_microbatches, self.num_repeats
    k = self.num_layers // (s * r)
    items = r * m  # (repeat, microbatch) pairs each stage works through
    layer = self.layer_cls(**self.layer_kwargs, parent=None)

    def apply_layer(params, x, side, layer_rng):
      rngs = {} if layer_rng is None else {"dropout": layer_rng}
      y, _ = layer.apply({"params": params}, x, side, shared, deterministic, rngs=rngs)
      return y
    apply_layer = remat_function(apply_layer, self.remat_policy)

    def run_stage(params_rk, x, side, stage, item):
      """One stage's K layers of repeat item // M on microbatch item % M."""
      repeat, micro = item // m, item % m
      params_k = jax.tree.map(lambda p: p[repeat], params_rk)
      first_layer = (repeat * s + stage) * k

      def body(x, inputs):
        params, index = inputs
        layer_rng = None
        if rng is not None:
          layer_rng = jax.random.fold_in(jax.random.fold_in(rng, first_layer + index),
                                         micro)
        return apply_layer(params, x, side, layer_rng), None
      x, _ = jax.lax.scan(body, x, (params_k, jnp.arange(k)))
      return x
    run_stages = jax.vmap(run_stage)

    x_mbld = microbatch.split_microbatches(x_bld, m)
    side_mb = microbatch.split_microbatches(side_b, m)
    stages = jnp.arange(s)

    def tick(carry, t):
      state_sbld, done_mbld = carry
      # Stage 0 takes microbatch t fresh in repeat 0, and afterwards the last stage's
      # output for the same microbatch from the previous repeat (ready since M >= S).
      feed_bld = jnp.where(t < m, x_mbld[jnp.minimum(t, m - 1)], done_mbld[t % m])
      # The roll moves stage s-1's output to stage s: a collective permute.
      shifted = jnp.roll(state_sbld, 1, axis=0)
      first = (stages == 0).reshape((s,) + (1,) * (shifted.ndim - 1))
      in_sbld = _constrain(jnp.where(first, feed_bld[None], shifted), ("stage", "batch"))
      item_s = jnp.clip(t - stages, 0, items - 1)
      side_s = _constrain(jax.tree.map(lambda a: a[item_s % m], side_mb),
                          ("stage", "batch"))
      out_sbld = _constrain(run_stages(stage_params, in_sbld, side_s, stages, item_s),
                            ("stage", "batch"))
      # The last stage finishes item t - (S - 1); idle ticks write nothing.
      last = t - (s - 1)
      slot = jnp.clip(last, 0, items - 1) % m
      valid = (last >= 0) & (last < items)
      done_mbld = done_mbld.at[slot].set(jnp.where(valid, out_sbld[s - 1], done_mbld[slot]))
      return (out_sbld, _constrain(done_mbld, (None, "batch"))), None

    state0 = _constrain(jnp.zeros((s,) + x_mbld.shape[1:], x_mbld.dtype),
                        ("stage", "batch"))
    done0 = _constrain(jnp.zeros_like(x_mbld), (None, "batch"))
    (_, done_mbld), _ = jax.lax.scan(tick, (state0, done0), jnp.arange(items + s - 1))
    return microbatch.merge_microbatches(done_mbld)
