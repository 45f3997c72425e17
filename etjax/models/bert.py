"""BERT-family encoders: BERT, RoBERTa and ALBERT (one module, configured).

Post-LN Transformer encoder as in Devlin et al. and Hugging Face `BertModel`:
embeddings (word + position + token type, LayerNorm, dropout), a scanned stack of
layers (self-attention, add & norm, MLP, add & norm), and a tanh pooler on [CLS].
"""

from __future__ import annotations

from typing import Mapping, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from etjax.models import layers
from etjax.models.config import EncoderConfig, dtype_of
from etjax.models.stack import LayerStack, layer_outputs, stack_options


@flax.struct.dataclass
class EncoderOutput:
  """What an encoder returns.

  Attributes:
    last_hidden_state: [batch, length, hidden].
    pooled_output: [batch, hidden], tanh(dense([CLS])).
    hidden_states: [num_layers + 1, batch, length, hidden] (index 0 = embeddings
      output, as in transformers' tuple), or None unless requested.
    attentions: [num_layers, batch, heads, length, length] probabilities, or None.
  """
  last_hidden_state: jax.Array
  pooled_output: jax.Array
  hidden_states: Optional[jax.Array] = None
  attentions: Optional[jax.Array] = None


def _dtypes(config: EncoderConfig) -> dict:
  return dict(dtype=dtype_of(config.dtype), param_dtype=dtype_of(config.param_dtype))


class EncoderLayer(nn.Module):
  """One post-LN Transformer layer; the `LayerStack` layer interface."""
  config: EncoderConfig
  output_hidden_states: bool = False
  output_attentions: bool = False

  @nn.compact
  def __call__(self, x_bld: jax.Array, side_b: Mapping[str, jax.Array],
               shared: Mapping[str, jax.Array], deterministic: bool = True):
    del shared
    cfg = self.config
    kw = dict(init_stddev=cfg.initializer_range, **_dtypes(cfg))
    attn_bld, probs_bhqk = layers.MultiHeadAttention(
        num_heads=cfg.num_heads, head_dim=cfg.head_dim, backend=cfg.attention,
        rsa_k=cfg.rsa_k, rsa_block_size=cfg.rsa_block_size,
        dropout_rate=cfg.attention_dropout, name="attention", **kw)(
            x_bld, key_mask_bl=side_b["attention_mask"], deterministic=deterministic,
            return_probs=self.output_attentions)
    attn_bld = layers.Dropout(cfg.hidden_dropout)(attn_bld, deterministic=deterministic)
    x_bld = layers.LayerNorm(cfg.layer_norm_eps, name="attention_norm",
                             **_dtypes(cfg))(x_bld + attn_bld)
    x_bld = layers.constrain(x_bld, ("batch", "length", "embed"))
    mlp_bld = layers.MLP(cfg.intermediate_size, activation=cfg.hidden_act,
                         name="mlp", **kw)(x_bld, deterministic=deterministic)
    mlp_bld = layers.Dropout(cfg.hidden_dropout)(mlp_bld, deterministic=deterministic)
    x_bld = layers.LayerNorm(cfg.layer_norm_eps, name="mlp_norm", **_dtypes(cfg))(
        x_bld + mlp_bld)
    x_bld = layers.constrain(x_bld, ("batch", "length", "embed"))
    return x_bld, layer_outputs(x_bld, probs_bhqk, self.output_hidden_states,
                                self.output_attentions)


class Embeddings(nn.Module):
  """Word + position + token-type embeddings, LayerNorm, dropout: [B, L] -> [B, L, E]."""
  config: EncoderConfig

  @nn.compact
  def __call__(self, input_ids, token_type_ids, position_ids, deterministic=True):
    cfg = self.config
    embed = lambda rows, axis, name: layers.Embed(
        rows, cfg.embed_dim, table_axis=axis, init_stddev=cfg.initializer_range,
        name=name, **_dtypes(cfg))
    x_ble = (embed(cfg.vocab_size, "vocab", "word")(input_ids)
             + embed(cfg.max_position_embeddings, None, "position")(position_ids)
             + embed(cfg.type_vocab_size, None, "token_type")(token_type_ids))
    x_ble = layers.LayerNorm(cfg.layer_norm_eps, name="norm", **_dtypes(cfg))(x_ble)
    return layers.Dropout(cfg.hidden_dropout)(x_ble, deterministic=deterministic)


def position_ids_for(config: EncoderConfig, input_ids: jax.Array) -> jax.Array:
  """Position ids [B, L]: 0..L-1, or RoBERTa's pad-skipping numbering from pad+1."""
  if config.model_type == "roberta":
    not_pad = (input_ids != config.pad_token_id).astype(jnp.int32)
    return jnp.cumsum(not_pad, axis=1) * not_pad + config.pad_token_id
  return jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32),
                          input_ids.shape)


class Encoder(nn.Module):
  """A BERT, RoBERTa or ALBERT encoder.

  Call: (input_ids [B, L], attention_mask [B, L] = all ones, token_type_ids [B, L] =
  zeros, position_ids = by model type) -> EncoderOutput.
  """
  config: EncoderConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None,
               token_type_ids: Optional[jax.Array] = None,
               position_ids: Optional[jax.Array] = None, *, deterministic: bool = True,
               output_hidden_states: bool = False,
               output_attentions: bool = False) -> EncoderOutput:
    cfg = self.config
    input_ids = layers.constrain(jnp.asarray(input_ids, jnp.int32), ("batch", "length"))
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    if position_ids is None:
      position_ids = position_ids_for(cfg, input_ids)
    x_bld = Embeddings(cfg, name="embeddings")(input_ids, token_type_ids, position_ids,
                                               deterministic)
    if cfg.embed_dim != cfg.hidden_size:
      # ALBERT's E -> H projection; E stays unsharded (it is small).
      x_bld = layers.Dense((cfg.hidden_size,), (None,), ("embed",),
                           init_stddev=cfg.initializer_range, name="embed_proj",
                           **_dtypes(cfg))(x_bld)
    x_bld = layers.constrain(x_bld, ("batch", "length", "embed"))
    embedded_bld = x_bld
    x_bld, per_layer = LayerStack(
        layer_cls=EncoderLayer,
        layer_kwargs=dict(config=cfg, output_hidden_states=output_hidden_states,
                          output_attentions=output_attentions),
        num_layers=cfg.num_layers, share_params=cfg.share_layers, **stack_options(cfg),
        name="encoder")(
            x_bld, {"attention_mask": attention_mask}, {}, deterministic)
    # A square kernel cannot map both dims to 'embed' (one mesh axis used twice).
    pooled_bd = jnp.tanh(layers.Dense((cfg.hidden_size,), ("embed",), ("mlp",),
                                      init_stddev=cfg.initializer_range, name="pooler",
                                      **_dtypes(cfg))(x_bld[:, 0]))
    hidden_states = None
    if output_hidden_states:
      if "hidden_states" not in per_layer:
        raise ValueError("output_hidden_states is not available with pipeline_stages > 1")
      hidden_states = jnp.concatenate([embedded_bld[None], per_layer["hidden_states"]])
    attentions = per_layer.get("attentions") if output_attentions else None
    if output_attentions and attentions is None:
      raise ValueError("output_attentions is not available with pipeline_stages > 1")
    return EncoderOutput(last_hidden_state=x_bld, pooled_output=pooled_bd,
                         hidden_states=hidden_states, attentions=attentions)
