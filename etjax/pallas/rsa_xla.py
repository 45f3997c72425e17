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


def gather_blocks(x_bhqk, layout, block_size: int):
  """Gathers the layout's key blocks of a [.., H, Lq, Lk] array.

  Returns:
    [.., H, nq, bs, w, bs]: element [.., h, i, t, s, u] is
    x[.., h, i * bs + t, layout[h, i, s] * bs + u] (slot -1 reads block 0).
  """
  *lead, h, lq, lk = x_bhqk.shape
  bs = block_size
  x = x_bhqk.reshape(*lead, h, lq // bs, bs, lk // bs, bs)
  idx = jnp.maximum(layout, 0)
  nl = len(lead)
  # Move (h, i) next to the key-block axis so one advanced index gathers them all.
  x = jnp.moveaxis(x, nl + 2, -1)                       # [.., h, i, kb, u, t]
  hh = jnp.arange(h)[:, None, None]
  ii = jnp.arange(lq // bs)[None, :, None]
  g = x[(slice(None),) * nl + (hh, ii, idx)]            # [.., h, i, s, u, t]
  return jnp.moveaxis(g, -1, nl + 2)                    # [.., h, i, t, s, u]


def xla_rsa(q, k, v, layout, *, block_size: int, mask=None, bias=None,
            causal: bool = False, scale: Optional[float] = None,
            dropout_rate: float = 0.0, dropout_rng=None):
  """Block-sparse RSA by gathering the selected key blocks; O(n^2 / k) memory.

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
  idx = jnp.maximum(layout, 0)                          # [H, nq, w]
  valid = layout >= 0
  q_bhitd = q.transpose(0, 2, 1, 3).reshape(b, h, nq, bs, d)
  hh = jnp.arange(h)[:, None, None]

  def gather_kv(x):
    x_bhjud = x.transpose(0, 2, 1, 3).reshape(b, h, nk, bs, d)
    return x_bhjud[:, hh, idx]                          # [B, H, nq, w, bs, D]

  k_g, v_g = gather_kv(k), gather_kv(v)
  scores = jnp.einsum("bhitd,bhisud->bhitsu", q_bhitd, k_g,
                      preferred_element_type=jnp.float32)
  scores = scores * _default_scale(scale, d)
  if bias is not None:
    scores = scores + gather_blocks(bias, layout, bs).astype(jnp.float32)
  allowed = valid[:, :, None, :, None]                  # [H, nq, 1, w, 1]
  if mask is not None:
    m_bju = (mask != 0).reshape(b, nk, bs)
    allowed = allowed & m_bju[:, idx][:, :, :, None, :, :]
  if causal:
    q_pos = jnp.arange(nq)[:, None, None, None] * bs + jnp.arange(bs)[:, None, None]
    k_pos = idx[:, :, None, :, None] * bs + jnp.arange(bs)
    allowed = allowed & (q_pos >= k_pos)
  allowed = jnp.broadcast_to(allowed, scores.shape)
  shape = scores.shape
  probs = masked_softmax(scores.reshape(*shape[:4], -1),
                         allowed.reshape(*shape[:4], -1)).reshape(shape)
  if dropout_rate > 0.0 and dropout_rng is not None:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
  out = jnp.einsum("bhitsu,bhisud->bhitd", probs.astype(v.dtype), v_g,
                   preferred_element_type=jnp.float32)
  return out.reshape(b, h, lq, d).transpose(0, 2, 1, 3).astype(q.dtype)
