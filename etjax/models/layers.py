"""Flax Linen building blocks shared by every ModelZoo model.

Parameters are declared with logical axis names (`nn.with_logical_partitioning`) and
activations constrained with `nn.with_logical_constraint`; no module here knows about a
mesh. Compute dtype (`dtype`) is separate from parameter dtype (`param_dtype`).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from etjax.models.attention import dot_product_attention
from etjax.models.dropout import Dropout
from etjax.models.projection import project

Dtype = Any
Initializer = Callable[..., jax.Array]

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """Returns the activation function called `name` (Hugging Face spelling)."""
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def logical_init(init: Initializer, axes: Sequence[Optional[str]]) -> Initializer:
  """Wraps an initializer so that the parameter carries logical axis names."""
  return nn.with_logical_partitioning(init, tuple(axes))


def constrain(x: jax.Array, axes: Sequence[Optional[str]]) -> jax.Array:
  """Constrains an activation's sharding by logical axis names (no-op without rules)."""
  return nn.with_logical_constraint(x, tuple(axes))


def normal_init(stddev: float) -> Initializer:
  return nn.initializers.normal(stddev=stddev)


class Embed(nn.Module):
  """A lookup table [num_embeddings, features] with logical axes (table_axis, 'embed')."""
  num_embeddings: int
  features: int
  table_axis: Optional[str] = "vocab"
  init_stddev: float = 0.02
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.embedding = self.param(
        "embedding", logical_init(normal_init(self.init_stddev), (self.table_axis, "embed")),
        (self.num_embeddings, self.features), self.param_dtype)

  def __call__(self, ids: jax.Array) -> jax.Array:
    """ids int [...] -> [..., features] in the compute dtype."""
    return jnp.take(jnp.asarray(self.embedding, self.dtype), ids, axis=0)

  def attend(self, x: jax.Array) -> jax.Array:
    """Scores against every row, for tied output layers: [..., features] -> [..., rows]."""
    return jnp.einsum("...d,vd->...v", x, jnp.asarray(self.embedding, self.dtype))


class Dense(nn.Module):
  """y = x . W (+ b) over the last `len(in_axes)` dims, with logical axes on W.

  Attributes:
    features: output dims, e.g. (heads, head_dim) for a query projection.
    in_axes / out_axes: logical names of the contracted and produced dims.
  """
  features: Sequence[int]
  in_axes: Sequence[str]
  out_axes: Sequence[str]
  use_bias: bool = True
  init_stddev: float = 0.02
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = tuple(self.features)
    n_in = len(self.in_axes)
    kernel_shape = tuple(x.shape[-n_in:]) + features
    kernel = self.param(
        "kernel", logical_init(normal_init(self.init_stddev),
                               tuple(self.in_axes) + tuple(self.out_axes)),
        kernel_shape, self.param_dtype)
    # The product accumulates in float32 whatever the compute dtype: better numerics,
    # and XLA:CPU runs bfloat16 x bfloat16 -> float32 on its fast path but bfloat16 ->
    # bfloat16 at float32 speed (benchmarks/RESULTS.md).
    y = project(jnp.asarray(x, self.dtype), jnp.asarray(kernel, self.dtype), n_in)
    if self.use_bias:
      bias = self.param("bias", logical_init(nn.initializers.zeros, tuple(self.out_axes)),
                        features, self.param_dtype)
      y = y + jnp.asarray(bias, jnp.float32)
    return y.astype(self.dtype)


class LayerNorm(nn.Module):
  """LayerNorm over the last dim, statistics in float32 (as transformers computes them)."""
  epsilon: float = 1e-12
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale = self.param("scale", logical_init(nn.initializers.ones, ("embed",)),
                       (features,), self.param_dtype)
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32)
    if self.use_bias:
      bias = self.param("bias", logical_init(nn.initializers.zeros, ("embed",)),
                        (features,), self.param_dtype)
      y = y + bias.astype(jnp.float32)
    return y.astype(self.dtype)


