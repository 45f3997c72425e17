"""RSA Pallas kernels in the TPU (Mosaic) style.

On TPU the block table goes through scalar prefetch (SMEM) and the selected blocks
are fetched by the BlockSpec pipeline: the grid has one axis over the table's slots
(`arbitrary`, the reduction axis), and the K/V (or Q/dO) index maps read the table,
so each step DMAs exactly one selected block while the previous one is computed.
Slots past a row's count re-point to its last valid block (no new DMA) and are
skipped with `pl.when`. Accumulators live in VMEM scratch.

Mosaic needs block_size a multiple of 128 (the key-padding mask is a [1, bs] lane
block) and head_dim a multiple of 128 or the full width. lse and delta travel as
[B, H, Lq, 1]. The same kernels run on CPU with `pltpu.InterpretParams()`
(backend 'interpret_tpu'), which is how tests check them here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from etjax.pallas.rsa_kernel import NEG_INF, KernelConfig, block_scores, mm


def _table_entry(tab_ref, cnt_ref, h, r, s, rows, width):
  """Block index at slot s of row (h, r), clamped to the row's last valid slot."""
  c = cnt_ref[h * rows + r]
  s = jnp.minimum(s, jnp.maximum(c - 1, 0))
  return jnp.maximum(tab_ref[(h * rows + r) * width + s], 0)


def _split(cfg, refs):
  refs = list(refs)
  mask_ref = refs.pop(0) if cfg.has_mask else None
  bias_ref = refs.pop(0) if cfg.has_bias else None
  return mask_ref, bias_ref, refs


def _fwd_kernel(lay_ref, cnt_ref, q_ref, k_ref, v_ref, *refs, cfg, nq, w):
  mask_ref, bias_ref, (o_ref, lse_ref, m_sc, l_sc, acc_sc) = _split(cfg, refs)
  h, i, s = pl.program_id(1), pl.program_id(2), pl.program_id(3)

  @pl.when(s == 0)
  def _():
    m_sc[...] = jnp.full(m_sc.shape, NEG_INF, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  @pl.when(s < cnt_ref[h * nq + i])
  def _():
    j = lay_ref[(h * nq + i) * w + s]
    sc, allowed = block_scores(
        cfg, q_ref[...], k_ref[...], i, j,
        None if mask_ref is None else mask_ref[...],
        None if bias_ref is None else bias_ref[...])
    if allowed is not None:
      sc = jnp.where(allowed, sc, NEG_INF)
    m_prev = m_sc[...]
    m_new = jnp.maximum(m_prev, sc.max(axis=-1, keepdims=True))
    corr = jnp.exp(m_prev - m_new)
    p = jnp.exp(sc - m_new)
    if allowed is not None:
      p = jnp.where(allowed, p, 0.0)
    v = v_ref[...]
    acc_sc[...] = acc_sc[...] * corr + mm(p.astype(v.dtype), v)
    l_sc[...] = l_sc[...] * corr + p.sum(axis=-1, keepdims=True)
    m_sc[...] = m_new

  @pl.when(s == w - 1)
  def _():
    l = l_sc[...]
    empty = l == 0.0
    o_ref[...] = (acc_sc[...] / jnp.where(empty, 1.0, l)).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf,
                             m_sc[...] + jnp.log(jnp.where(empty, 1.0, l)))


