"""The scanned layer stack every encoder and decoder is built from.

A layer is a Linen module class whose call is

    layer(x_bld, side_b, shared, deterministic) -> (x_bld, outputs)

where `side_b` is a dict of per-example arrays with a leading batch axis (key masks,
encoder states) and `shared` a dict of arrays common to all examples (T5's relative
position bias). `outputs` is a dict of per-layer arrays (hidden states, attention
probabilities) that the scan stacks on a leading 'layers' axis.

The stack scans the layer with `nn.scan`, so parameters carry a leading axis of length
num_layers named 'layers', and compile time does not grow with depth. `scan_unroll`
layers run per loop iteration; unrolling all of them (scan_unroll >= num_layers) keeps
the same parameters and results but lets XLA drop the loop's stacked residual buffers:
bert-base trains about 1.6x faster that way on the CPU in bfloat16, for a compile time
that grows with depth (benchmarks/RESULTS.md). With `share_params` (ALBERT) one set of
parameters is applied num_layers times. With `pipeline_stages > 1` the same parameters
run through etjax.models.pipeline, which does not unroll (scan_unroll is ignored).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax

from etjax.models.pipeline import Pipeline
from etjax.models.remat import remat_module


def layer_outputs(x_bld: jax.Array, probs_bhqk: Optional[jax.Array],
                  hidden_states: bool, attentions: bool) -> dict:
  """A layer's per-layer outputs dict: its hidden state and attention probabilities,
  each only when requested (the scan stacks them on a leading 'layers' axis)."""
  outputs = {}
  if hidden_states:
    outputs["hidden_states"] = x_bld
  if attentions:
    outputs["attentions"] = probs_bhqk
  return outputs


def stack_options(config: Any) -> dict:
  """The LayerStack arguments every model config carries (rematerialization, scan
  unrolling, pipeline), as keyword arguments."""
  return dict(remat_policy=config.remat_policy, scan_unroll=config.scan_unroll,
              pipeline_stages=config.pipeline_stages,
              pipeline_microbatches=config.pipeline_microbatches)


class LayerStack(nn.Module):
  """num_layers applications of `layer_cls(**layer_kwargs)`.

  Returns (x [batch, length, embed], outputs: dict of arrays [num_layers, ...]; empty in
  pipeline mode).
  """
  layer_cls: Any
  layer_kwargs: Mapping[str, Any]
  num_layers: int
  remat_policy: str = "none"
  scan_unroll: int = 1
  share_params: bool = False
  pipeline_stages: int = 1
  pipeline_microbatches: int = 1

  @nn.compact
  def __call__(self, x_bld: jax.Array, side_b: Mapping[str, jax.Array],
               shared: Mapping[str, jax.Array], deterministic: bool = True):
    if self.pipeline_stages > 1:
      if self.share_params:
        raise ValueError("pipeline parallelism needs one parameter set per layer; "
                         "it cannot split a shared-parameter (ALBERT) stack into stages")
      x_bld, _ = Pipeline(layer_cls=self.layer_cls, layer_kwargs=dict(self.layer_kwargs),
                          num_layers=self.num_layers, num_stages=self.pipeline_stages,
                          num_microbatches=self.pipeline_microbatches,
                          remat_policy=self.remat_policy, name="layers")(
                              x_bld, dict(side_b), dict(shared), deterministic)
      return x_bld, {}
    layer_cls = remat_module(self.layer_cls, self.remat_policy)
    scanned = nn.scan(
        layer_cls,
        # 'cache' (decoding key/value caches) is per layer even when params are shared.
        variable_axes={"cache": 0} if self.share_params else {"params": 0, "cache": 0},
        variable_broadcast="params" if self.share_params else False,
        split_rngs={"params": not self.share_params, "dropout": True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
        length=self.num_layers,
        unroll=min(self.scan_unroll, self.num_layers),
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    return scanned(**self.layer_kwargs, name="layers")(
        x_bld, dict(side_b), dict(shared), deterministic)
