"""The pipelined stack equals the plain scanned stack, on 8 fake CPU devices.

The equivalences are exact mathematics (the same sums in another order), so they run
in float64 (`jax.enable_x64`) with a tolerance of 1e-12, which holds on any CPU; in
float32 the reduction order alone moved single gradient elements by 1.6e-5 on AMD.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from etjax.sharding import mesh as mesh_lib
from etjax.sharding import partitioning, rules as rules_lib
from etjax.models.pipeline import Pipeline, bubble_fraction
from sharding_testlib import ResidualMlpLayer

B, L, D = 24, 3, 8
LAYER_KWARGS = {"embed": D, "mlp": 16}
TOL = dict(rtol=1e-12, atol=1e-12)


@pytest.fixture
def x64():
  """float64 for the whole test: inputs, parameters (flax's default dtype follows) and
  every product."""
  with jax.enable_x64(True):
    yield


class PlainModel(nn.Module):
  """The reference: nn.scan over the layer, exactly as the interface prescribes."""
  num_layers: int

  @nn.compact
  def __call__(self, x_bld, side_b, shared, deterministic=True):
    scanned = nn.scan(ResidualMlpLayer, variable_axes={"params": 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                      length=self.num_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
    x_bld, _ = scanned(**LAYER_KWARGS, name="layers")(x_bld, side_b, shared,
                                                      deterministic)
    return x_bld


class PipelinedModel(nn.Module):
  num_layers: int
  num_stages: int
  num_microbatches: int
  remat_policy: str = "none"
  num_repeats: int = 1

  @nn.compact
  def __call__(self, x_bld, side_b, shared, deterministic=True):
    x_bld, outputs = Pipeline(
        layer_cls=ResidualMlpLayer, layer_kwargs=LAYER_KWARGS,
        num_layers=self.num_layers, num_stages=self.num_stages,
        num_microbatches=self.num_microbatches, remat_policy=self.remat_policy,
        num_repeats=self.num_repeats, name="layers")(x_bld, side_b, shared, deterministic)
    assert outputs is None
    return x_bld


def _inputs():
  kx, km, kb, kc = jax.random.split(jax.random.PRNGKey(1), 4)
  x_bld = jax.random.normal(kx, (B, L, D))
  mask_bl = (jax.random.uniform(km, (B, L)) > 0.3).astype(jnp.float32)
  side_b = {"mask_bl": mask_bl}
  shared = {"bias_d": 0.1 * jax.random.normal(kb, (D,))}
  cotangent = jax.random.normal(kc, (B, L, D))
  return x_bld, side_b, shared, cotangent


def _loss(model, params, x_bld, side_b, shared, cotangent):
  y_bld = model.apply({"params": params}, x_bld, side_b, shared)
  return jnp.sum(jnp.sin(y_bld) * cotangent), y_bld


def _run(model, params, mesh, rules):
  x_bld, side_b, shared, cotangent = _inputs()
  param_sh = partitioning.state_shardings(params, mesh, rules)
  batch_sh = partitioning.batch_sharding(mesh, rules)
  fn = jax.value_and_grad(functools.partial(_loss, model), argnums=(0, 1), has_aux=True)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    jitted = jax.jit(fn, in_shardings=(param_sh, batch_sh, batch_sh, None, batch_sh))
    compiled = jitted.lower(params, x_bld, side_b, shared, cotangent).compile()
    (_, y_bld), grads = compiled(params, x_bld, side_b, shared, cotangent)
  return y_bld, grads, compiled.as_text()


@functools.lru_cache(maxsize=None)
def _reference(num_layers, mesh=None, rules=None):
  """The plain stack's params, output and gradients (float64); on `mesh` when given.

  Under tensor parallelism the pipeline is held to the plain stack on the same mesh and
  rules AND that stack to the unsharded one; elsewhere directly to the unsharded stack.
  """
  assert jax.config.jax_enable_x64, "the references are float64"
  x_bld, side_b, shared, cotangent = _inputs()
  plain = PlainModel(num_layers)
  params = plain.init(jax.random.PRNGKey(0), x_bld, side_b, shared)["params"]
  if mesh is not None:
    y_bld, grads, _ = _run(plain, params, mesh, rules)
    return params, y_bld, grads
  fn = jax.value_and_grad(functools.partial(_loss, plain), argnums=(0, 1), has_aux=True)
  (_, y_bld), grads = jax.jit(fn)(params, x_bld, side_b, shared, cotangent)
  return params, y_bld, grads


def _assert_close(got, want):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert np.asarray(g).dtype == np.float64
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), **TOL)


@pytest.mark.parametrize("stages,microbatches,repeats,mesh_sizes", [
    (2, 2, 1, {"stage": 2, "data": 4}),
    (2, 3, 1, {"stage": 2, "data": 4}),
    (4, 4, 1, {"stage": 4, "data": 2}),
    (4, 6, 1, {"stage": 4, "data": 2}),
    (2, 4, 1, {"stage": 2, "data": 2, "model": 2}),
    (2, 3, 2, {"stage": 2, "data": 4}),       # circular
    (4, 4, 2, {"stage": 4, "model": 2}),      # circular, tensor parallel
])
def test_pipeline_equals_plain_stack(x64, stages, microbatches, repeats, mesh_sizes):
  num_layers = 8
  mesh = mesh_lib.make_mesh(mesh_sizes)
  rules = rules_lib.get_rules("3d")
  params, y_want, grads_want = _reference(num_layers)
  if "model" in mesh_sizes:
    # The sharded plain stack equals the unsharded one too.
    _, y_tp, grads_tp = _reference(num_layers, mesh, rules)
    np.testing.assert_allclose(y_tp, y_want, **TOL)
    _assert_close(grads_tp, grads_want)
  x_bld, side_b, shared, _ = _inputs()
  model = PipelinedModel(num_layers, stages, microbatches, num_repeats=repeats)
  # Same tree paths, shapes and logical names as the plain stack.
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), x_bld, side_b,
                            shared)["params"]
  assert jax.tree.structure(abstract) == jax.tree.structure(params)
  assert ([(a.value.shape, a.names) for a in jax.tree.leaves(abstract, is_leaf=_boxed)]
          == [(p.value.shape, p.names) for p in jax.tree.leaves(params, is_leaf=_boxed)])
  y_got, grads_got, hlo = _run(model, params, mesh, rules)
  np.testing.assert_allclose(y_got, y_want, **TOL)
  _assert_close(grads_got, grads_want)
  # Microbatches move between stages by collective permutes.
  assert "collective-permute" in hlo


def _boxed(x):
  return isinstance(x, nn.meta.AxisMetadata)


def test_pipeline_with_remat(x64):
  params, y_want, grads_want = _reference(8)
  mesh = mesh_lib.make_mesh({"stage": 2, "data": 4})
  model = PipelinedModel(8, 2, 2, remat_policy="full")
  y_got, grads_got, _ = _run(model, params, mesh, rules_lib.get_rules("3d"))
  np.testing.assert_allclose(y_got, y_want, **TOL)
  _assert_close(grads_got, grads_want)


def test_bad_configuration_errors(x64):
  x_bld, side_b, shared, _ = _inputs()
  with pytest.raises(ValueError, match="num_layers=6 does not split into num_stages=4 "
                     "x num_repeats=1"):
    PipelinedModel(6, 4, 2).init(jax.random.PRNGKey(0), x_bld, side_b, shared)
  with pytest.raises(ValueError, match="circular schedule needs num_microbatches=2 >= "
                     "num_stages=4"):
    PipelinedModel(8, 4, 2, num_repeats=2).init(jax.random.PRNGKey(0), x_bld, side_b,
                                                shared)
  params, _, _ = _reference(4)
  with pytest.raises(ValueError, match="Pipeline: batch of 24 examples does not split "
                     "into 5 equal microbatches"):
    PipelinedModel(4, 2, 5).apply({"params": params}, x_bld, side_b, shared)


def test_bubble_fraction():
  assert bubble_fraction(1, 8) == 0.0
  assert bubble_fraction(4, 4) == pytest.approx(3 / 7)
  assert bubble_fraction(2, 6) == pytest.approx(1 / 7)
  assert bubble_fraction(4, 4, num_repeats=2) == pytest.approx(3 / 11)
  with pytest.raises(ValueError):
    bubble_fraction(0, 4)


def test_dropout_path_is_seeded_and_differs_per_microbatch():
  class DropModel(nn.Module):
    @nn.compact
    def __call__(self, x_bld, side_b, shared, deterministic):
      return Pipeline(layer_cls=ResidualMlpLayer,
                      layer_kwargs=dict(LAYER_KWARGS, dropout_rate=0.5), num_layers=2,
                      num_stages=2, num_microbatches=2, name="layers")(
                          x_bld, side_b, shared, deterministic)[0]
  x_bld, side_b, shared, _ = _inputs()
  x_bld = jnp.concatenate([x_bld[:1]] * B)  # identical examples
  params = PlainModel(2).init(jax.random.PRNGKey(0), x_bld, side_b, shared)
  side_b = {"mask_bl": jnp.ones((B, L))}
  run = jax.jit(lambda key: DropModel().apply(params, x_bld, side_b, shared, False,
                                              rngs={"dropout": key}))
  a, b, c = run(jax.random.PRNGKey(1)), run(jax.random.PRNGKey(1)), run(jax.random.PRNGKey(2))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  # Microbatch 0 holds examples 0, 2, 4, ... and microbatch 1 examples 1, 3, ...:
  # identical inputs, so equal halves would mean one dropout key for both.
  assert not np.allclose(a[0::2], a[1::2])
  clean = DropModel().apply(params, x_bld, side_b, shared, True)
  assert np.all(np.isfinite(a)) and not np.allclose(a, clean)