def _dq_kernel(lay_ref, cnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
               *refs, cfg, nq, w):
  mask_ref, bias_ref, outs = _split(cfg, refs)
  dq_ref, rest = outs[0], outs[1:]
  ds_ref = rest.pop(0) if cfg.has_bias else None
  (dq_sc,) = rest
  h, i, s = pl.program_id(1), pl.program_id(2), pl.program_id(3)
  valid = s < cnt_ref[h * nq + i]

  @pl.when(s == 0)
  def _():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  @pl.when(valid)
  def _():
    j = lay_ref[(h * nq + i) * w + s]
    k, v = k_ref[...], v_ref[...]
    sc, allowed = block_scores(
        cfg, q_ref[...], k, i, j, None if mask_ref is None else mask_ref[...],
        None if bias_ref is None else bias_ref[...])
    p = jnp.exp(sc - lse_ref[...])
    if allowed is not None:
      p = jnp.where(allowed, p, 0.0)
    ds = p * (mm(do_ref[...], v, 1, 1) - delta_ref[...])
    if ds_ref is not None:
      ds_ref[...] = ds.astype(ds_ref.dtype)
    dq_sc[...] = dq_sc[...] + mm(ds.astype(k.dtype), k)

  if ds_ref is not None:
    @pl.when(jnp.logical_not(valid))
    def _():
      ds_ref[...] = jnp.zeros(ds_ref.shape, ds_ref.dtype)

  @pl.when(s == w - 1)
  def _():
    dq_ref[...] = (dq_sc[...] * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(inv_ref, icnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                *refs, cfg, nk, wi):
  mask_ref, bias_ref, (dk_ref, dv_ref, dk_sc, dv_sc) = _split(cfg, refs)
  h, j, t = pl.program_id(1), pl.program_id(2), pl.program_id(3)

  @pl.when(t == 0)
  def _():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  @pl.when(t < icnt_ref[h * nk + j])
  def _():
    i = inv_ref[(h * nk + j) * wi + t]
    q, do = q_ref[...], do_ref[...]
    sc, allowed = block_scores(
        cfg, q, k_ref[...], i, j, None if mask_ref is None else mask_ref[...],
        None if bias_ref is None else bias_ref[...])
    p = jnp.exp(sc - lse_ref[...])
    if allowed is not None:
      p = jnp.where(allowed, p, 0.0)
    dv_sc[...] = dv_sc[...] + mm(p.T.astype(do.dtype), do)
    ds = p * (mm(do, v_ref[...], 1, 1) - delta_ref[...])
    dk_sc[...] = dk_sc[...] + mm(ds.T.astype(q.dtype), q)

  @pl.when(t == wi - 1)
  def _():
    dk_ref[...] = (dk_sc[...] * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _optional(cfg, pick):
  """Specs for mask [B, 1, Lk] and bias [Bb, H, Lq, Lk]; pick(b, h, r, s, tab, cnt)
  returns the (query block, key block) a grid step works on."""
  bs = cfg.block_size
  specs = []
  if cfg.has_mask:
    specs.append(pl.BlockSpec(
        (None, 1, bs), lambda b, h, r, s, tab, cnt: (b, 0, pick(h, r, s, tab, cnt)[1])))
  if cfg.has_bias:
    bb = (lambda b: b) if cfg.bias_batched else (lambda b: 0)
    specs.append(pl.BlockSpec(
        (None, None, bs, bs),
        lambda b, h, r, s, tab, cnt: (bb(b), h) + pick(h, r, s, tab, cnt)))
  return specs


def _params(interpret):
  return (pltpu.InterpretParams() if interpret else False,
          pltpu.CompilerParams(
              dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")))


def forward(cfg: KernelConfig, q, k, v, mask, bias, tables, *, interpret: bool):
  """Returns (out [B, H, Lq, D], lse float32 [B, H, Lq])."""
  b, h, lq, d = q.shape
  bs, (_, nq, w) = cfg.block_size, tables.layout.shape
  key = lambda hh, r, s, tab, cnt: (r, _table_entry(tab, cnt, hh, r, s, nq, w))
  blk = lambda bb, hh, r, s, tab, cnt: (bb, hh, r, 0)
  kv = lambda bb, hh, r, s, tab, cnt: (bb, hh, key(hh, r, s, tab, cnt)[1], 0)
  interp, params = _params(interpret)
  o, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg, nq=nq, w=w),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(b, h, nq, w),
          in_specs=[pl.BlockSpec((None, None, bs, d), blk),
                    pl.BlockSpec((None, None, bs, d), kv),
                    pl.BlockSpec((None, None, bs, d), kv)] + _optional(cfg, key),
          out_specs=[pl.BlockSpec((None, None, bs, d), blk),
                     pl.BlockSpec((None, None, bs, 1), blk)],
          scratch_shapes=[pltpu.VMEM((bs, 1), jnp.float32),
                          pltpu.VMEM((bs, 1), jnp.float32),
                          pltpu.VMEM((bs, d), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, lq, 1), jnp.float32)],
      compiler_params=params, interpret=interp, name="rsa_forward_tpu",
  )(tables.layout.reshape(-1), tables.counts.reshape(-1), q, k, v,
    *[x for x in (mask, bias) if x is not None])
  return o, lse[..., 0]


def backward(cfg: KernelConfig, q, k, v, mask, bias, tables, lse, delta, do, *,
             interpret: bool):
  """Returns (dq, dk, dv, score grads [B, H, Lq, w * bs] or None), as
  rsa_kernel.backward."""
  b, h, lq, d = q.shape
  bs = cfg.block_size
  _, nq, w = tables.layout.shape
  _, nk, wi = tables.inverse.shape
  opt = [x for x in (mask, bias) if x is not None]
  lse4, delta4 = lse[..., None], delta[..., None]
  interp, params = _params(interpret)

  key = lambda hh, r, s, tab, cnt: (r, _table_entry(tab, cnt, hh, r, s, nq, w))
  blk = lambda bb, hh, r, s, tab, cnt: (bb, hh, r, 0)
  kv = lambda bb, hh, r, s, tab, cnt: (bb, hh, key(hh, r, s, tab, cnt)[1], 0)
  out_specs = [pl.BlockSpec((None, None, bs, d), blk)]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
  if cfg.has_bias:
    out_specs.append(pl.BlockSpec((None, None, bs, bs),
                                  lambda bb, hh, r, s, tab, cnt: (bb, hh, r, s)))
    out_shape.append(jax.ShapeDtypeStruct((b, h, lq, w * bs), jnp.float32))
  dq_out = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg, nq=nq, w=w),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(b, h, nq, w),
          in_specs=[pl.BlockSpec((None, None, bs, d), blk),
                    pl.BlockSpec((None, None, bs, d), kv),
                    pl.BlockSpec((None, None, bs, d), kv),
                    pl.BlockSpec((None, None, bs, d), blk),
                    pl.BlockSpec((None, None, bs, 1), blk),
                    pl.BlockSpec((None, None, bs, 1), blk)] + _optional(cfg, key),
          out_specs=out_specs,
          scratch_shapes=[pltpu.VMEM((bs, d), jnp.float32)]),
      out_shape=out_shape, compiler_params=params, interpret=interp,
      name="rsa_backward_dq_tpu",
  )(tables.layout.reshape(-1), tables.counts.reshape(-1), q, k, v, do, lse4, delta4,
    *opt)

  qry = lambda hh, r, s, tab, cnt: (_table_entry(tab, cnt, hh, r, s, nk, wi), r)
  own = lambda bb, hh, r, s, tab, cnt: (bb, hh, r, 0)
  qrow = lambda bb, hh, r, s, tab, cnt: (bb, hh, qry(hh, r, s, tab, cnt)[0], 0)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg, nk=nk, wi=wi),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(b, h, nk, wi),
          in_specs=[pl.BlockSpec((None, None, bs, d), qrow),
                    pl.BlockSpec((None, None, bs, d), own),
                    pl.BlockSpec((None, None, bs, d), own),
                    pl.BlockSpec((None, None, bs, d), qrow),
                    pl.BlockSpec((None, None, bs, 1), qrow),
                    pl.BlockSpec((None, None, bs, 1), qrow)] + _optional(cfg, qry),
          out_specs=[pl.BlockSpec((None, None, bs, d), own)] * 2,
          scratch_shapes=[pltpu.VMEM((bs, d), jnp.float32),
                          pltpu.VMEM((bs, d), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=params, interpret=interp, name="rsa_backward_dkv_tpu",
  )(tables.inverse.reshape(-1), tables.inverse_counts.reshape(-1), q, k, v, do,
    lse4, delta4, *opt)
  return dq_out[0], dk, dv, (dq_out[1] if cfg.has_bias else None)
