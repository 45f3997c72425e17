"""Hugging Face names of BERT, RoBERTa and ALBERT weights (see etjax.models.hf)."""

from __future__ import annotations

from typing import Any, Mapping

from etjax.models.config import EncoderConfig
from etjax.models.hf import (COPY, FLAT, LINEAR, LINEAR_FROM_HEADS, Family, ParamRule,
                             register_family)

# Our field <- their field, for fields whose names differ.
_FROM_HF = {
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "hidden_dropout": "hidden_dropout_prob",
    "attention_dropout": "attention_probs_dropout_prob",
}
_SAME = ("vocab_size", "hidden_size", "intermediate_size", "max_position_embeddings",
         "type_vocab_size", "hidden_act", "layer_norm_eps", "initializer_range",
         "pad_token_id")


def config_from_hf(hf: Mapping[str, Any]) -> EncoderConfig:
  """EncoderConfig from a transformers config.json dict."""
  model_type = hf["model_type"]
  values = {name: hf[name] for name in _SAME if hf.get(name) is not None}
  values.update({ours: hf[theirs] for ours, theirs in _FROM_HF.items() if theirs in hf})
  if model_type == "albert":
    if hf.get("num_hidden_groups", 1) != 1 or hf.get("inner_group_num", 1) != 1:
      raise ValueError("ALBERT with num_hidden_groups or inner_group_num other than 1 "
                       "is not supported")
    values.update(embedding_size=hf["embedding_size"], share_layers=True)
  if hf.get("position_embedding_type", "absolute") != "absolute":
    raise ValueError(f"position_embedding_type {hf['position_embedding_type']!r} is not "
                     "supported (only 'absolute')")
  return EncoderConfig(model_type=model_type, **values)


def config_to_hf(config: EncoderConfig) -> dict:
  """A transformers config.json dict for `config`."""
  hf = {name: getattr(config, name) for name in _SAME}
  hf.update({theirs: getattr(config, ours) for ours, theirs in _FROM_HF.items()})
  architecture = {"bert": "BertModel", "roberta": "RobertaModel",
                  "albert": "AlbertModel"}[config.model_type]
  hf.update(model_type=config.model_type, architectures=[architecture],
            position_embedding_type="absolute")
  if config.model_type == "albert":
    hf.update(embedding_size=config.embed_dim, num_hidden_groups=1, inner_group_num=1)
  if config.model_type == "roberta":
    hf.update(bos_token_id=0, eos_token_id=2)
  return hf


def _embedding_rules() -> list[ParamRule]:
  return [
      ParamRule("embeddings.word_embeddings.weight", ("embeddings", "word", "embedding")),
      ParamRule("embeddings.position_embeddings.weight",
                ("embeddings", "position", "embedding")),
      ParamRule("embeddings.token_type_embeddings.weight",
                ("embeddings", "token_type", "embedding")),
      ParamRule("embeddings.LayerNorm.weight", ("embeddings", "norm", "scale")),
      ParamRule("embeddings.LayerNorm.bias", ("embeddings", "norm", "bias")),
  ]


def _layer_rules(names: Mapping[str, str], stacked: bool) -> list[ParamRule]:
  """Rules for one encoder layer, given the HF module name of each of our parts."""
  base = ("encoder", "layers")
  rules = []
  for ours in ("query", "key", "value"):
    rules += [ParamRule(names[ours] + ".weight", base + ("attention", ours, "kernel"),
                        LINEAR, stacked),
              ParamRule(names[ours] + ".bias", base + ("attention", ours, "bias"),
                        FLAT, stacked)]
  parts = [("out", ("attention", "out"), LINEAR_FROM_HEADS),
           ("wi", ("mlp", "wi"), LINEAR), ("wo", ("mlp", "wo"), LINEAR)]
  for ours, path, transform in parts:
    rules += [ParamRule(names[ours] + ".weight", base + path + ("kernel",), transform,
                        stacked),
              ParamRule(names[ours] + ".bias", base + path + ("bias",), COPY, stacked)]
  for ours in ("attention_norm", "mlp_norm"):
    rules += [ParamRule(names[ours] + ".weight", base + (ours, "scale"), COPY, stacked),
              ParamRule(names[ours] + ".bias", base + (ours, "bias"), COPY, stacked)]
  return rules


_BERT_LAYER = {
    "query": "encoder.layer.{i}.attention.self.query",
    "key": "encoder.layer.{i}.attention.self.key",
    "value": "encoder.layer.{i}.attention.self.value",
    "out": "encoder.layer.{i}.attention.output.dense",
    "attention_norm": "encoder.layer.{i}.attention.output.LayerNorm",
    "wi": "encoder.layer.{i}.intermediate.dense",
    "wo": "encoder.layer.{i}.output.dense",
    "mlp_norm": "encoder.layer.{i}.output.LayerNorm",
}
_ALBERT = "encoder.albert_layer_groups.0.albert_layers.0."
_ALBERT_LAYER = {
    "query": _ALBERT + "attention.query",
    "key": _ALBERT + "attention.key",
    "value": _ALBERT + "attention.value",
    "out": _ALBERT + "attention.dense",
    "attention_norm": _ALBERT + "attention.LayerNorm",
    "wi": _ALBERT + "ffn",
    "wo": _ALBERT + "ffn_output",
    "mlp_norm": _ALBERT + "full_layer_layer_norm",
}


def rules(config: EncoderConfig) -> list[ParamRule]:
  """Every weight of an encoder of `config`, HF name <-> Flax path."""
  if config.model_type == "albert":
    return (_embedding_rules() + _layer_rules(_ALBERT_LAYER, stacked=False) + [
        ParamRule("encoder.embedding_hidden_mapping_in.weight", ("embed_proj", "kernel"),
                  LINEAR),
        ParamRule("encoder.embedding_hidden_mapping_in.bias", ("embed_proj", "bias")),
        ParamRule("pooler.weight", ("pooler", "kernel"), LINEAR),
        ParamRule("pooler.bias", ("pooler", "bias")),
    ])
  return (_embedding_rules() + _layer_rules(_BERT_LAYER, stacked=True) + [
      ParamRule("pooler.dense.weight", ("pooler", "kernel"), LINEAR),
      ParamRule("pooler.dense.bias", ("pooler", "bias")),
  ])


register_family(Family(
    model_types=("bert", "roberta", "albert"),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    rules=rules,
    num_stacked=lambda config: 1 if config.share_layers else config.num_layers,
    hf_prefixes=("bert.", "roberta.", "albert."),
))
