"""Masked-language-model heads for BERT, RoBERTa and ALBERT (transformers' *ForMaskedLM).

The head is transform -> activation -> LayerNorm -> decoder tied to the word
embeddings, plus a per-token bias:
  - BERT: dense H -> H, hidden_act (cls.predictions.*);
  - RoBERTa: dense H -> H, exact GELU whatever hidden_act says (lm_head.*);
  - ALBERT: dense H -> E (the embedding width), hidden_act (predictions.*).

`MaskedLM(encoder)` keeps the encoder's parameters under 'encoder' (as
SequenceClassifier does, so continued pretraining hands them straight to a
classifier) and its head under 'lm_head'. Through etjax.models.hf:

    module, params = models.from_pretrained(path, head="mlm")
    models.save_pretrained(module, params, out)     # transformers loads *ForMaskedLM

A base-model directory (BertModel, e.g. all-MiniLM-L6-v2) has no head: it starts from
a fresh initialisation; a *ForMaskedLM directory has no pooler: the pooler does.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from etjax.models import bert_hf, hf, layers
from etjax.models.config import EncoderConfig, dtype_of


@flax.struct.dataclass
class MaskedLMOutput:
  """logits [batch, length, vocab] float32; encoder: the backbone's EncoderOutput."""
  logits: jax.Array
  encoder: object


class MLMHead(nn.Module):
  """[B, L, hidden] and the word-embedding table [vocab, E] -> logits [B, L, vocab]."""
  config: EncoderConfig

  @nn.compact
  def __call__(self, x_bld: jax.Array, table_ve: jax.Array) -> jax.Array:
    cfg = self.config
    dtypes = dict(dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))
    # A square kernel cannot map both dims to 'embed' (one mesh axis used twice).
    h_ble = layers.Dense((cfg.embed_dim,), ("embed",), ("mlp",),
                         init_stddev=cfg.initializer_range, name="transform",
                         **dtypes)(x_bld)
    act = "gelu" if cfg.model_type == "roberta" else cfg.hidden_act
    h_ble = layers.activation(act)(h_ble)
    h_ble = layers.LayerNorm(cfg.layer_norm_eps, name="norm", **dtypes)(h_ble)
    bias_v = self.param("bias", layers.logical_init(nn.initializers.zeros, ("vocab",)),
                        (cfg.vocab_size,), dtypes["param_dtype"])
    logits_blv = layers.project(h_ble, jnp.asarray(table_ve, h_ble.dtype).T, 1)
    logits_blv = logits_blv + bias_v.astype(jnp.float32)
    return layers.constrain(logits_blv, ("batch", "length", "vocab"))


class MaskedLM(nn.Module):
  """An encoder with its masked-LM head.

  Call: (input_ids [B, L], attention_mask, token_type_ids) -> MaskedLMOutput.
  """
  encoder: nn.Module
  hf_head = "mlm"  # the etjax.models.hf head that loads and saves it

  @property
  def config(self) -> EncoderConfig:
    return self.encoder.config

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None,
               token_type_ids: Optional[jax.Array] = None, *, deterministic: bool = True,
               output_hidden_states: bool = False,
               output_attentions: bool = False) -> MaskedLMOutput:
    enc = self.encoder(input_ids, attention_mask, token_type_ids,
                       deterministic=deterministic,
                       output_hidden_states=output_hidden_states,
                       output_attentions=output_attentions)
    table_ve = nn.meta.unbox(self.encoder.variables["params"]["embeddings"]["word"][
        "embedding"])
    logits_blv = MLMHead(self.config, name="lm_head")(enc.last_hidden_state, table_ve)
    return MaskedLMOutput(logits=logits_blv, encoder=enc)


# --- Hugging Face names ----------------------------------------------------------------

# model_type -> (backbone prefix in *ForMaskedLM, head prefix, transform, norm names).
_HF_HEADS = {
    "bert": ("bert.", "cls.predictions.", "transform.dense", "transform.LayerNorm"),
    "roberta": ("roberta.", "lm_head.", "dense", "layer_norm"),
    "albert": ("albert.", "predictions.", "dense", "LayerNorm"),
}
_ARCHITECTURES = {"bert": "BertForMaskedLM", "roberta": "RobertaForMaskedLM",
                  "albert": "AlbertForMaskedLM"}


def rules(config: EncoderConfig) -> list[hf.ParamRule]:
  """Every weight of a MaskedLM over an encoder of `config`: the encoder's (under
  'encoder', saved with the *ForMaskedLM prefix; loaded from either name; the pooler,
  which *ForMaskedLM lacks, optional) and the head's (optional: a base model's
  directory has none). The decoder is the word-embedding table, so it has no rule."""
  backbone, head, transform, norm = _HF_HEADS[config.model_type]
  result = [dataclasses.replace(
      rule, hf_name=backbone + rule.hf_name, flax_path=("encoder",) + rule.flax_path,
      fallback=rule.hf_name, optional=rule.flax_path[0] == "pooler")
            for rule in bert_hf.rules(config)]
  lm = lambda name, path, transform=hf.COPY: hf.ParamRule(
      head + name, ("lm_head",) + path, transform, optional=True)
  result += [lm(transform + ".weight", ("transform", "kernel"), hf.LINEAR),
             lm(transform + ".bias", ("transform", "bias")),
             lm(norm + ".weight", ("norm", "scale")),
             lm(norm + ".bias", ("norm", "bias")),
             lm("bias", ("bias",))]
  return result


hf.register_head(("bert", "roberta", "albert"), "mlm", hf.Head(
    build=MaskedLM, rules=rules,
    architecture=lambda config: _ARCHITECTURES[config.model_type]))
