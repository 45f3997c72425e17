"""The compiled Pallas kernels (Triton on GPU, Mosaic on TPU) against reference_rsa.

These need the hardware: interpret mode cannot show that a kernel lowers and runs
there, so on a CPU-only machine they are skipped (the same kernels are checked in
interpret mode by test_rsa_kernel.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from rsa_cases import check_case

_PLATFORM = jax.default_backend()
gpu = pytest.mark.skipif(_PLATFORM not in ("gpu", "cuda", "rocm"),
                         reason="needs a GPU: the Triton lowering of the RSA kernels")
tpu = pytest.mark.skipif(_PLATFORM != "tpu",
                         reason="needs a TPU: the Mosaic lowering of the RSA kernels")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("causal,mask,bias", [(False, False, None), (True, True, 1),
                                              (False, True, 2)])
def test_triton_kernels(dtype, causal, mask, bias):
  check_case("pallas", b=2, length=512, h=4, d=64, bs=64, k=4, causal=causal,
             mask=mask, bias=bias, dtype=dtype)


@pytest.mark.tpu
@tpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("causal,mask,bias", [(False, False, None), (True, True, 1),
                                              (False, True, 2)])
def test_mosaic_kernels(dtype, causal, mask, bias):
  check_case("pallas", b=2, length=1024, h=4, d=128, bs=128, k=4, causal=causal,
             mask=mask, bias=bias, dtype=dtype)
