"""Hugging Face names of T5 weights (see etjax.models.hf).

Loads T5Model, T5ForConditionalGeneration and T5EncoderModel directories (the encoder of
an encoder-decoder checkpoint too, with encoder_only=True) and saves directories that
transformers loads as T5ForConditionalGeneration or T5EncoderModel.
"""

from __future__ import annotations

from typing import Any, Mapping

from etjax.models.hf import (COPY, LINEAR, LINEAR_FROM_HEADS, Family, ParamRule,
                             register_family)
from etjax.models.t5_configs import T5Config

_SAME = ("vocab_size", "d_model", "d_kv", "num_heads", "d_ff", "num_layers",
         "num_decoder_layers", "relative_attention_num_buckets",
         "relative_attention_max_distance", "feed_forward_proj", "layer_norm_epsilon",
         "dropout_rate", "initializer_factor", "pad_token_id", "eos_token_id",
         "decoder_start_token_id")


def config_from_hf(hf: Mapping[str, Any]) -> T5Config:
  """T5Config from a transformers config.json dict.

  The head counts as untied when tie_word_embeddings is false, or (as transformers 5
  writes a T5 1.1 config) when scale_decoder_outputs is false.
  """
  values = {name: hf[name] for name in _SAME if hf.get(name) is not None}
  eos = values.get("eos_token_id")
  if isinstance(eos, (list, tuple)):
    if len(eos) != 1:
      raise ValueError(f"config.json: eos_token_id {eos!r}: T5 needs one end token")
    values["eos_token_id"] = eos[0]
  tied = (hf.get("tie_word_embeddings", True) is not False
          and hf.get("scale_decoder_outputs", True) is not False)
  encoder_only = list(hf.get("architectures") or []) == ["T5EncoderModel"]
  return T5Config(tie_word_embeddings=tied, encoder_only=encoder_only, **values)


def config_to_hf(config: T5Config) -> dict:
  """A transformers config.json dict for `config`."""
  hf = {name: getattr(config, name) for name in _SAME}
  hf.update(
      model_type="t5", is_encoder_decoder=True,
      architectures=["T5EncoderModel" if config.encoder_only
                     else "T5ForConditionalGeneration"],
      num_decoder_layers=config.decoder_layers,
      tie_word_embeddings=config.tie_word_embeddings)
  return hf


def _stack_rules(config: T5Config, prefix: str, decoder: bool) -> list[ParamRule]:
  """Rules for one stack ('encoder' or 'decoder'): relative bias, layers, final norm."""
  count = config.decoder_layers if decoder else config.num_layers
  block = prefix + ".block.{i}.layer."
  base = (prefix, "stack", "layers")
  rule = lambda name, path, transform=COPY: ParamRule(
      block + name, base + path, transform, stacked=True, num_layers=count)

  def attention(index: int, hf_name: str, ours: str) -> list[ParamRule]:
    part = f"{index}.{hf_name}."
    return [rule(part + "q.weight", (ours, "query", "kernel"), LINEAR),
            rule(part + "k.weight", (ours, "key", "kernel"), LINEAR),
            rule(part + "v.weight", (ours, "value", "kernel"), LINEAR),
            rule(part + "o.weight", (ours, "out", "kernel"), LINEAR_FROM_HEADS),
            rule(f"{index}.layer_norm.weight", (ours + "_norm", "scale"))]

  rules = [ParamRule(prefix + ".block.0.layer.0.SelfAttention.relative_attention_bias"
                     ".weight", (prefix, "relpos_bias", "embedding")),
           ParamRule(prefix + ".final_layer_norm.weight", (prefix, "final_norm", "scale"))]
  rules += attention(0, "SelfAttention", "self_attention")
  ff = 1
  if decoder:
    rules += attention(1, "EncDecAttention", "cross_attention")
    ff = 2
  wi = ("wi_0", "wi_1") if config.gated else ("wi",)
  rules += [rule(f"{ff}.DenseReluDense.{name}.weight", ("mlp", name, "kernel"), LINEAR)
            for name in wi + ("wo",)]
  rules.append(rule(f"{ff}.layer_norm.weight", ("mlp_norm", "scale")))
  return rules


def rules(config: T5Config) -> list[ParamRule]:
  """Every weight of a T5 of `config`, HF name <-> Flax path."""
  result = [ParamRule("shared.weight", ("shared", "embedding"))]
  result += _stack_rules(config, "encoder", decoder=False)
  if not config.encoder_only:
    result += _stack_rules(config, "decoder", decoder=True)
    if not config.tie_word_embeddings:
      # transformers 5 saves a head it was told not to tie but left tied only once,
      # as shared.weight.
      result.append(ParamRule("lm_head.weight", ("lm_head", "kernel"), LINEAR,
                              fallback="shared.weight"))
  return result


register_family(Family(
    model_types=("t5",),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    rules=rules,
    num_stacked=lambda config: config.num_layers,
    hf_prefixes=("transformer.",),
))
