"""T5 (Raffel et al. 2020): encoder-decoder and encoder-only, T5 1.0 and 1.1 flavours.

Pre-norm Transformer with RMS norms, no biases, no 1/sqrt(d) scaling of attention
scores, and a learned relative position bias (one table per stack, shared by its
layers, bidirectional in the encoder and causal in the decoder) as in Hugging Face
`T5Model` / `T5ForConditionalGeneration` / `T5EncoderModel`. The bias is computed once
per stack, outside the scanned layers, and reaches every layer through `shared`.

Parameters (Flax paths): shared/embedding [vocab, d_model]; {encoder,decoder}/relpos_bias/
embedding [buckets, heads]; {encoder,decoder}/stack/layers/... stacked on 'layers';
{encoder,decoder}/final_norm/scale; lm_head/kernel [d_model, vocab] when untied.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from etjax.models import layers
from etjax.models.bert import EncoderOutput
from etjax.models.config import dtype_of
from etjax.models.stack import LayerStack, layer_outputs, stack_options
from etjax.models.t5_configs import T5Config


@flax.struct.dataclass
class T5Output:
  """What the encoder-decoder returns.

  Attributes:
    logits: [batch, target_length, vocab] next-token scores.
    last_hidden_state: the decoder's output [batch, target_length, d_model].
    encoder_last_hidden_state: the encoder's output [batch, source_length, d_model].
  """
  logits: jax.Array
  last_hidden_state: jax.Array
  encoder_last_hidden_state: jax.Array


def _dtypes(config: T5Config) -> dict:
  return dict(dtype=dtype_of(config.dtype), param_dtype=dtype_of(config.param_dtype))


def relative_position_bucket(relative_position: jax.Array, *, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> jax.Array:
  """T5's bucket of each relative position (memory position - query position).

  Half of the buckets (per direction when bidirectional) hold exact small distances,
  the rest logarithmically wider bins up to max_distance; farther positions share the
  last bucket. Causal (not bidirectional) maps every future position to bucket 0.

  Returns int32 buckets in [0, num_buckets), shaped like `relative_position`.
  """
  relative_position = jnp.asarray(relative_position, jnp.int32)
  buckets = jnp.zeros_like(relative_position)
  if bidirectional:
    num_buckets //= 2
    buckets += (relative_position > 0).astype(jnp.int32) * num_buckets
    distance = jnp.abs(relative_position)
  else:
    distance = -jnp.minimum(relative_position, 0)
  max_exact = num_buckets // 2
  # Same float32 operations, in the same order, as mesh-tensorflow and transformers, so
  # that distances on a bin edge fall on the same side. Distance 0 is exact; the max
  # only keeps log() finite on the branch `where` discards.
  scaled = (jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
            / math.log(max_distance / max_exact) * (num_buckets - max_exact))
  if_large = jnp.minimum(max_exact + scaled.astype(jnp.int32), num_buckets - 1)
  return buckets + jnp.where(distance < max_exact, distance, if_large)


class RelativePositionBias(nn.Module):
  """A learned [buckets, heads] table read at each (query, key) distance.

  Call (q_length, k_length, q_offset=0) -> bias [1, heads, q_length, k_length] float32,
  where query i sits at position q_offset + i and key j at position j.
  """
  num_buckets: int
  max_distance: int
  num_heads: int
  bidirectional: bool
  init_stddev: float = 1.0
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, q_length: int, k_length: int, q_offset=0) -> jax.Array:
    table_nh = self.param(
        "embedding", layers.logical_init(layers.normal_init(self.init_stddev),
                                         ("relpos_buckets", "heads")),
        (self.num_buckets, self.num_heads), self.param_dtype)
    query_q = jnp.arange(q_length)[:, None] + q_offset
    relative_qk = jnp.arange(k_length)[None, :] - query_q
    buckets_qk = relative_position_bucket(
        relative_qk, bidirectional=self.bidirectional, num_buckets=self.num_buckets,
        max_distance=self.max_distance)
    bias_qkh = jnp.take(jnp.asarray(table_nh, jnp.float32), buckets_qk, axis=0)
    return jnp.transpose(bias_qkh, (2, 0, 1))[None]


def _attention(config: T5Config, name: str, decode: bool = False,
               backend: Optional[str] = None) -> layers.MultiHeadAttention:
  """T5 attention: no biases, unscaled scores, transformers' fan-in initialisation.

  `backend` defaults to the config's; cross-attention passes 'dense', because Random
  Sparse Attention's block layout is meant for self-attention (a square call between
  equally long source and target would otherwise be sparsified by accident).
  """
  cfg = config
  factor = cfg.initializer_factor
  return layers.MultiHeadAttention(
      num_heads=cfg.num_heads, head_dim=cfg.d_kv, use_bias=False, scale=1.0,
      backend=backend or cfg.attention, rsa_k=cfg.rsa_k, rsa_block_size=cfg.rsa_block_size,
      dropout_rate=cfg.dropout_rate, init_stddev=factor * cfg.d_model ** -0.5,
      query_init_stddev=factor * (cfg.d_model * cfg.d_kv) ** -0.5,
      out_init_stddev=factor * (cfg.num_heads * cfg.d_kv) ** -0.5, decode=decode,
      name=name, **_dtypes(cfg))


class T5Layer(nn.Module):
  """One pre-norm T5 block; the `LayerStack` layer interface.

  Encoder (decoder False): self-attention, feed-forward. Decoder: causal
  self-attention, attention to side_b['encoder_hidden_states'] (keys masked by
  side_b['encoder_attention_mask']), feed-forward. Each sub-layer is
  x + dropout(sublayer(rms_norm(x))). side_b['attention_mask'] masks the self-attention
  keys; shared['position_bias'] [1, heads, L, L] is added to the self-attention scores.
  With `decode` both attentions keep key/value caches (see T5Model.decode).
  """
  config: T5Config
  decoder: bool = False
  decode: bool = False
  output_hidden_states: bool = False
  output_attentions: bool = False

  @nn.compact
  def __call__(self, x_bld: jax.Array, side_b: Mapping[str, jax.Array],
               shared: Mapping[str, jax.Array], deterministic: bool = True):
    cfg = self.config
    norm = lambda name: layers.RMSNorm(cfg.layer_norm_epsilon, name=name, **_dtypes(cfg))
    dropout = lambda y: layers.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)
    attn_bld, probs_bhqk = _attention(cfg, "self_attention", self.decode)(
        norm("self_attention_norm")(x_bld), key_mask_bl=side_b["attention_mask"],
        bias_bhqk=shared["position_bias"], causal=self.decoder,
        deterministic=deterministic, return_probs=self.output_attentions)
    x_bld = layers.constrain(x_bld + dropout(attn_bld), ("batch", "length", "embed"))
    if self.decoder:
      attn_bld, _ = _attention(cfg, "cross_attention", self.decode, backend="dense")(
          norm("cross_attention_norm")(x_bld), side_b["encoder_hidden_states"],
          key_mask_bl=side_b["encoder_attention_mask"], deterministic=deterministic)
      x_bld = layers.constrain(x_bld + dropout(attn_bld), ("batch", "length", "embed"))
    factor = cfg.initializer_factor
    mlp_bld = layers.MLP(cfg.d_ff, activation=cfg.activation, gated=cfg.gated,
                         use_bias=False, dropout_rate=cfg.dropout_rate,
                         init_stddev=factor * cfg.d_model ** -0.5,
                         out_init_stddev=factor * cfg.d_ff ** -0.5, name="mlp",
                         **_dtypes(cfg))(norm("mlp_norm")(x_bld), deterministic)
    x_bld = layers.constrain(x_bld + dropout(mlp_bld), ("batch", "length", "embed"))
    return x_bld, layer_outputs(x_bld, probs_bhqk, self.output_hidden_states,
                                self.output_attentions)


class T5Stack(nn.Module):
  """Relative position bias, dropout, the scanned layers, final RMS norm, dropout.

  Call: (x_bld embedded tokens, attention_mask [B, L] or None, encoder_hidden_states
  [B, S, D] and encoder_attention_mask [B, S] for the decoder) -> (x [B, L, D],
  per-layer outputs {name: [num_layers, ...]}).

  With `decode` (decoder only) the stack caches keys and values: the first call, on
  [B, max_length, D], makes the cache; each later call runs one position [B, 1, D],
  the next one, reading the relative position bias of its row.
  """
  config: T5Config
  decoder: bool = False
  decode: bool = False

  @nn.compact
  def __call__(self, x_bld: jax.Array, attention_mask: jax.Array,
               encoder_hidden_states: Optional[jax.Array] = None,
               encoder_attention_mask: Optional[jax.Array] = None, *,
               deterministic: bool = True, output_hidden_states: bool = False,
               output_attentions: bool = False):
    cfg = self.config
    q_length = k_length = x_bld.shape[1]
    q_offset = 0
    if self.decode:
      q_length, k_length, q_offset = self._decode_position(q_length)
    bias_1hqk = RelativePositionBias(
        cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance,
        cfg.num_heads, bidirectional=not self.decoder,
        init_stddev=cfg.initializer_factor * cfg.d_model ** -0.5,
        param_dtype=dtype_of(cfg.param_dtype), name="relpos_bias")(
            q_length, k_length, q_offset)
    side_b = {"attention_mask": attention_mask}
    if self.decoder:
      side_b.update(encoder_hidden_states=encoder_hidden_states,
                    encoder_attention_mask=encoder_attention_mask)
    x_bld = layers.Dropout(cfg.dropout_rate)(x_bld, deterministic=deterministic)
    x_bld, per_layer = LayerStack(
        layer_cls=T5Layer,
        layer_kwargs=dict(config=cfg, decoder=self.decoder, decode=self.decode,
                          output_hidden_states=output_hidden_states,
                          output_attentions=output_attentions),
        num_layers=cfg.decoder_layers if self.decoder else cfg.num_layers,
        **stack_options(cfg), name="stack")(
            x_bld, side_b, {"position_bias": bias_1hqk}, deterministic)
    x_bld = layers.RMSNorm(cfg.layer_norm_epsilon, name="final_norm", **_dtypes(cfg))(x_bld)
    x_bld = layers.Dropout(cfg.dropout_rate)(x_bld, deterministic=deterministic)
    return layers.constrain(x_bld, ("batch", "length", "embed")), per_layer

  def _decode_position(self, length: int):
    """(q_length, k_length, q_offset) of this call; advances the cached position."""
    if not self.decoder:
      raise ValueError("T5Stack: decode needs the decoder stack")
    if self.config.pipeline_stages > 1:
      raise ValueError("T5 decoding with a cache runs the plain stack: use a config "
                       "with pipeline_stages=1 (the parameters are the same)")
    made = self.has_variable("cache", "position")
    # The key positions' count is the cache length; the first call fixes it.
    keys = self.variable("cache", "key_positions", jnp.arange, length, dtype=jnp.int32)
    position = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
    if not made:
      return length, length, 0
    if length != 1:
      raise ValueError(f"T5 decoding takes one position per call, got {length}")
    offset = position.value
    position.value = offset + 1
    return 1, keys.value.shape[0], offset


def shift_right(labels: jax.Array, decoder_start_token_id: int,
                pad_token_id: int) -> jax.Array:
  """Decoder inputs for teacher forcing: the start token, then labels[:, :-1].

  Ignored label positions (-100, as transformers marks them) become pad_token_id.
  Returns int32 [batch, target_length], as transformers' T5 `_shift_right`.
  """
  labels = jnp.asarray(labels, jnp.int32)
  start = jnp.full(labels.shape[:-1] + (1,), decoder_start_token_id, jnp.int32)
  shifted = jnp.concatenate([start, labels[..., :-1]], axis=-1)
  return jnp.where(shifted == -100, pad_token_id, shifted)


def _embedding(cfg: T5Config) -> layers.Embed:
  return layers.Embed(cfg.vocab_size, cfg.d_model, table_axis="vocab",
                      init_stddev=cfg.initializer_factor, name="shared", **_dtypes(cfg))


def _ids_and_mask(input_ids, attention_mask):
  input_ids = layers.constrain(jnp.asarray(input_ids, jnp.int32), ("batch", "length"))
  if attention_mask is None:
    attention_mask = jnp.ones_like(input_ids)
  return input_ids, attention_mask


class T5Model(nn.Module):
  """The T5 encoder-decoder with its language-model head.

  Call: (input_ids [B, S], attention_mask [B, S] = all ones, decoder_input_ids [B, T] =
  the start token alone, decoder_attention_mask [B, T] = all ones) -> T5Output.
  `encode` and `decode` (through `module.apply(..., method=...)`) run the halves, as
  decoding does. With `use_cache=True` the decoder caches keys and values (the same
  parameters; see `decode`).
  """
  config: T5Config
  use_cache: bool = False

  def setup(self):
    cfg = self.config
    self.shared = _embedding(cfg)
    self.encoder = T5Stack(cfg, decoder=False)
    self.decoder = T5Stack(cfg, decoder=True, decode=self.use_cache)
    if not cfg.tie_word_embeddings:
      self.lm_head = layers.Dense((cfg.vocab_size,), ("embed",), ("vocab",), use_bias=False,
                                  init_stddev=cfg.initializer_factor, **_dtypes(cfg))

  def encode(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None, *,
             deterministic: bool = True) -> jax.Array:
    """The encoder's output [batch, source_length, d_model]."""
    input_ids, attention_mask = _ids_and_mask(input_ids, attention_mask)
    x_bld = layers.constrain(self.shared(input_ids), ("batch", "length", "embed"))
    x_bld, _ = self.encoder(x_bld, attention_mask, deterministic=deterministic)
    return x_bld

  def decode(self, decoder_input_ids: jax.Array, encoder_hidden_states: jax.Array,
             attention_mask: Optional[jax.Array] = None,
             decoder_attention_mask: Optional[jax.Array] = None, *,
             deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
    """Runs the decoder on target tokens, attending to the encoder's output.

    Args:
      decoder_input_ids: [batch, target_length], starting with decoder_start_token_id.
      encoder_hidden_states: [batch, source_length, d_model] from `encode`.
      attention_mask: the source mask [batch, source_length] (default all ones).
      decoder_attention_mask: [batch, target_length] (default all ones); causal
        masking is always applied.

    With `use_cache=True` on the module, the first call (with mutable=['cache'], on
    [batch, max_length] tokens, e.g. zeros, with the real parameters and encoder
    output) makes the caches: empty self-attention keys and values, and the
    cross-attention keys and values of the encoder output. Each later call takes the
    next single token [batch, 1] and returns its outputs [batch, 1, ...]; a
    decoder_attention_mask then covers all max_length positions.

    Returns:
      (hidden [batch, target_length, d_model], logits [batch, target_length, vocab]).
    """
    cfg = self.config
    ids = layers.constrain(jnp.asarray(decoder_input_ids, jnp.int32), ("batch", "length"))
    if attention_mask is None:
      attention_mask = jnp.ones(encoder_hidden_states.shape[:2], jnp.int32)
    x_bld = layers.constrain(self.shared(ids), ("batch", "length", "embed"))
    x_bld, _ = self.decoder(x_bld, decoder_attention_mask, encoder_hidden_states,
                            attention_mask, deterministic=deterministic)
    if cfg.tie_word_embeddings:
      # T5 1.0 ties the output layer to the embedding and rescales (Mesh TensorFlow).
      logits_blv = self.shared.attend(x_bld * cfg.d_model ** -0.5)
    else:
      logits_blv = self.lm_head(x_bld)
    return x_bld, layers.constrain(logits_blv, ("batch", "length", "vocab"))

  def __call__(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None,
               decoder_input_ids: Optional[jax.Array] = None,
               decoder_attention_mask: Optional[jax.Array] = None, *,
               deterministic: bool = True) -> T5Output:
    if decoder_input_ids is None:
      decoder_input_ids = jnp.full((jnp.shape(input_ids)[0], 1),
                                   self.config.decoder_start_token_id, jnp.int32)
    encoded_bsd = self.encode(input_ids, attention_mask, deterministic=deterministic)
    hidden_btd, logits_btv = self.decode(decoder_input_ids, encoded_bsd, attention_mask,
                                         decoder_attention_mask,
                                         deterministic=deterministic)
    return T5Output(logits=logits_btv, last_hidden_state=hidden_btd,
                    encoder_last_hidden_state=encoded_bsd)


class T5Encoder(nn.Module):
  """T5's encoder alone (transformers' T5EncoderModel), usable as a task backbone.

  Call: (input_ids [B, L], attention_mask [B, L] = all ones) -> EncoderOutput with
  last_hidden_state [B, L, D]; pooled_output [B, D], the mean over unmasked tokens
  (T5 has no pooler; Sentence-T5 pools this way); hidden_states [num_layers + 1, B, L, D]
  as transformers orders them (embeddings, then each layer's output, the last one
  after the final norm); attentions [num_layers, B, heads, L, L].
  """
  config: T5Config

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None,
               token_type_ids: Optional[jax.Array] = None, *, deterministic: bool = True,
               output_hidden_states: bool = False,
               output_attentions: bool = False) -> EncoderOutput:
    if token_type_ids is not None:
      raise ValueError("T5Encoder: T5 has no token types; pass token_type_ids=None "
                       "(drop 'token_type_ids' from the batch)")
    cfg = self.config
    input_ids, attention_mask = _ids_and_mask(input_ids, attention_mask)
    x_bld = layers.constrain(_embedding(cfg)(input_ids), ("batch", "length", "embed"))
    embedded_bld = x_bld
    x_bld, per_layer = T5Stack(cfg, decoder=False, name="encoder")(
        x_bld, attention_mask, deterministic=deterministic,
        output_hidden_states=output_hidden_states, output_attentions=output_attentions)
    mask_bl = attention_mask.astype(jnp.float32)
    pooled_bd = (jnp.einsum("bld,bl->bd", x_bld.astype(jnp.float32), mask_bl)
                 / jnp.maximum(mask_bl.sum(axis=1, keepdims=True), 1.0)).astype(x_bld.dtype)
    hidden_states = attentions = None
    if (output_hidden_states or output_attentions) and not per_layer:
      raise ValueError("output_hidden_states and output_attentions are not available "
                       "with pipeline_stages > 1")
    if output_hidden_states:
      hidden_states = jnp.concatenate([embedded_bld[None], per_layer["hidden_states"][:-1],
                                       x_bld[None]])
    if output_attentions:
      attentions = per_layer["attentions"]
    return EncoderOutput(last_hidden_state=x_bld, pooled_output=pooled_bd,
                         hidden_states=hidden_states, attentions=attentions)
