"""Scaled dot-product attention with pluggable backends.

Every attention layer in the ModelZoo calls `dot_product_attention`; the `backend`
argument picks the implementation:
  - 'dense': plain XLA einsums with an explicit softmax. It is the reference the other
    backends are held to, and the only one that can return attention probabilities
    (distillation reads them) and apply attention-probability dropout.
  - 'rsa': Random Sparse Attention (etjax.pallas.rsa), block-sparse with sparsity k.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from etjax.models.dropout import dropout
from etjax.pallas import rsa, rsa_xla

BACKENDS = ("dense", "rsa")


def dot_product_attention(
    q_blhd: jax.Array,
    k_blhd: jax.Array,
    v_blhd: jax.Array,
    *,
    key_mask_bl: Optional[jax.Array] = None,
    bias_bhqk: Optional[jax.Array] = None,
    causal: bool = False,
    scale: Optional[float] = None,
    backend: str = "dense",
    rsa_k: int = 4,
    rsa_block_size: int = 64,
    rsa_seed: int = 0,
    dropout_rate: float = 0.0,
    dropout_rng: Optional[jax.Array] = None,
    return_probs: bool = False,
    q_offset: Optional[jax.Array] = None,
) -> tuple[jax.Array, Optional[jax.Array]]:
  """Attends queries to keys and mixes values.

  Args:
    q_blhd: queries [batch, q_length, heads, head_dim].
    k_blhd: keys [batch, kv_length, heads, head_dim].
    v_blhd: values [batch, kv_length, heads, head_dim].
    key_mask_bl: [batch, kv_length], nonzero where a key may be attended (padding mask).
    bias_bhqk: additive bias broadcastable to [batch, heads, q_length, kv_length]
      (T5's relative position bias).
    causal: whether query i may only see keys j <= i.
    scale: multiplies the scores; default 1/sqrt(head_dim). T5 passes 1.0.
    backend: one of BACKENDS.
    rsa_k, rsa_block_size, rsa_seed: Random Sparse Attention settings (backend 'rsa').
    dropout_rate, dropout_rng: dropout on the attention probabilities (no dropout
      when dropout_rng is None; with 'rsa' it runs RSA's XLA path, see _rsa_attention).
    return_probs: also return the probabilities [batch, heads, q_length, kv_length].
    q_offset: when decoding with a key/value cache, the position of the first query
      among the keys (int or int32 scalar, may be traced): the causal mask puts query
      i at q_offset + i (default: the queries are the last q_length keys), and 'rsa'
      picks the causal layout rows of the queries' blocks from it.

  Returns:
    (out [batch, q_length, heads, head_dim], probs or None).
  """
  if backend not in BACKENDS:
    raise ValueError(f"unknown attention backend {backend!r}; known: {BACKENDS}")
  if scale is None:
    scale = q_blhd.shape[-1] ** -0.5
  if backend == "rsa":
    return _rsa_attention(q_blhd, k_blhd, v_blhd, key_mask_bl=key_mask_bl,
                          bias_bhqk=bias_bhqk, causal=causal, scale=scale,
                          rsa_k=rsa_k, rsa_block_size=rsa_block_size,
                          rsa_seed=rsa_seed, dropout_rate=dropout_rate,
                          dropout_rng=dropout_rng, return_probs=return_probs,
                          q_offset=q_offset)
  return _dense_attention(q_blhd, k_blhd, v_blhd, key_mask_bl=key_mask_bl,
                          bias_bhqk=bias_bhqk, causal=causal, scale=scale,
                          dropout_rate=dropout_rate, dropout_rng=dropout_rng,
                          return_probs=return_probs, q_offset=q_offset)


def attention_mask_bhqk(key_mask_bl: Optional[jax.Array], q_length: int,
                        kv_length: int, causal: bool,
                        q_offset: Optional[jax.Array] = None) -> Optional[jax.Array]:
  """Boolean mask [batch or 1, 1, q_length, kv_length]: True where attending is allowed."""
  mask = None
  if key_mask_bl is not None:
    mask = (key_mask_bl != 0)[:, None, None, :]
  if causal:
    # Query i sits at key position offset + i: by default the queries are the last
    # q_length keys; a cache being filled chunk by chunk says where they are.
    offset = kv_length - q_length if q_offset is None else q_offset
    causal_qk = (jnp.arange(q_length)[:, None] + offset) >= jnp.arange(kv_length)[None, :]
    causal_qk = causal_qk[None, None]
    mask = causal_qk if mask is None else jnp.logical_and(mask, causal_qk)
  return mask


def _dense_attention(q_blhd, k_blhd, v_blhd, *, key_mask_bl, bias_bhqk, causal, scale,
                     dropout_rate, dropout_rng, return_probs, q_offset=None):
  dtype = q_blhd.dtype
  # Heads next to batch before the products: XLA:CPU runs a dot_general whose batch
  # dimensions lead about 3x faster than one with (batch, heads) split around the
  # length (measured on bert-base shapes), and the transposes are cheap.
  q_bhqd, k_bhkd, v_bhkd = (jnp.swapaxes(x, 1, 2) for x in (q_blhd, k_blhd, v_blhd))
  scores_bhqk = jnp.einsum("bhqd,bhkd->bhqk", q_bhqd, k_bhkd,
                           preferred_element_type=jnp.float32) * scale
  if bias_bhqk is not None:
    scores_bhqk = scores_bhqk + bias_bhqk.astype(jnp.float32)
  mask = attention_mask_bhqk(key_mask_bl, q_blhd.shape[1], k_blhd.shape[1], causal,
                             q_offset)
  if mask is not None:
    # The most negative finite value (as transformers does), not -inf: a row with every
    # key masked then averages uniformly instead of producing NaN.
    scores_bhqk = jnp.where(mask, scores_bhqk, jnp.finfo(jnp.float32).min)
  probs_bhqk = jax.nn.softmax(scores_bhqk, axis=-1)
  mixed_bhqk = dropout(probs_bhqk, dropout_rate, dropout_rng)
  out_bhqd = jnp.einsum("bhqk,bhkd->bhqd", mixed_bhqk.astype(dtype), v_bhkd,
                        preferred_element_type=jnp.float32).astype(dtype)
  return jnp.swapaxes(out_bhqd, 1, 2), (probs_bhqk if return_probs else None)


@functools.lru_cache(maxsize=64)
def _cached_layout(heads: int, length: int, block_size: int, k: int, seed: int,
                   causal: bool) -> np.ndarray:
  layout = rsa.make_layout(heads, length, block_size, k, seed, causal=causal)
  layout.flags.writeable = False      # shared by every call with these settings
  return layout


def _rsa_attention(q_blhd, k_blhd, v_blhd, *, key_mask_bl, bias_bhqk, causal, scale,
                   rsa_k, rsa_block_size, rsa_seed, dropout_rate, dropout_rng,
                   return_probs, q_offset=None):
  """Random Sparse Attention (etjax.pallas.rsa) for self-attention.

  - Layout: `make_layout(heads, kv_length, rsa_block_size, rsa_k, rsa_seed, causal)`,
    the same in every layer with these settings; lengths must be multiples of
    rsa_block_size (a ValueError says so). rsa_k=1 is dense attention.
  - Implementation: rsa's 'auto' backend (Pallas kernels on GPU/TPU, the XLA gather
    path on CPU). Under a mesh of several devices the kernels run per device through
    shard_map (heads on 'model', batch on 'dcn_data'/'data'/'fsdp') when the sizes
    divide.
  - Attention-probability dropout: the kernels have none, so while dropout is active
    the XLA path (block-sparse, with dropout) runs instead.
  - return_probs: computed on the dense reference path (O(n^2)); the probabilities are
    zero outside the layout's blocks. Meant for distillation and inspection.
  - Decoding with a cache: with `q_offset` (the queries' position in the cache) the
    attention is a causal decoder's, so the causal layout of the cache length is used
    and the queries' rows are expanded to a mask over the cache (dense over the few
    queries); without it, causal q_length < kv_length takes the queries to be the
    last positions. The layout depends on the length, so decoding reproduces
    training's layout when the cache length equals the training length.
  - Cross-attention (no q_offset, not causal, q_length != kv_length) has no block
    layout and runs dense.
  - A query row that may attend to nothing gets zeros (the dense branch averages).
  """
  b, lq, h, _ = q_blhd.shape
  lk = k_blhd.shape[1]
  if q_offset is not None:
    rsa.num_blocks(lk, rsa_block_size, "RSA cache length (rsa_block_size)")
    layout = _cached_layout(h, lk, rsa_block_size, rsa_k, rsa_seed, True)
    bias = None if bias_bhqk is None else jnp.broadcast_to(
        bias_bhqk, (bias_bhqk.shape[0] if bias_bhqk.ndim == 4 else 1, h, lq, lk))
    return _rsa_masked_dense(q_blhd, k_blhd, v_blhd, layout, key_mask_bl, bias,
                             causal, scale, rsa_block_size, dropout_rate,
                             dropout_rng, return_probs, q_offset=q_offset)
  if lq != lk and not causal:
    return _dense_attention(q_blhd, k_blhd, v_blhd, key_mask_bl=key_mask_bl,
                            bias_bhqk=bias_bhqk, causal=False, scale=scale,
                            dropout_rate=dropout_rate, dropout_rng=dropout_rng,
                            return_probs=return_probs)
  rsa.num_blocks(lk, rsa_block_size, "RSA attention length (rsa_block_size)")
  layout = _cached_layout(h, lk, rsa_block_size, rsa_k, rsa_seed, causal)
  bias = None
  if bias_bhqk is not None:
    bias = jnp.broadcast_to(bias_bhqk, (bias_bhqk.shape[0] if bias_bhqk.ndim == 4
                                        else 1, h, lq, lk))
  if return_probs or lq != lk:
    return _rsa_masked_dense(q_blhd, k_blhd, v_blhd, layout, key_mask_bl, bias,
                             causal, scale, rsa_block_size, dropout_rate,
                             dropout_rng, return_probs)
  common = dict(block_size=rsa_block_size, mask=key_mask_bl, bias=bias,
                causal=causal, scale=scale)
  if dropout_rate > 0.0 and dropout_rng is not None:
    out = rsa.rsa_attention(q_blhd, k_blhd, v_blhd, layout, backend="xla",
                            dropout_rate=dropout_rate, dropout_rng=dropout_rng,
                            **common)
    return out, None
  mesh = jax.sharding.get_abstract_mesh()
  if (rsa.resolve_backend("auto") != "xla" and not mesh.empty and mesh.size > 1
      and _divides(mesh, b, rsa.BATCH_AXES) and _divides(mesh, h, ("model",))):
    return rsa.rsa_attention_sharded(q_blhd, k_blhd, v_blhd, layout, **common), None
  return rsa.rsa_attention(q_blhd, k_blhd, v_blhd, layout, **common), None


def _divides(mesh, n: int, axes) -> bool:
  return n % math.prod(mesh.shape[a] for a in axes if a in mesh.axis_names) == 0


def _rsa_masked_dense(q_blhd, k_blhd, v_blhd, layout, key_mask_bl, bias, causal,
                      scale, block_size, dropout_rate, dropout_rng, return_probs,
                      q_offset=None):
  """RSA computed densely: scores masked by the layout's blocks, the queries at
  positions q_offset + [0, q_length) (default: the last q_length positions).

  Returns (out [B, Lq, H, D], probs [B, H, Lq, Lk] or None)."""
  lq, lk = q_blhd.shape[1], k_blhd.shape[1]
  q_offset = lk - lq if q_offset is None else q_offset
  block_mask_hqk = jax.lax.dynamic_slice_in_dim(
      rsa.expand_layout(layout, block_size, lk), q_offset, lq, axis=1)
  allowed = block_mask_hqk[None]
  if key_mask_bl is not None:
    allowed = allowed & (key_mask_bl != 0)[:, None, None, :]
  if causal:
    q_pos = q_offset + jnp.arange(lq)
    allowed = allowed & (q_pos[:, None] >= jnp.arange(lk)[None, :])
  scores_bhqk = jnp.einsum("bqhd,bkhd->bhqk", q_blhd, k_blhd,
                           preferred_element_type=jnp.float32) * scale
  if bias is not None:
    scores_bhqk = scores_bhqk + bias.astype(jnp.float32)
  allowed = jnp.broadcast_to(allowed, scores_bhqk.shape)
  probs_bhqk = rsa_xla.masked_softmax(scores_bhqk, allowed)
  mixed_bhqk = dropout(probs_bhqk, dropout_rate, dropout_rng)
  out_blhd = jnp.einsum("bhqk,bkhd->bqhd", mixed_bhqk.astype(q_blhd.dtype), v_blhd)
  return out_blhd, (probs_bhqk if return_probs else None)
