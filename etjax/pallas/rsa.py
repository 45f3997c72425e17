"""Random Sparse Attention (RSA): layouts, kernels with forward and backward, reference.

RSA cuts the attention matrix into blocks and lets each query block attend to a
random 1/k of the key blocks, dealt over the heads (layout rules in
`etjax.pallas.rsa_layout`), so memory and FLOPs drop from O(n^2) to O(n^2 / k).

Public entry points:
- `make_layout(num_heads, seq_len, block_size, k, seed, causal=False)`;
- `rsa_attention(q, k, v, layout, *, block_size, ...)`, q/k/v [B, L, H, D];
- `rsa_attention_sharded(...)`: the same per device under a mesh (shard_map, heads on
  'model', batch on 'dcn_data', 'data' and 'fsdp');
- `reference_rsa(...)`: dense attention with the layout as a block mask, for tests.

Backends of `rsa_attention`:
- 'pallas': the Pallas kernels, lowered with Triton on GPU (rsa_kernel) or Mosaic on
  TPU (rsa_tpu, block table through scalar prefetch); an error elsewhere;
- 'interpret': the GPU-style kernels in Pallas interpret mode (any platform; tests);
- 'interpret_tpu': the TPU-style kernels in TPU interpret mode (any platform; tests);
- 'xla': gather-based block-sparse attention in XLA (rsa_xla), O(n^2 / k) memory;
- 'auto': 'pallas' on GPU and TPU, 'xla' elsewhere.

The kernel backends keep the log-sum-exp from the forward pass and differentiate
through `jax.custom_vjp` with a dq kernel (per query block) and a dk/dv kernel (per
key block, over the inverse block table). An additive `bias` (e.g. T5's relative
position bias) is supported and differentiated on every backend. Query rows that may
attend to nothing (padding, causal, empty slots) return zeros, never NaN. Lengths
must be multiples of `block_size` (a ValueError says so); pad and mask otherwise.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from etjax.pallas import rsa_kernel, rsa_tpu
from etjax.pallas.rsa_kernel import KernelConfig
from etjax.pallas.rsa_layout import (Tables, expand_layout, make_layout, make_tables,
                                     num_blocks, validate_layout)
from etjax.pallas.rsa_xla import reference_rsa, xla_rsa

__all__ = ["BACKENDS", "make_layout", "expand_layout", "rsa_attention",
           "rsa_attention_sharded", "reference_rsa"]

BACKENDS = ("auto", "pallas", "interpret", "interpret_tpu", "xla")
# Mesh axes that split the batch under rsa_attention_sharded (missing ones skipped).
BATCH_AXES = ("dcn_data", "data", "fsdp")
_GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def resolve_backend(backend: str) -> str:
  """Maps a backend name to an implementation: triton, mosaic, interpret,
  interpret_tpu or xla."""
  if backend not in BACKENDS:
    raise ValueError(f"RSA backend must be one of {BACKENDS}, got {backend!r}")
  platform = jax.default_backend()
  native = ("triton" if platform in _GPU_PLATFORMS
            else "mosaic" if platform == "tpu" else None)
  if backend == "auto":
    return native or "xla"
  if backend == "pallas":
    if native is None:
      raise ValueError(f"RSA backend 'pallas' needs a GPU or TPU, but JAX runs on "
                       f"{platform!r}; use 'xla' (fast) or 'interpret' (tests)")
    return native
  return backend


def _check_kernel_shapes(impl: str, block_size: int, lk: int, d: int) -> None:
  pow2 = lambda n: n >= 16 and n & (n - 1) == 0
  if impl == "triton" and not (pow2(block_size) and pow2(d)):
    raise ValueError(f"RSA Triton kernel needs block_size and head_dim powers of two "
                     f">= 16, got block_size={block_size}, head_dim={d}")
  if impl in ("mosaic", "interpret_tpu") and block_size % 128 and block_size != lk:
    raise ValueError(f"RSA TPU kernel needs block_size a multiple of 128, got "
                     f"{block_size}")


def _validate(q, k, v, layout, block_size, mask, bias):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"RSA: q, k, v must be [batch, length, heads, head_dim], got "
                     f"{q.shape}, {k.shape}, {v.shape}")
  b, lq, h, d = q.shape
  if k.shape != v.shape or k.shape[0] != b or k.shape[2:] != (h, d):
    raise ValueError(f"RSA: k and v must be [batch={b}, kv_len, heads={h}, "
                     f"head_dim={d}], got k {k.shape}, v {v.shape}")
  lk = k.shape[1]
  nq = num_blocks(lq, block_size, "query length")
  nk = num_blocks(lk, block_size, "key length")
  validate_layout(layout, h, nq, nk)
  if mask is not None and mask.shape != (b, lk):
    raise ValueError(f"RSA: mask must be [batch={b}, kv_len={lk}], got {mask.shape}")
  if bias is not None and (bias.ndim != 4 or bias.shape[0] not in (1, b)
                           or bias.shape[1:] != (h, lq, lk)):
    raise ValueError(f"RSA: bias must be [{b} or 1, heads={h}, q_len={lq}, "
                     f"kv_len={lk}], got {bias.shape}")
  return nk


def _kernel_forward(cfg, impl, q, k, v, bias, mask, tables):
  if impl in ("mosaic", "interpret_tpu"):
    mask = None if mask is None else mask[:, None, :]
    return rsa_tpu.forward(cfg, q, k, v, mask, bias, tables,
                           interpret=impl == "interpret_tpu")
  return rsa_kernel.forward(cfg, q, k, v, mask, bias, tables.layout, tables.counts,
                            interpret=impl == "interpret")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _rsa_core(cfg, impl, q, k, v, bias, mask, tables):
  return _kernel_forward(cfg, impl, q, k, v, bias, mask, tables)[0]


def _rsa_core_fwd(cfg, impl, q, k, v, bias, mask, tables):
  out, lse = _kernel_forward(cfg, impl, q, k, v, bias, mask, tables)
  return out, (q, k, v, bias, mask, tables, out, lse)


def _rsa_core_bwd(cfg, impl, res, do):
  q, k, v, bias, mask, tables, out, lse = res
  delta = rsa_kernel.delta_of(out, do)
  if impl in ("mosaic", "interpret_tpu"):
    dq, dk, dv, ds = rsa_tpu.backward(
        cfg, q, k, v, None if mask is None else mask[:, None, :], bias, tables, lse,
        delta, do, interpret=impl == "interpret_tpu")
  else:
    dq, dk, dv, ds = rsa_kernel.backward(cfg, q, k, v, mask, bias, tables, lse, delta,
                                         do, interpret=impl == "interpret")
  dbias = None
  if bias is not None:
    dbias = rsa_kernel.scatter_score_grads(ds, tables.layout, cfg.block_size,
                                           k.shape[2], bias.shape[0])
    dbias = dbias.astype(bias.dtype)
  return dq, dk, dv, dbias, None, None


_rsa_core.defvjp(_rsa_core_fwd, _rsa_core_bwd)


def _attend(q, k, v, tables: Tables, *, block_size, mask, bias, causal, scale, impl,
            dropout_rate=0.0, dropout_rng=None):
  """rsa_attention on prepared tables (shared by the plain and sharded entries)."""
  d = q.shape[-1]
  scale = d ** -0.5 if scale is None else float(scale)
  if impl == "xla":
    return xla_rsa(q, k, v, tables.layout, block_size=block_size, mask=mask,
                   bias=bias, causal=causal, scale=scale, dropout_rate=dropout_rate,
                   dropout_rng=dropout_rng)
  if dropout_rate > 0.0 and dropout_rng is not None:
    raise ValueError("RSA: the Pallas kernels have no attention dropout; use "
                     "backend='xla' for dropout on the attention probabilities")
  _check_kernel_shapes(impl, block_size, k.shape[1], d)
  cfg = KernelConfig(block_size=block_size, causal=bool(causal), scale=scale,
                     has_mask=mask is not None, has_bias=bias is not None,
                     bias_batched=bias is not None and bias.shape[0] > 1)
  to_bhld = lambda x: x.transpose(0, 2, 1, 3)
  mask = None if mask is None else (mask != 0).astype(jnp.int32)
  out = _rsa_core(cfg, impl, to_bhld(q), to_bhld(k), to_bhld(v), bias, mask, tables)
  return to_bhld(out)


def rsa_attention(q, k, v, layout, *, block_size: int, mask=None, bias=None,
                  causal: bool = False, scale: Optional[float] = None,
                  backend: str = "auto", dropout_rate: float = 0.0,
                  dropout_rng=None) -> jax.Array:
  """Random sparse attention of q over the key blocks the layout selects.

  Args:
    q: [B, Lq, H, D] queries; k, v: [B, Lk, H, D]. float32 or bfloat16.
    layout: int32 [H, Lq // block_size, w] key-block indices, -1 = empty slot (from
      `make_layout`). A concrete (numpy) layout gives the tightest inverse table.
    block_size: tokens per block; must divide Lq and Lk.
    mask: optional key padding mask [B, Lk], nonzero = attend.
    bias: optional additive score bias [B or 1, H, Lq, Lk] (differentiable).
    causal: also mask keys after each query position.
    scale: score scale; default 1 / sqrt(D) (T5 passes 1.0).
    backend: one of BACKENDS (see the module docstring).
    dropout_rate, dropout_rng: dropout on the attention probabilities, 'xla'
      backend only (none when dropout_rng is None).

  Returns:
    [B, Lq, H, D] in q's dtype; rows that may attend nothing are zeros.
  """
  nk = _validate(q, k, v, layout, block_size, mask, bias)
  impl = resolve_backend(backend)
  return _attend(q, k, v, make_tables(layout, nk), block_size=block_size, mask=mask,
                 bias=bias, causal=causal, scale=scale, impl=impl,
                 dropout_rate=dropout_rate, dropout_rng=dropout_rng)


def _mesh_axes(mesh, names: Sequence[str]):
  present = tuple(n for n in names if n in mesh.axis_names)
  size = math.prod(mesh.shape[n] for n in present)
  return (present if present else None), size


def rsa_attention_sharded(q, k, v, layout, *, block_size: int, mesh=None, mask=None,
                          bias=None, causal: bool = False,
                          scale: Optional[float] = None, backend: str = "auto",
                          batch_axes: Sequence[str] = BATCH_AXES,
                          head_axis: str = "model") -> jax.Array:
  """`rsa_attention` run per device with `jax.shard_map`.

  Batch is split over `batch_axes` and heads over `head_axis` (axes missing from the
  mesh are skipped); the block tables are built once and split by head with the
  heads, so each device runs the kernel on its own batch rows and heads.

  Args:
    mesh: a Mesh; default the mesh set with `jax.set_mesh`.
    Others as `rsa_attention`.

  Returns:
    [B, Lq, H, D], sharded like q.
  """
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  if mesh is None or mesh.empty:
    raise ValueError("rsa_attention_sharded: no mesh given and none set with "
                     "jax.set_mesh")
  nk = _validate(q, k, v, layout, block_size, mask, bias)
  impl = resolve_backend(backend)
  b, _, h, _ = q.shape
  batch, nb = _mesh_axes(mesh, batch_axes)
  heads, nh = _mesh_axes(mesh, (head_axis,))
  heads = heads[0] if heads else None
  if b % nb or h % nh:
    raise ValueError(f"rsa_attention_sharded: batch {b} must divide by {nb} (axes "
                     f"{batch}) and heads {h} by {nh} (axis {heads})")
  tables = make_tables(layout, nk)
  qkv = P(batch, None, heads, None)
  table = P(heads, None, None)
  bias_spec = None if bias is None else P(batch if bias.shape[0] > 1 else None,
                                          heads, None, None)

  def per_device(q, k, v, tables, mask, bias):
    return _attend(q, k, v, tables, block_size=block_size, mask=mask, bias=bias,
                   causal=causal, scale=scale, impl=impl)

  return jax.shard_map(
      per_device, mesh=mesh,
      in_specs=(qkv, qkv, qkv, Tables(table, table, table, table),
                None if mask is None else P(batch, None), bias_spec),
      out_specs=qkv, check_vma=False,
  )(q, k, v, tables, mask, bias)
