"""RSA kernels (interpret mode) and the XLA path against reference_rsa."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from etjax.pallas.rsa import make_layout, reference_rsa, rsa_attention
from rsa_cases import check_case, make_inputs, rel_err

# (b, length, h, d, bs, k, causal, mask, bias): several shapes, k in {1, 2, 4, 8},
# with and without padding masks and biases, causal and not.
CASES = [
    (2, 32, 2, 16, 16, 1, False, True, None),
    (1, 64, 3, 32, 16, 2, False, False, None),
    (2, 64, 2, 16, 16, 2, True, True, 2),
    (2, 64, 2, 16, 16, 4, False, True, 1),
    (1, 64, 4, 16, 16, 4, True, False, None),
    (1, 128, 2, 16, 16, 8, True, True, None),
    (1, 128, 2, 16, 16, 8, False, False, 1),
]


@pytest.mark.parametrize("backend", ["interpret", "xla"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}l{}h{}d{}bs{}k{}c{}m{}bias{}".format(*c))
def test_float32_matches_reference(backend, case):
  b, length, h, d, bs, k, causal, mask, bias = case
  check_case(backend, b=b, length=length, h=h, d=d, bs=bs, k=k, causal=causal,
             mask=mask, bias=bias, dtype=jnp.float32)


@pytest.mark.parametrize("backend", ["interpret", "xla"])
@pytest.mark.parametrize("case", [CASES[2], CASES[3]], ids=["causal", "bias"])
def test_bfloat16_matches_reference(backend, case):
  b, length, h, d, bs, k, causal, mask, bias = case
  check_case(backend, b=b, length=length, h=h, d=d, bs=bs, k=k, causal=causal,
             mask=mask, bias=bias, dtype=jnp.bfloat16)


def test_tpu_style_kernels_in_tpu_interpret_mode():
  # The Mosaic kernels (scalar-prefetched block table) need 128-token blocks.
  check_case("interpret_tpu", b=1, length=256, h=2, d=16, bs=128, k=2, causal=True,
             mask=True, bias=1, dtype=jnp.float32)


def test_scale_argument_and_t5_style_bias():
  # T5 uses no 1/sqrt(d) scaling and a shared relative-position bias.
  check_case("interpret", b=2, length=64, h=2, d=16, bs=16, k=2, causal=False,
             mask=True, bias=1, dtype=jnp.float32, scale=1.0)


@pytest.mark.parametrize("backend", ["interpret", "xla"])
def test_fully_masked_rows_are_zero_not_nan(backend):
  got = check_case(backend, b=2, length=64, h=2, d=16, bs=16, k=2, causal=True,
                   mask=True, bias=None, dtype=jnp.float32, empty_row=True)
  assert np.all(np.asarray(got[0])[0] == 0.0)


@pytest.mark.parametrize("backend", ["interpret", "xla"])
@pytest.mark.parametrize("causal", [False, True])
def test_k1_equals_dense_attention(backend, causal):
  b, length, h, d = 2, 32, 2, 16
  q, k, v, _, m, _ = make_inputs(4, b, length, h, d, mask=True)
  layout = make_layout(h, length, 16, 1, seed=0, causal=causal)
  got = rsa_attention(q, k, v, layout, block_size=16, mask=m, causal=causal,
                      backend=backend)
  want = jax.nn.dot_product_attention(q, k, v, mask=m[:, None, None, :],
                                      is_causal=causal, implementation="xla")
  assert rel_err(got, want) <= 1e-5


def test_reference_probabilities_follow_the_layout():
  b, length, h, d = 1, 64, 2, 16
  q, k, v, _, _, _ = make_inputs(5, b, length, h, d)
  layout = make_layout(h, length, 16, 4, seed=0)
  _, probs = reference_rsa(q, k, v, layout, block_size=16, return_probs=True)
  probs = np.asarray(probs)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
  for hh in range(h):
    for i in range(4):
      for j in range(4):
        blk = probs[0, hh, i * 16:(i + 1) * 16, j * 16:(j + 1) * 16]
        assert (blk > 0).all() if j in layout[hh, i] else (blk == 0).all()


@pytest.mark.parametrize("bad,match", [
    (dict(length=40), "not divisible by block_size"),
    (dict(backend="cuda"), "backend must be one of"),
    (dict(backend="pallas"), "needs a GPU or TPU"),
    (dict(mask_shape=(2, 16)), "mask must be"),
    (dict(bias_shape=(3, 2, 32, 32)), "bias must be"),
    (dict(layout_shape=(2, 3, 1)), "layout: expected shape"),
])
def test_bad_input_raises(bad, match):
  length = bad.get("length", 32)
  q, k, v, _, _, _ = make_inputs(0, 2, length, 2, 16)
  layout = np.zeros(bad.get("layout_shape", (2, 2, 1)), np.int32)
  mask = jnp.ones(bad["mask_shape"]) if "mask_shape" in bad else None
  bias = jnp.zeros(bad["bias_shape"]) if "bias_shape" in bad else None
  if jax.default_backend() != "cpu" and bad.get("backend") == "pallas":
    pytest.skip("'pallas' is valid on GPU/TPU")
  with pytest.raises(ValueError, match=match):
    rsa_attention(q, k, v, layout, block_size=16, mask=mask, bias=bias,
                  backend=bad.get("backend", "xla"))


@pytest.mark.parametrize("backend", ["interpret", "xla"])
def test_layout_traced_under_jit(backend):
  # A layout passed as a jit argument is traced: the tables are then built with jnp
  # and the inverse table keeps its worst-case width.
  b, length, h, d, bs = 1, 64, 2, 16, 16
  q, k, v, g, m, _ = make_inputs(9, b, length, h, d, mask=True)
  layout = make_layout(h, length, bs, 2, seed=4, causal=True)

  def loss(fn, q, k, v, layout):
    return jnp.sum(fn(q, k, v, layout, block_size=bs, mask=m, causal=True) * g)

  got = jax.jit(jax.grad(lambda *a: loss(
      lambda *x, **kw: rsa_attention(*x, backend=backend, **kw), *a),
      argnums=(0, 1, 2)))(q, k, v, jnp.asarray(layout))
  want = jax.grad(lambda *a: loss(reference_rsa, *a), argnums=(0, 1, 2))(
      q, k, v, layout)
  for x, y in zip(got, want):
    assert rel_err(x, y) <= 1e-5


def test_auto_backend_by_platform():
  from etjax.pallas.rsa import resolve_backend
  expect = {"cpu": "xla", "gpu": "triton", "tpu": "mosaic"}[jax.default_backend()]
  assert resolve_backend("auto") == expect
  assert resolve_backend("interpret") == "interpret"
