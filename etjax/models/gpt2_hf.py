"""Hugging Face names of GPT-2 weights (see etjax.models.hf).

Loads GPT2Model and GPT2LMHeadModel directories (the head is tied to wte, so both hold
the same weights) and saves directories that transformers loads as GPT2LMHeadModel.
transformers' GPT-2 uses Conv1D layers, whose weights are already [in, out] like a
Flax kernel, and one fused c_attn projection for query, key and value, which maps to
three Flax kernels through `split`.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from etjax.models.gpt2_configs import GPT2Config
from etjax.models.hf import COPY, FLAT, Family, ParamRule, Transform, register_family

_SAME = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner",
         "activation_function", "resid_pdrop", "embd_pdrop", "attn_pdrop",
         "layer_norm_epsilon", "initializer_range", "bos_token_id", "eos_token_id",
         "pad_token_id")
# transformers options whose other values etjax does not implement.
_FIXED = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
          "reorder_and_upcast_attn": False, "add_cross_attention": False,
          "tie_word_embeddings": True}


def conv1d(n_in: int) -> Transform:
  """A Conv1D weight [in, out] <-> a Flax kernel whose first n_in dims are inputs."""
  return Transform(to_flax=lambda w, shape: w.reshape(shape),
                   to_hf=lambda k: k.reshape(int(np.prod(k.shape[:n_in])), -1))


def config_from_hf(hf: Mapping[str, Any]) -> GPT2Config:
  """GPT2Config from a transformers config.json dict."""
  for name, value in _FIXED.items():
    if hf.get(name, value) != value:
      raise ValueError(f"config.json: {name}={hf[name]!r} is not supported (etjax's GPT-2 "
                       f"implements {name}={value!r})")
  values = {name: hf[name] for name in _SAME if name in hf}
  for name in ("bos_token_id", "eos_token_id"):
    if isinstance(values.get(name), (list, tuple)):
      values[name] = values[name][0]
  values = {k: v for k, v in values.items() if v is not None or k in ("n_inner",
                                                                        "pad_token_id")}
  return GPT2Config(**values)


def config_to_hf(config: GPT2Config) -> dict:
  """A transformers config.json dict for `config`."""
  hf = {name: getattr(config, name) for name in _SAME}
  hf.update(_FIXED)
  hf.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
  return hf


def rules(config: GPT2Config) -> list[ParamRule]:
  """Every weight of a GPT-2 of `config`, HF name <-> Flax path."""
  del config
  base = ("h", "layers")
  layer = lambda name, path, transform=COPY, split=None: ParamRule(
      "h.{i}." + name, base + path, transform, stacked=True, split=split)
  result = [ParamRule("wte.weight", ("wte", "embedding")),
            ParamRule("wpe.weight", ("wpe", "embedding")),
            ParamRule("ln_f.weight", ("ln_f", "scale")),
            ParamRule("ln_f.bias", ("ln_f", "bias"))]
  for k, ours in enumerate(("query", "key", "value")):
    result += [layer("attn.c_attn.weight", ("attention", ours, "kernel"), conv1d(1),
                     (k, 3)),
               layer("attn.c_attn.bias", ("attention", ours, "bias"), FLAT, (k, 3))]
  result += [layer("attn.c_proj.weight", ("attention", "out", "kernel"), conv1d(2)),
             layer("attn.c_proj.bias", ("attention", "out", "bias")),
             layer("mlp.c_fc.weight", ("mlp", "wi", "kernel")),
             layer("mlp.c_fc.bias", ("mlp", "wi", "bias")),
             layer("mlp.c_proj.weight", ("mlp", "wo", "kernel")),
             layer("mlp.c_proj.bias", ("mlp", "wo", "bias"))]
  for norm in ("ln_1", "ln_2"):
    result += [layer(norm + ".weight", (norm, "scale")),
               layer(norm + ".bias", (norm, "bias"))]
  return result


register_family(Family(
    model_types=("gpt2",),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    rules=rules,
    num_stacked=lambda config: config.n_layer,
    hf_prefixes=("transformer.",),
))
