"""The product of a dense projection, with float32 accumulation in both passes.

`project(x, kernel, n_in)` contracts the last n_in dims of x with the first n_in dims of
the kernel and returns float32, whatever the operands' dtype. Its gradients are
written out instead of left to JAX's transpose rule because that rule multiplies the
float32 cotangent by the bfloat16 operand: XLA then widens the operand and runs the
backward products at float32 speed (on this CPU about 300 GFLOP/s against 1,100-1,300
for bfloat16 x bfloat16 -> float32; benchmarks/RESULTS.md). Here the cotangent is cast
to the operands' dtype first, which is exact whenever the caller rounds the result to
that dtype (as Dense does): the cotangent of `y.astype(bf16)` is a bfloat16 value
widened to float32.

The output is tagged with the checkpoint name PROJECTION_NAME, so that remat policies
can keep it (a custom_vjp hides its dot_general from jax's dots_saveable).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from etjax.models.remat import PROJECTION_NAME


def _contract(n_in: int, x_ndim: int):
  return ((tuple(range(x_ndim - n_in, x_ndim)), tuple(range(n_in))), ((), ()))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _project(x: jax.Array, kernel: jax.Array, n_in: int) -> jax.Array:
  return jax.lax.dot_general(x, kernel, _contract(n_in, x.ndim),
                             preferred_element_type=jnp.float32)


def _project_fwd(x, kernel, n_in):
  return _project(x, kernel, n_in), (x, kernel)


def _project_bwd(n_in, residuals, g):
  x, kernel = residuals
  g = g.astype(x.dtype)
  n_batch = x.ndim - n_in
  n_out = kernel.ndim - n_in
  # dx[*batch, *in] = g[*batch, *out] . kernel[*in, *out] over the out dims.
  out_dims_g = tuple(range(n_batch, n_batch + n_out))
  out_dims_k = tuple(range(n_in, n_in + n_out))
  dx = jax.lax.dot_general(g, kernel, ((out_dims_g, out_dims_k), ((), ())),
                           preferred_element_type=jnp.float32)
  # dkernel[*in, *out] = x[*batch, *in] . g[*batch, *out] over the batch dims.
  batch_dims = tuple(range(n_batch))
  dkernel = jax.lax.dot_general(x, g, ((batch_dims, batch_dims), ((), ())),
                                preferred_element_type=jnp.float32)
  return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


_project.defvjp(_project_fwd, _project_bwd)


def project(x: jax.Array, kernel: jax.Array, n_in: int = 1) -> jax.Array:
  """x [*batch, *in] . kernel [*in, *out] -> float32 [*batch, *out].

  x and kernel share a dtype (the compute dtype); n_in is the number of contracted
  dims. Gradients come back in the operands' dtypes.
  """
  if x.dtype != kernel.dtype:
    raise ValueError(f"project: x is {x.dtype} but kernel is {kernel.dtype}; cast both "
                     "to the compute dtype")
  if tuple(x.shape[x.ndim - n_in:]) != tuple(kernel.shape[:n_in]):
    raise ValueError(f"project: contracted dims of x {x.shape[x.ndim - n_in:]} differ "
                     f"from the kernel's {kernel.shape[:n_in]}")
  return checkpoint_name(_project(x, kernel, n_in), PROJECTION_NAME)
