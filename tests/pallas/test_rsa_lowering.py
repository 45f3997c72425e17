"""The RSA kernels lower for GPU (Triton) and TPU (Mosaic) from this CPU machine.

Cross-platform lowering runs the Pallas -> Triton / Mosaic lowering rules (block
shapes, dot layouts, scalar prefetch) without the hardware; compiling and running the
lowered kernels is left to test_rsa_hardware.py on a GPU or TPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from etjax.pallas import rsa
from etjax.pallas.rsa import make_layout, rsa_attention


@pytest.mark.parametrize("platform,impl,d,bs,custom_call", [
    ("cuda", "triton", 64, 64, "__gpu$xla.gpu.triton"),
    ("tpu", "mosaic", 128, 128, "tpu_custom_call"),
])
def test_forward_and_backward_lower(monkeypatch, platform, impl, d, bs, custom_call):
  monkeypatch.setattr(rsa, "resolve_backend", lambda backend: impl)
  b, n, h = 2, 512, 2
  layout = make_layout(h, n, bs, 2, seed=0, causal=True)
  x = jax.ShapeDtypeStruct((b, n, h, d), jnp.bfloat16)
  mask = jax.ShapeDtypeStruct((b, n), jnp.bool_)
  bias = jax.ShapeDtypeStruct((1, h, n, n), jnp.bfloat16)

  def grads(q, k, v, mask, bias):
    def loss(q, k, v, bias):
      out = rsa_attention(q, k, v, layout, block_size=bs, mask=mask, bias=bias,
                          causal=True, backend="pallas")
      return out.astype(jnp.float32).sum()
    return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, bias)

  text = jax.jit(grads).trace(x, x, x, mask, bias).lower(
      lowering_platforms=(platform,)).as_text()
  # forward, dq and dk/dv kernels
  assert text.count(custom_call) >= 3, text[:2000]
