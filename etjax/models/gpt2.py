"""GPT-2 (Radford et al. 2019): a decoder-only language model, as transformers'
GPT2LMHeadModel.

Pre-LN Transformer: token + learned position embeddings, dropout, a scanned stack of
blocks x + attn(ln_1(x)), x + mlp(ln_2(x)) with causal self-attention, a final
LayerNorm, and logits from the token embedding (tied output layer).

Parameters (Flax paths): wte/embedding [vocab, embed]; wpe/embedding [positions,
embed]; h/layers/{ln_1, attention/{query,key,value,out}, ln_2, mlp/{wi,wo}} stacked on
'layers'; ln_f/{scale,bias}.

The same module is a classification backbone: its output has `pooled_output`, the
hidden state of each row's last non-padding token (as GPT2ForSequenceClassification
pools), so etjax.models.SequenceClassifier takes it as its encoder.
"""

from __future__ import annotations

from typing import Mapping, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from etjax.models import layers
from etjax.models.config import dtype_of
from etjax.models.gpt2_configs import GPT2Config
from etjax.models.stack import LayerStack, layer_outputs, stack_options


@flax.struct.dataclass
class GPT2Output:
  """What GPT2 returns.

  Attributes:
    logits: [batch, length, vocab] next-token scores, float32.
    last_hidden_state: [batch, length, embed], after the final LayerNorm.
    pooled_output: [batch, embed], the last non-padding token's hidden state
      (None when decoding with a cache).
    hidden_states: [n_layer + 1, batch, length, embed] as transformers orders them
      (embeddings, each block's output, the last one after ln_f), or None.
    attentions: [n_layer, batch, heads, length, length] probabilities, or None.
  """
  logits: jax.Array
  last_hidden_state: jax.Array
  pooled_output: Optional[jax.Array] = None
  hidden_states: Optional[jax.Array] = None
  attentions: Optional[jax.Array] = None


def _dtypes(config: GPT2Config) -> dict:
  return dict(dtype=dtype_of(config.dtype), param_dtype=dtype_of(config.param_dtype))


class GPT2Block(nn.Module):
  """One pre-LN GPT-2 block; the `LayerStack` layer interface.

  side_b['attention_mask'] [B, K] masks the keys (K = the cache length when decoding).
  """
  config: GPT2Config
  decode: bool = False
  output_hidden_states: bool = False
  output_attentions: bool = False

  @nn.compact
  def __call__(self, x_bld: jax.Array, side_b: Mapping[str, jax.Array],
               shared: Mapping[str, jax.Array], deterministic: bool = True):
    del shared
    cfg = self.config
    norm = lambda name: layers.LayerNorm(cfg.layer_norm_epsilon, name=name, **_dtypes(cfg))
    dropout = lambda y: layers.Dropout(cfg.resid_pdrop)(y, deterministic=deterministic)
    # transformers scales the output projections' init by 1/sqrt(2 n_layer) (GPT-2
    # paper, section 2.3): the residual stream sums 2 n_layer of them.
    out_stddev = cfg.initializer_range / (2 * cfg.n_layer) ** 0.5
    attn_bld, probs_bhqk = layers.MultiHeadAttention(
        num_heads=cfg.n_head, head_dim=cfg.head_dim, backend=cfg.attention,
        rsa_k=cfg.rsa_k, rsa_block_size=cfg.rsa_block_size, dropout_rate=cfg.attn_pdrop,
        init_stddev=cfg.initializer_range, out_init_stddev=out_stddev,
        decode=self.decode, name="attention", **_dtypes(cfg))(
            norm("ln_1")(x_bld), key_mask_bl=side_b["attention_mask"], causal=True,
            deterministic=deterministic, return_probs=self.output_attentions)
    x_bld = layers.constrain(x_bld + dropout(attn_bld), ("batch", "length", "embed"))
    mlp_bld = layers.MLP(cfg.inner_size, activation=cfg.activation_function,
                         init_stddev=cfg.initializer_range, out_init_stddev=out_stddev,
                         name="mlp", **_dtypes(cfg))(norm("ln_2")(x_bld), deterministic)
    x_bld = layers.constrain(x_bld + dropout(mlp_bld), ("batch", "length", "embed"))
    return x_bld, layer_outputs(x_bld, probs_bhqk, self.output_hidden_states,
                                self.output_attentions)


