"""rsa_attention_sharded on 8 fake CPU devices against the unsharded result."""

from __future__ import annotations

import jax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from etjax.pallas.rsa import make_layout, rsa_attention, rsa_attention_sharded
from etjax.sharding.mesh import make_mesh
from rsa_cases import make_inputs, outputs_and_grads, rel_err


@pytest.mark.parametrize("backend", ["interpret", "xla"])
def test_sharded_matches_unsharded(backend):
  assert jax.device_count() == 8
  mesh = make_mesh({"data": 2, "fsdp": 2, "model": 2})
  b, length, h, d, bs = 4, 64, 4, 16, 16
  q, k, v, g, m, bias = make_inputs(7, b, length, h, d, mask=True, bias=1)
  layout = make_layout(h, length, bs, 2, seed=3, causal=True)
  common = dict(block_size=bs, mask=m, causal=True, backend=backend)
  want = outputs_and_grads(
      lambda q, k, v, bias, **kw: rsa_attention(q, k, v, layout, bias=bias, **kw),
      q, k, v, g, bias, **common)
  shard = NamedSharding(mesh, P(("data", "fsdp"), None, "model", None))
  qs, ks, vs = (jax.device_put(x, shard) for x in (q, k, v))

  @jax.jit
  def run(q, k, v, bias):
    return outputs_and_grads(
        lambda q, k, v, bias, **kw: rsa_attention_sharded(
            q, k, v, layout, mesh=mesh, bias=bias, **kw),
        q, k, v, g, bias, **common)

  got = run(qs, ks, vs, bias)
  assert got[0].sharding.spec == shard.spec
  for name, x, y in zip(("out", "dq", "dk", "dv", "dbias"), got, want):
    assert rel_err(x, y) <= 1e-5, name


def test_sharded_uses_the_context_mesh_and_checks_divisibility():
  mesh = make_mesh({"data": 4, "model": 2})
  q, k, v, _, _, _ = make_inputs(1, 4, 32, 3, 16)
  layout = make_layout(3, 32, 16, 1, seed=0)
  with jax.set_mesh(mesh):
    with pytest.raises(ValueError, match="heads 3 by 2"):
      rsa_attention_sharded(q, k, v, layout, block_size=16, backend="xla")
  q, k, v, _, _, _ = make_inputs(1, 4, 32, 2, 16)
  layout = make_layout(2, 32, 16, 1, seed=0)
  with jax.set_mesh(mesh):
    got = jax.jit(lambda q, k, v: rsa_attention_sharded(
        q, k, v, layout, block_size=16, backend="xla"))(q, k, v)
  want = rsa_attention(q, k, v, layout, block_size=16, backend="xla")
  assert rel_err(got, want) <= 1e-5
