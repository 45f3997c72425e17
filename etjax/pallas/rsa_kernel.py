"""RSA Pallas kernels in the GPU (Triton) style; also what interpret mode runs.

One program handles one (batch, head, block) triple and walks the block table in a
loop, slicing the selected blocks out of the whole per-head K/V (or Q/dO) rows it
holds, as the flash-attention kernels in jax.experimental.pallas.ops.gpu do:

- forward, per query block: online softmax over the selected key blocks; writes the
  output and the log-sum-exp (lse) for the backward pass;
- dq, per query block: recomputes the probabilities from lse and accumulates dq (and
  writes the score gradients of each selected block when there is a bias to
  differentiate);
- dk/dv, per key block: walks the inverse table (the query blocks that chose it).

All arrays are [batch, heads, length, head_dim]; lse and delta are [B, H, Lq]. The
Triton lowering needs power-of-two block_size and head_dim of at least 16.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

# A finite "minus infinity": masked scores never produce inf - inf = NaN.
NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)


class KernelConfig(NamedTuple):
  """Static settings shared by the kernels (hashable, for custom_vjp)."""
  block_size: int
  causal: bool
  scale: float
  has_mask: bool
  has_bias: bool
  bias_batched: bool


def mm(a, b, contract_a: int = 1, contract_b: int = 0):
  """2-D matmul with float32 accumulation; contract_* pick the summed axis."""
  precision = (lax.Precision.HIGHEST if a.dtype == jnp.float32
               else lax.Precision.DEFAULT)
  return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                         preferred_element_type=jnp.float32, precision=precision)


def block_scores(cfg: KernelConfig, q, k, q_block, k_block, mask_1k, bias_blk):
  """Scaled scores [bs, bs] of one block pair and what they may attend (or None).

  `mask_1k` is the key block's padding mask as [1, bs] (or None), `bias_blk` the
  bias block [bs, bs] (or None); both kernel styles share this function.
  """
  bs = cfg.block_size
  s = mm(q, k, 1, 1) * cfg.scale
  if bias_blk is not None:
    s = s + bias_blk.astype(jnp.float32)
  allowed = None
  if mask_1k is not None:
    allowed = jnp.broadcast_to(mask_1k != 0, (bs, bs))
  if cfg.causal:
    q_pos = q_block * bs + lax.broadcasted_iota(jnp.int32, (bs, bs), 0)
    k_pos = k_block * bs + lax.broadcasted_iota(jnp.int32, (bs, bs), 1)
    c = q_pos >= k_pos
    allowed = c if allowed is None else allowed & c
  return s, allowed


def _probs(s, allowed, lse):
  p = jnp.exp(s - lse[:, None])
  return p if allowed is None else jnp.where(allowed, p, 0.0)


def _split_optional(cfg, refs):
  refs = list(refs)
  mask_ref = refs.pop(0) if cfg.has_mask else None
  bias_ref = refs.pop(0) if cfg.has_bias else None
  return mask_ref, bias_ref, refs


def _fwd_kernel(lay_ref, cnt_ref, q_ref, k_ref, v_ref, *refs, cfg: KernelConfig):
  mask_ref, bias_ref, (o_ref, lse_ref) = _split_optional(cfg, refs)
  bs = cfg.block_size
  i = pl.program_id(2)
  q = q_ref[...]

  def body(slot, carry):
    acc, m, l = carry
    j = lay_ref[slot]
    ks = pl.ds(pl.multiple_of(j * bs, bs), bs)
    s, allowed = block_scores(
        cfg, q, k_ref[ks, :], i, j,
        None if mask_ref is None else mask_ref[ks][None, :],
        None if bias_ref is None else bias_ref[:, ks])
    if allowed is not None:
      s = jnp.where(allowed, s, NEG_INF)
    m_new = jnp.maximum(m, s.max(axis=-1))
    corr = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[:, None])
    if allowed is not None:
      p = jnp.where(allowed, p, 0.0)
    v = v_ref[ks, :]
    acc = acc * corr[:, None] + mm(p.astype(v.dtype), v)
    return acc, m_new, l * corr + p.sum(axis=-1)

  d = q_ref.shape[-1]
  init = (jnp.zeros((bs, d), jnp.float32), jnp.full((bs,), NEG_INF, jnp.float32),
          jnp.zeros((bs,), jnp.float32))
  acc, m, l = lax.fori_loop(0, cnt_ref[0], body, init)
  empty = l == 0.0
  o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
  # A row that may attend nothing gets lse = +inf, so exp(s - lse) = 0 in backward.
  lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))


def _dq_kernel(lay_ref, cnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
               *refs, cfg: KernelConfig):
  mask_ref, bias_ref, outs = _split_optional(cfg, refs)
  dq_ref = outs[0]
  ds_ref = outs[1] if cfg.has_bias else None
  bs = cfg.block_size
  i = pl.program_id(2)
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]

  def body(slot, dq):
    j = lay_ref[slot]
    ks = pl.ds(pl.multiple_of(j * bs, bs), bs)
    k, v = k_ref[ks, :], v_ref[ks, :]
    s, allowed = block_scores(
        cfg, q, k, i, j, None if mask_ref is None else mask_ref[ks][None, :],
        None if bias_ref is None else bias_ref[:, ks])
    p = _probs(s, allowed, lse)
    ds = p * (mm(do, v, 1, 1) - delta[:, None])
    if ds_ref is not None:
      ds_ref[:, pl.ds(pl.multiple_of(slot * bs, bs), bs)] = ds.astype(ds_ref.dtype)
    return dq + mm(ds.astype(k.dtype), k)

  count = cnt_ref[0]
  dq = lax.fori_loop(0, count, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)
  if ds_ref is not None:
    def zero(slot, carry):
      ds_ref[:, pl.ds(pl.multiple_of(slot * bs, bs), bs)] = jnp.zeros(
          (bs, bs), ds_ref.dtype)
      return carry
    lax.fori_loop(count, lay_ref.shape[0], zero, 0)


def _dkv_kernel(inv_ref, icnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                *refs, cfg: KernelConfig):
  mask_ref, bias_ref, (dk_ref, dv_ref) = _split_optional(cfg, refs)
  bs = cfg.block_size
  j = pl.program_id(2)
  k, v = k_ref[...], v_ref[...]
  mask_row = None if mask_ref is None else mask_ref[...][None, :]
  ks = pl.ds(pl.multiple_of(j * bs, bs), bs)

  def body(t, carry):
    dk, dv = carry
    i = inv_ref[t]
    qs = pl.ds(pl.multiple_of(i * bs, bs), bs)
    q, do = q_ref[qs, :], do_ref[qs, :]
    s, allowed = block_scores(cfg, q, k, i, j, mask_row,
                              None if bias_ref is None else bias_ref[qs, ks])
    p = _probs(s, allowed, lse_ref[qs])
    dv = dv + mm(p.astype(do.dtype), do, 0, 0)
    ds = p * (mm(do, v, 1, 1) - delta_ref[qs][:, None])
    return dk + mm(ds.astype(q.dtype), q, 0, 0), dv

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, icnt_ref[0], body, (zeros, zeros))
  dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _optional_specs(cfg, lq, lk, per_query_block: bool):
  """Specs of the mask [B, Lk] and bias [Bb, H, Lq, Lk] inputs."""
  bs = cfg.block_size
  specs = []
  if cfg.has_mask:
    if per_query_block:
      specs.append(pl.BlockSpec((None, lk), lambda b, h, i: (b, 0)))
    else:
      specs.append(pl.BlockSpec((None, bs), lambda b, h, j: (b, j)))
  if cfg.has_bias:
    bb = (lambda b: b) if cfg.bias_batched else (lambda b: 0)
    if per_query_block:
      specs.append(pl.BlockSpec((None, None, bs, lk), lambda b, h, i: (bb(b), h, i, 0)))
    else:
      specs.append(pl.BlockSpec((None, None, lq, lk), lambda b, h, j: (bb(b), h, 0, 0)))
  return specs


def _compiler_params(interpret: bool, d: int):
  if interpret:
    return None
  from jax.experimental.pallas import triton as plgpu
  return plgpu.CompilerParams(num_warps=4 if d <= 64 else 8, num_stages=2)


def forward(cfg: KernelConfig, q, k, v, mask, bias, lay, cnt, *, interpret: bool):
  """Returns (out [B, H, Lq, D], lse float32 [B, H, Lq])."""
  b, h, lq, d = q.shape
  lk = k.shape[2]
  bs, w = cfg.block_size, lay.shape[-1]
  row = lambda b_, h_, i: (b_, h_, i, 0)
  whole = lambda b_, h_, i: (b_, h_, 0, 0)
  in_specs = [
      pl.BlockSpec((None, None, w), lambda b_, h_, i: (h_, i, 0)),
      pl.BlockSpec((None, None, 1), lambda b_, h_, i: (h_, i, 0)),
      pl.BlockSpec((None, None, bs, d), row),
      pl.BlockSpec((None, None, lk, d), whole),
      pl.BlockSpec((None, None, lk, d), whole),
  ] + _optional_specs(cfg, lq, lk, per_query_block=True)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg),
      grid=(b, h, lq // bs),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, None, bs, d), row),
                 pl.BlockSpec((None, None, bs), lambda b_, h_, i: (b_, h_, i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, lq), jnp.float32)],
      compiler_params=_compiler_params(interpret, d),
      interpret=interpret,
      name="rsa_forward",
  )(lay, cnt, q, k, v, *[x for x in (mask, bias) if x is not None])


def backward(cfg: KernelConfig, q, k, v, mask, bias, tables, lse, delta, do, *,
             interpret: bool):
  """Returns (dq, dk, dv) like q, k, v and the score gradients of the selected
  blocks [B, H, Lq, w * bs] in float32 when there is a bias (else None)."""
  b, h, lq, d = q.shape
  lk = k.shape[2]
  bs = cfg.block_size
  w, wi = tables.layout.shape[-1], tables.inverse.shape[-1]
  opt = [x for x in (mask, bias) if x is not None]
  params = _compiler_params(interpret, d)
  row = lambda b_, h_, i: (b_, h_, i, 0)
  whole = lambda b_, h_, i: (b_, h_, 0, 0)
  table = lambda n: pl.BlockSpec((None, None, n), lambda b_, h_, i: (h_, i, 0))
  vec_row = pl.BlockSpec((None, None, bs), lambda b_, h_, i: (b_, h_, i))
  vec_whole = pl.BlockSpec((None, None, lq), lambda b_, h_, i: (b_, h_, 0))

  out_specs = [pl.BlockSpec((None, None, bs, d), row)]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
  if cfg.has_bias:
    out_specs.append(pl.BlockSpec((None, None, bs, w * bs), row))
    out_shape.append(jax.ShapeDtypeStruct((b, h, lq, w * bs), jnp.float32))
  dq_out = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg),
      grid=(b, h, lq // bs),
      in_specs=[table(w), table(1), pl.BlockSpec((None, None, bs, d), row),
                pl.BlockSpec((None, None, lk, d), whole),
                pl.BlockSpec((None, None, lk, d), whole),
                pl.BlockSpec((None, None, bs, d), row), vec_row, vec_row]
               + _optional_specs(cfg, lq, lk, per_query_block=True),
      out_specs=out_specs, out_shape=out_shape, compiler_params=params,
      interpret=interpret, name="rsa_backward_dq",
  )(tables.layout, tables.counts, q, k, v, do, lse, delta, *opt)

  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg),
      grid=(b, h, lk // bs),
      in_specs=[table(wi), table(1), pl.BlockSpec((None, None, lq, d), whole),
                pl.BlockSpec((None, None, bs, d), row),
                pl.BlockSpec((None, None, bs, d), row),
                pl.BlockSpec((None, None, lq, d), whole), vec_whole, vec_whole]
               + _optional_specs(cfg, lq, lk, per_query_block=False),
      out_specs=[pl.BlockSpec((None, None, bs, d), row)] * 2,
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=params, interpret=interpret, name="rsa_backward_dkv",
  )(tables.inverse, tables.inverse_counts, q, k, v, do, lse, delta, *opt)
  ds = dq_out[1] if cfg.has_bias else None
  return dq_out[0], dk, dv, ds


def scatter_score_grads(ds_bhqx, layout, block_size: int, kv_len: int,
                        bias_batch: int) -> jax.Array:
  """Scatters per-slot score gradients [B, H, Lq, w*bs] into a dense bias gradient
  [bias_batch, H, Lq, Lk] (summed over the batch when the bias is shared)."""
  b, h, lq, _ = ds_bhqx.shape
  bs = block_size
  nq, w = layout.shape[1], layout.shape[2]
  ds = ds_bhqx.reshape(b, h, nq, bs, w, bs)
  if bias_batch == 1 and b > 1:
    ds = ds.sum(axis=0, keepdims=True)
  idx = jnp.maximum(layout, 0)
  dense = jnp.zeros((ds.shape[0], h, nq, kv_len // bs, bs, bs), jnp.float32)
  hh = jnp.arange(h)[:, None, None]
  ii = jnp.arange(nq)[None, :, None]
  # dense[:, h, i, idx[h,i,s], t, u] += ds[:, h, i, t, s, u]; empty slots carry 0.
  dense = dense.at[:, hh, ii, idx].add(ds.transpose(0, 1, 2, 4, 3, 5))
  return dense.transpose(0, 1, 2, 4, 3, 5).reshape(ds.shape[0], h, lq, kv_len)


def delta_of(out, do) -> jax.Array:
  """rowsum(out * dout) [B, H, Lq] in float32, the softmax backward's correction."""
  return (out.astype(jnp.float32) * do.astype(jnp.float32)).sum(axis=-1)

