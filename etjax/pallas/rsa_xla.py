"""RSA in plain XLA: the dense reference and the gather-based block-sparse path.

Both take q, k, v [batch, length, heads, head_dim] and a block layout (see
rsa_layout) and share the masking and softmax code, so they differ only in which
scores they compute: `reference_rsa` all n^2 of them with the layout expanded to a
block mask (O(n^2) memory), `xla_rsa` only the selected blocks, gathered
(O(n^2 / k) memory), which is the fast path on CPUs and a fallback elsewhere.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from etjax.pallas.dropout import dropout
from etjax.pallas.rsa_layout import expand_layout


def masked_softmax(scores, allowed, axis=-1):
  """Softmax of `scores` over `axis` among `allowed` entries; 0 where not allowed.

  A row with nothing allowed gets all zeros (not NaN), and so do its gradients.

  Returns:
    float32 probabilities with the shape of `scores`.
  """
  scores = scores.astype(jnp.float32)
  masked = jnp.where(allowed, scores, -jnp.inf)
  row_max = jnp.max(masked, axis=axis, keepdims=True)
  row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  # exp of a select, not a select of exp, so masked entries never overflow (inf * 0
  # would be NaN in the gradient).
  e = jnp.where(allowed, jnp.exp(jnp.where(allowed, scores - row_max, 0.0)), 0.0)
  denom = e.sum(axis=axis, keepdims=True)
  return e / jnp.where(denom == 0, 1.0, denom)


def _default_scale(scale, head_dim):
  return head_dim ** -0.5 if scale is None else scale


def reference_rsa(q, k, v, layout, *, block_size: int, mask=None, bias=None,
                  causal: bool = False, scale: Optional[float] = None,
                  return_probs: bool = False):
  """Dense attention restricted to the layout's blocks, in float32; O(n^2).

  Args:
    q: [B, Lq, H, D]; k, v: [B, Lk, H, D].
    layout: int32 [H, Lq // block_size, w] key-block indices (-1 = empty slot).
    block_size: tokens per block.
    mask: optional [B, Lk] key padding mask, nonzero = attend.
    bias: optional additive bias [B or 1, H, Lq, Lk].
    causal: also mask keys after the query position.
    scale: score scale; default 1 / sqrt(D).
    return_probs: also return the probabilities.

  Returns:
    out [B, Lq, H, D] in q's dtype, and with return_probs the float32
    probabilities [B, H, Lq, Lk].
  """
  b, lq, _, d = q.shape
  lk = k.shape[1]
  f32 = jnp.float32
  scores = jnp.einsum("bqhd,bkhd->bhqk", q.astype(f32), k.astype(f32),
                      precision=jax.lax.Precision.HIGHEST)
  scores = scores * _default_scale(scale, d)
  if bias is not None:
    scores = scores + bias.astype(f32)
  allowed = expand_layout(layout, block_size, lk)[None]
  if mask is not None:
    allowed = allowed & (mask != 0)[:, None, None, :]
  if causal:
    allowed = allowed & (jnp.arange(lq)[:, None] >= jnp.arange(lk)[None, :])
  allowed = jnp.broadcast_to(allowed, (b,) + allowed.shape[1:])
  probs = masked_softmax(scores, allowed)
  out = jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(f32),
                   precision=jax.lax.Precision.HIGHEST).astype(q.dtype)
  return (out, probs) if return_probs else out


def xla_rsa(q, k, v, layout, *, block_size: int, mask=None, bias=None,
            causal: bool = False, scale: Optional[float] = None,
            dropout_rate: float = 0.0, dropout_rng=None):
  """Block-sparse RSA in XLA, one layout slot at a time; O(n^2 / k) memory.

  Scores are laid out slot-major, [w, B, H, nq, bs, bs]: a scan over the w slots
  gathers each query block's key block for that slot and multiplies, a softmax runs
  over (slot, key), and a second scan gathers the value blocks and accumulates. The
  scan bodies are rematerialized, so no gathered copy of K or V (each as large as the
  scores) is kept for the backward pass; what remains is the scores and
  probabilities, 1/k of dense attention's.

  Arguments as `reference_rsa`; `dropout_rate` > 0 with a `dropout_rng` drops
  attention probabilities (scaling the kept ones by 1 / (1 - rate)).

  Returns:
    out [B, Lq, H, D] in q's dtype.
  """
  b, lq, h, d = q.shape
  lk = k.shape[1]
  bs = block_size
  nq, nk = lq // bs, lk // bs
  layout = jnp.asarray(layout)
  idx_whi = jnp.moveaxis(jnp.maximum(layout, 0), -1, 0)  # [w, H, nq]
  valid_whi = jnp.moveaxis(layout >= 0, -1, 0)
  blocks = lambda x: x.transpose(0, 2, 1, 3).reshape(b, h, -1, bs, d)
  q_bhitd, k_bhjud, v_bhjud = blocks(q), blocks(k), blocks(v)
  hh = jnp.arange(h)[:, None]
  ii = jnp.arange(nq)[None, :]
  bias6 = None if bias is None else bias.reshape(bias.shape[0], h, nq, bs, nk, bs)
  scale = _default_scale(scale, d)

  @jax.checkpoint
  def score_step(_, idx_hi):
    k_bhiud = k_bhjud[:, hh, idx_hi]                     # [B, H, nq, bs, D]
    s = jnp.einsum("bhitd,bhiud->bhitu", q_bhitd, k_bhiud,
                   preferred_element_type=jnp.float32) * scale
    if bias6 is not None:                                # [H, nq, Bb, t, u] -> [Bb, ...]
      s = s + jnp.moveaxis(bias6[:, hh, ii, :, idx_hi], 2, 0).astype(jnp.float32)
    return None, s

  _, scores = jax.lax.scan(score_step, None, idx_whi)   # [w, B, H, nq, bs, bs]
  allowed = valid_whi[:, None, :, :, None, None]         # [w, 1, H, nq, 1, 1]
  if mask is not None:
    m_bju = (mask != 0).reshape(b, nk, bs)
    allowed = allowed & jnp.moveaxis(m_bju[:, idx_whi], 1, 0)[:, :, :, :, None, :]
  if causal:
    q_pos = jnp.arange(nq)[:, None, None] * bs + jnp.arange(bs)[:, None]  # [nq, t, 1]
    k_pos = idx_whi[:, :, :, None, None] * bs + jnp.arange(bs)           # [w,H,nq,1,u]
    allowed = allowed & (q_pos >= k_pos)[:, None]
  probs = masked_softmax(scores, jnp.broadcast_to(allowed, scores.shape), axis=(0, 5))
  probs = dropout(probs, dropout_rate, dropout_rng)

  @jax.checkpoint
  def mix_step(acc, xs):
    idx_hi, p = xs
    v_bhiud = v_bhjud[:, hh, idx_hi]
    return acc + jnp.einsum("bhitu,bhiud->bhitd", p.astype(v.dtype), v_bhiud,
                            preferred_element_type=jnp.float32), None

  out, _ = jax.lax.scan(mix_step, jnp.zeros((b, h, nq, bs, d), jnp.float32),
                        (idx_whi, probs))
  return out.reshape(b, h, lq, d).transpose(0, 2, 1, 3).astype(q.dtype)