def last_token_index(attention_mask: jax.Array) -> jax.Array:
  """int32 [B]: the position of each row's last nonzero mask entry (0 if none)."""
  length = attention_mask.shape[1]
  return jnp.argmax(jnp.arange(length) * (attention_mask != 0), axis=-1).astype(jnp.int32)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
  """Position ids [B, L] counting only unmasked tokens (left padding gets 0), as
  transformers' generate numbers a padded prompt: cumsum(mask) - 1, 0 on padding."""
  mask = (attention_mask != 0).astype(jnp.int32)
  return jnp.where(mask > 0, jnp.cumsum(mask, axis=1) - 1, 0)


class GPT2(nn.Module):
  """GPT-2 with its tied language-model head.

  Call: (input_ids [B, L], attention_mask [B, L] = all ones, token_type_ids (ignored
  unless config.use_token_types), position_ids [B, L] = 0..L-1) -> GPT2Output.

  With `decode=True` the attention layers keep key/value caches (see
  etjax.models.generate): a first call with mutable=['cache'] on [B, max_length]
  tokens makes them (or jax.eval_shape of that call gives their zero-filled shapes);
  each later call takes the next n tokens [B, n] with their position_ids, and an
  attention_mask covering all max_length cache positions.
  """
  config: GPT2Config
  decode: bool = False

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None,
               token_type_ids: Optional[jax.Array] = None,
               position_ids: Optional[jax.Array] = None, *, deterministic: bool = True,
               output_hidden_states: bool = False,
               output_attentions: bool = False) -> GPT2Output:
    cfg = self.config
    input_ids = layers.constrain(jnp.asarray(input_ids, jnp.int32), ("batch", "length"))
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if position_ids is None:
      if self.decode:
        raise ValueError("GPT2(decode=True) needs position_ids for the tokens it is given")
      position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32),
                                      input_ids.shape)
    wte = layers.Embed(cfg.vocab_size, cfg.n_embd, table_axis="vocab",
                       init_stddev=cfg.initializer_range, name="wte", **_dtypes(cfg))
    wpe = layers.Embed(cfg.n_positions, cfg.n_embd, table_axis=None,
                       init_stddev=cfg.initializer_range, name="wpe", **_dtypes(cfg))
    x_bld = wte(input_ids) + wpe(position_ids)
    if cfg.use_token_types and token_type_ids is not None:
      x_bld = x_bld + wte(token_type_ids)
    x_bld = layers.Dropout(cfg.embd_pdrop)(x_bld, deterministic=deterministic)
    x_bld = layers.constrain(x_bld, ("batch", "length", "embed"))
    embedded_bld = x_bld
    stack_cfg = stack_options(cfg)
    if self.decode and cfg.pipeline_stages > 1:
      raise ValueError("GPT-2 decoding with a cache runs the plain stack: use a config "
                       "with pipeline_stages=1 (the parameters are the same)")
    x_bld, per_layer = LayerStack(
        layer_cls=GPT2Block,
        layer_kwargs=dict(config=cfg, decode=self.decode,
                          output_hidden_states=output_hidden_states,
                          output_attentions=output_attentions),
        num_layers=cfg.n_layer, **stack_cfg, name="h")(
            x_bld, {"attention_mask": attention_mask}, {}, deterministic)
    x_bld = layers.LayerNorm(cfg.layer_norm_epsilon, name="ln_f", **_dtypes(cfg))(x_bld)
    x_bld = layers.constrain(x_bld, ("batch", "length", "embed"))
    logits_blv = layers.constrain(wte.attend(x_bld).astype(jnp.float32),
                                  ("batch", "length", "vocab"))
    pooled_bd = None
    if not self.decode:
      index_b = last_token_index(attention_mask)
      pooled_bd = jnp.take_along_axis(x_bld, index_b[:, None, None], axis=1)[:, 0]
    if (output_hidden_states or output_attentions) and not per_layer:
      raise ValueError("output_hidden_states and output_attentions are not available "
                       "with pipeline_stages > 1")
    hidden_states = attentions = None
    if output_hidden_states:
      hidden_states = jnp.concatenate([embedded_bld[None], per_layer["hidden_states"][:-1],
                                       x_bld[None]])
    if output_attentions:
      attentions = per_layer["attentions"]
    return GPT2Output(logits=logits_blv, last_hidden_state=x_bld, pooled_output=pooled_bd,
                      hidden_states=hidden_states, attentions=attentions)