class RMSNorm(nn.Module):
  """T5's norm: x / sqrt(mean(x^2) + eps) * scale, no mean subtraction, no bias."""
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", logical_init(nn.initializers.ones, ("embed",)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.epsilon)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)


class MLP(nn.Module):
  """Feed-forward block: wo(act(wi(x))), or the gated form wo(act(wi_0(x)) * wi_1(x)).

  [batch, length, embed] -> [batch, length, embed]. `out_init_stddev` initialises wo
  (default: init_stddev), for models whose init depends on fan-in (T5).
  """
  intermediate_size: int
  activation: str = "gelu"
  gated: bool = False
  use_bias: bool = True
  dropout_rate: float = 0.0
  init_stddev: float = 0.02
  out_init_stddev: Optional[float] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_bld: jax.Array, deterministic: bool = True) -> jax.Array:
    dense = lambda features, ins, outs, name, stddev=self.init_stddev: Dense(
        (features,), ins, outs, use_bias=self.use_bias, init_stddev=stddev,
        dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    act = activation(self.activation)
    d = x_bld.shape[-1]
    if self.gated:
      h_blf = act(dense(self.intermediate_size, ("embed",), ("mlp",), "wi_0")(x_bld))
      h_blf = h_blf * dense(self.intermediate_size, ("embed",), ("mlp",), "wi_1")(x_bld)
    else:
      h_blf = act(dense(self.intermediate_size, ("embed",), ("mlp",), "wi")(x_bld))
    h_blf = constrain(h_blf, ("batch", "length", "mlp"))
    h_blf = Dropout(self.dropout_rate)(h_blf, deterministic=deterministic)
    out_stddev = self.init_stddev if self.out_init_stddev is None else self.out_init_stddev
    return dense(d, ("mlp",), ("embed",), "wo", out_stddev)(h_blf)


class MultiHeadAttention(nn.Module):
  """Multi-head attention: project, attend through a backend, project back.

  Self-attention when `kv_bld` is None, cross-attention otherwise. `query_init_stddev`
  and `out_init_stddev` initialise the query and output projections (default:
  init_stddev), for models whose init depends on fan-in (T5).

  With `decode`, self-attention keeps a key/value cache in the 'cache' collection
  (autoregressive decoding, as flax's attention does): the first call, on the full
  [batch, max_length, embed] input, creates an empty cache and attends as usual; each
  later call takes the next n positions [batch, n, embed] (one when decoding, a
  whole prompt when filling the cache), writes their keys and values at the cache
  index, and attends to the positions written so far, causally within the chunk when
  `causal` (and key_mask_bl, which then covers all max_length positions).
  Cross-attention with `decode` projects the keys and values of `kv_bld` on the call
  that makes the cache (which must therefore run with the real parameters) and reuses
  them on every later call.
  """
  num_heads: int
  head_dim: int
  use_bias: bool = True
  scale: Optional[float] = None
  backend: str = "dense"
  rsa_k: int = 4
  rsa_block_size: int = 64
  dropout_rate: float = 0.0
  init_stddev: float = 0.02
  query_init_stddev: Optional[float] = None
  out_init_stddev: Optional[float] = None
  decode: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_bld: jax.Array, kv_bld: Optional[jax.Array] = None, *,
               key_mask_bl: Optional[jax.Array] = None,
               bias_bhqk: Optional[jax.Array] = None, causal: bool = False,
               deterministic: bool = True, return_probs: bool = False):
    """Returns (out [batch, q_length, embed], probs [batch, heads, q, k] or None)."""
    self_attention = kv_bld is None
    kv_bld = x_bld if kv_bld is None else kv_bld
    stddev = lambda override: self.init_stddev if override is None else override
    proj = lambda name, init_stddev=self.init_stddev: Dense(
        (self.num_heads, self.head_dim), ("embed",), ("heads", "kv"),
        use_bias=self.use_bias, init_stddev=init_stddev, dtype=self.dtype,
        param_dtype=self.param_dtype, name=name)
    axes = ("batch", "length", "heads", "kv")
    q_blhd = constrain(proj("query", stddev(self.query_init_stddev))(x_bld), axes)
    if self.decode and not self_attention and self.has_variable("cache", "cached_key"):
      # Decoding: the attended sequence (an encoder's output) stays fixed, so its keys
      # and values are projected once, on the call that made the cache.
      k_blhd = self.get_variable("cache", "cached_key")
      v_blhd = self.get_variable("cache", "cached_value")
    else:
      k_blhd = constrain(proj("key")(kv_bld), axes)
      v_blhd = constrain(proj("value")(kv_bld), axes)
      if self.decode and not self_attention:
        self.put_variable("cache", "cached_key", k_blhd)
        self.put_variable("cache", "cached_value", v_blhd)
    q_offset = None
    if self.decode and self_attention:
      k_blhd, v_blhd, key_mask_bl, causal, q_offset = self._use_cache(
          k_blhd, v_blhd, key_mask_bl, causal)
    dropout_rng = None
    if not deterministic and self.dropout_rate > 0.0:
      dropout_rng = self.make_rng("dropout")
    out_blhd, probs = dot_product_attention(
        q_blhd, k_blhd, v_blhd, key_mask_bl=key_mask_bl, bias_bhqk=bias_bhqk,
        causal=causal, scale=self.scale, backend=self.backend, rsa_k=self.rsa_k,
        rsa_block_size=self.rsa_block_size, dropout_rate=self.dropout_rate,
        dropout_rng=dropout_rng, return_probs=return_probs, q_offset=q_offset)
    out_blhd = constrain(out_blhd, axes)
    out_bld = Dense((x_bld.shape[-1],), ("heads", "kv"), ("embed",), use_bias=self.use_bias,
                    init_stddev=stddev(self.out_init_stddev), dtype=self.dtype,
                    param_dtype=self.param_dtype, name="out")(out_blhd)
    return out_bld, probs

  def _use_cache(self, k_blhd, v_blhd, key_mask_bl, causal):
    """Creates the cache, or appends n positions to it and returns the cached keys,
    values, the mask of the positions written so far, whether the queries need a
    causal mask among themselves (n > 1), and the first query's position (the causal
    mask and RSA's layout rows start there)."""
    initialized = self.has_variable("cache", "cached_key")
    cached_k = self.variable("cache", "cached_key", jnp.zeros, k_blhd.shape, k_blhd.dtype)
    cached_v = self.variable("cache", "cached_value", jnp.zeros, v_blhd.shape,
                             v_blhd.dtype)
    index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
    if not initialized:
      return k_blhd, v_blhd, key_mask_bl, causal, None
    n = k_blhd.shape[1]
    if n > cached_k.value.shape[1]:
      raise ValueError(f"MultiHeadAttention(decode=True): {n} positions do not fit the "
                       f"cache of {cached_k.value.shape[1]}")
    i = index.value
    k_blhd = jax.lax.dynamic_update_slice_in_dim(cached_k.value, k_blhd.astype(
        cached_k.value.dtype), i, axis=1)
    v_blhd = jax.lax.dynamic_update_slice_in_dim(cached_v.value, v_blhd.astype(
        cached_v.value.dtype), i, axis=1)
    k_blhd = constrain(k_blhd, ("batch", "length", "heads", "kv"))
    v_blhd = constrain(v_blhd, ("batch", "length", "heads", "kv"))
    cached_k.value, cached_v.value, index.value = k_blhd, v_blhd, i + n
    written_bl = (jnp.arange(k_blhd.shape[1]) < i + n)[None, :]
    if key_mask_bl is not None:
      written_bl = jnp.logical_and(written_bl, key_mask_bl != 0)
    # One position sees every written key; a chunk (a prompt) stays causal within
    # itself, its queries sitting at positions i .. i + n - 1 of the cache.
    return k_blhd, v_blhd, written_bl, causal and n > 1, i
