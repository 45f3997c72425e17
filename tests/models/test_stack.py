"""The layer stack's execution choices compute one function: unrolled = looped scan,
pipelined (one device) = plain. Exact mathematics, so float64 and 1e-12."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from etjax.models.stack import LayerStack

B, L, D, LAYERS = 4, 5, 6, 4
TOL = dict(rtol=1e-12, atol=1e-12)


class TanhLayer(nn.Module):
  """The stack's layer interface; a residual tanh block with dropout and side inputs."""
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x_bld, side_b, shared, deterministic):
    w_dd = self.param("w", nn.with_logical_partitioning(nn.initializers.normal(0.3),
                                                        ("embed", "mlp")), (D, D))
    h_bld = jnp.tanh(x_bld @ w_dd + shared["bias_d"]) * side_b["mask_bl"][..., None]
    h_bld = nn.Dropout(self.dropout_rate)(h_bld, deterministic=deterministic)
    return x_bld + h_bld, {"hidden_states": x_bld}


def _loss(stack, params, x_bld, side_b, shared, deterministic):
  y_bld, _ = stack.apply({"params": params}, x_bld, side_b, shared, deterministic,
                         rngs={"dropout": jax.random.PRNGKey(7)})
  return jnp.sum(jnp.sin(y_bld))


def _inputs():
  kx, km, kb = jax.random.split(jax.random.PRNGKey(1), 3)
  return (jax.random.normal(kx, (B, L, D)),
          {"mask_bl": (jax.random.uniform(km, (B, L)) > 0.2).astype(jnp.float64)},
          {"bias_d": 0.1 * jax.random.normal(kb, (D,))})


def _stack(**options):
  return LayerStack(layer_cls=TanhLayer, layer_kwargs={"dropout_rate": 0.3},
                    num_layers=LAYERS, **options)


def _value_and_grad(stack, params, deterministic):
  return jax.jit(jax.value_and_grad(lambda p: _loss(stack, p, *_inputs(), deterministic))
                 )(params)


@pytest.mark.parametrize("unroll,remat", [(2, "none"), (LAYERS, "full")])
def test_unrolled_equals_looped_scan(unroll, remat):
  with jax.enable_x64(True):
    looped = _stack(remat_policy=remat)
    params = looped.init(jax.random.PRNGKey(0), *_inputs())["params"]
    # Dropout active: both must draw the same per-layer masks.
    want_loss, want = _value_and_grad(looped, params, False)
    got_loss, got = _value_and_grad(_stack(remat_policy=remat, scan_unroll=unroll),
                                    params, False)
  assert got_loss.dtype == np.float64
  np.testing.assert_allclose(got_loss, want_loss, **TOL)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL),
               nn.meta.unbox(got), nn.meta.unbox(want))


def test_pipelined_stack_equals_plain_on_one_device():
  with jax.enable_x64(True):
    plain = _stack()
    params = plain.init(jax.random.PRNGKey(0), *_inputs())["params"]
    want_loss, want = _value_and_grad(plain, params, True)
    piped = _stack(pipeline_stages=2, pipeline_microbatches=2)
    got_loss, got = _value_and_grad(piped, params, True)
  np.testing.assert_allclose(got_loss, want_loss, **TOL)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL),
               nn.meta.unbox(got), nn.meta.unbox(want))
