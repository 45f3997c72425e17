"""Gradient all-reduce in bfloat16: half the bytes, float32 results within bf16 error."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from etjax.sharding import grad_comm, mesh as mesh_lib
from etjax.sharding.partitioning import batch_sharding
from etjax.sharding.rules import get_rules
from sharding_testlib import TinyClassifier

MODEL = TinyClassifier()


def _loss(params, batch, rng):
  del rng
  logits = MODEL.apply({"params": params}, batch["ids"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()


def _setup():
  ids = jax.random.randint(jax.random.PRNGKey(1), (16, 6), 0, 16)
  labels = jax.random.randint(jax.random.PRNGKey(2), (16,), 0, 4)
  params = MODEL.init(jax.random.PRNGKey(0), ids)["params"]
  return params, {"ids": ids, "labels": labels}


def _param_bytes(params):
  return sum(x.nbytes for x in jax.tree.leaves(jax.tree.map(np.asarray, params)))


def test_hlo_parser_on_handwritten_lines():
  text = """
  %a = (f32[], f32[16,8]{1,0}, /*index=5*/bf16[4]{0}) all-reduce(%x, %y, %z), channel_id=1
  %b = bf16[2,3]{1,0} all-reduce-start(%w), channel_id=2
  %c = bf16[2,3]{1,0} all-reduce-done(%b)
  %d = f32[8]{0} all-gather(%v), dimensions={0}
  """
  assert grad_comm.all_reduce_bytes(text) == {"f32": 512, "bf16": 8 + 12}
  assert grad_comm.all_reduce_bytes(text, include_scalars=True)["f32"] == 516


def test_bf16_all_reduce_moves_half_the_bytes():
  params, batch = _setup()
  mesh = mesh_lib.make_mesh({"data": 8})
  texts = {}
  with jax.set_mesh(mesh):
    for dtype in (jnp.float32, jnp.bfloat16):
      fn = jax.jit(grad_comm.data_parallel_grad(_loss, mesh, comm_dtype=dtype))
      # The partitioned program before backend passes: the CPU backend alone widens a
      # bf16 all-reduce to f32 (it has no bf16 all-reduce); GPU/TPU keep it.
      texts[dtype] = fn.lower(params, batch).as_text(dialect="hlo")
    # Baseline: what the SPMD partitioner does by itself for a batch-sharded gradient.
    sharding = batch_sharding(mesh, get_rules("dp"))
    plain = jax.jit(jax.grad(_loss), in_shardings=(None, sharding, None))
    baseline = plain.lower(params, batch, None).compile().as_text()
  total = _param_bytes(params)
  assert grad_comm.all_reduce_bytes(baseline) == {"f32": total}
  assert grad_comm.all_reduce_bytes(texts[jnp.float32]) == {"f32": total}
  assert grad_comm.all_reduce_bytes(texts[jnp.bfloat16]) == {"bf16": total // 2}


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="only GPU/TPU compile a bf16 all-reduce; CPU widens it to f32")
def test_compiled_bf16_all_reduce_on_gpu():
  params, batch = _setup()
  mesh = mesh_lib.make_mesh()
  with jax.set_mesh(mesh):
    fn = jax.jit(grad_comm.data_parallel_grad(_loss, mesh, comm_dtype=jnp.bfloat16))
    text = fn.lower(params, batch).compile().as_text()
  assert grad_comm.all_reduce_bytes(text) == {"bf16": _param_bytes(params) // 2}


def test_bf16_gradients_match_f32_within_bf16_error():
  params, batch = _setup()
  want_loss, want = jax.value_and_grad(_loss)(params, batch, None)
  mesh = mesh_lib.make_mesh({"data": 4, "model": 2})
  with jax.set_mesh(mesh):
    got = {dtype: jax.jit(grad_comm.data_parallel_grad(_loss, mesh, comm_dtype=dtype))(
        params, batch) for dtype in (jnp.float32, jnp.bfloat16)}
  loss32, g32 = got[jnp.float32]
  loss16, g16 = got[jnp.bfloat16]
  np.testing.assert_allclose(loss32, want_loss, rtol=1e-5)
  np.testing.assert_allclose(loss16, want_loss, rtol=1e-5)  # metrics stay f32
  differs = False
  for a, b, w in zip(jax.tree.leaves(g32), jax.tree.leaves(g16), jax.tree.leaves(want)):
    a, b, w = (np.asarray(v, np.float32) for v in (a, b, w))
    assert a.dtype == b.dtype == np.float32
    np.testing.assert_allclose(a, w, rtol=1e-5, atol=1e-7)
    scale = np.max(np.abs(w))
    np.testing.assert_allclose(b, w, rtol=1e-2, atol=1e-2 * scale)
    differs |= not np.array_equal(a, b)
  assert differs  # the communication really was rounded


def test_unknown_batch_axis():
  mesh = mesh_lib.make_mesh()
  with pytest.raises(ValueError, match=r"batch_axes \['replica'\] are not axes"):
    grad_comm.data_parallel_grad(_loss, mesh, batch_axes=("replica",))


def test_hierarchical_all_reduce_sends_a_slice_across_dcn():
  params, batch = _setup()
  mesh = mesh_lib.make_mesh({"dcn_data": 2, "data": 4})
  with jax.set_mesh(mesh):
    flat_fn = jax.jit(grad_comm.data_parallel_grad(_loss, mesh))
    hier_fn = jax.jit(grad_comm.data_parallel_grad(_loss, mesh, hierarchical=True))
    loss_flat, g_flat = flat_fn(params, batch)
    lowered = hier_fn.lower(params, batch)
    loss_hier, g_hier = lowered.compile()(params, batch)
  text = lowered.as_text(dialect="hlo")
  leaves = jax.tree.leaves(jax.tree.map(np.asarray, params))
  # Each leaf is padded to a multiple of the 4 devices of a granule.
  padded = sum(-(-x.size // 4) * 4 * 4 for x in leaves)
  assert grad_comm.collective_bytes(text, "reduce-scatter") == {"f32": padded // 4}
  assert grad_comm.all_reduce_bytes(text) == {"f32": padded // 4}   # across dcn_data
  assert grad_comm.collective_bytes(text, "all-gather") == {"f32": padded}
  assert "replica_groups={{0,4},{1,5},{2,6},{3,7}}" in text.replace(" ", "")
  del loss_hier, g_hier, loss_flat, g_flat  # their equality: the float64 test below


def test_hierarchical_all_reduce_equals_the_flat_one_in_float64():
  """The same sums in another order: exact mathematics, so float64 at 1e-12."""
  with jax.enable_x64(True):
    params, batch = _setup()
    mesh = mesh_lib.make_mesh({"dcn_data": 2, "data": 4})
    with jax.set_mesh(mesh):
      loss_flat, g_flat = jax.jit(grad_comm.data_parallel_grad(
          _loss, mesh, comm_dtype=jnp.float64))(params, batch)
      loss_hier, g_hier = jax.jit(grad_comm.data_parallel_grad(
          _loss, mesh, comm_dtype=jnp.float64, hierarchical=True))(params, batch)
      _, g_one = jax.jit(jax.value_and_grad(_loss))(params, batch, None)
  assert loss_hier.dtype == np.float64
  np.testing.assert_allclose(loss_hier, loss_flat, rtol=1e-12)
  for a, b, c in zip(jax.tree.leaves(g_hier), jax.tree.leaves(g_flat),
                     jax.tree.leaves(g_one)):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(a, c, rtol=1e-12, atol=1e-15)  # = unsharded
