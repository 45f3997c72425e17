"""Typed, validated model configs (frozen dataclasses).

Unknown or inconsistent fields fail at construction with a message naming the field.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, TypeVar

import jax.numpy as jnp

from etjax.models.attention import BACKENDS
from etjax.models.layers import ACTIVATIONS
from etjax.models.remat import REMAT_POLICIES

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

C = TypeVar("C")


def dtype_of(name: str):
  """Maps 'float32' | 'bfloat16' | 'float16' to a jnp dtype."""
  if name not in DTYPES:
    raise ValueError(f"unknown dtype {name!r}; known: {sorted(DTYPES)}")
  return DTYPES[name]


def config_from_dict(cls: type[C], values: Mapping[str, Any], where: str = "") -> C:
  """Builds config `cls` from a mapping, naming any unknown field and where it came from."""
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - names)
  if unknown:
    origin = f" in {where}" if where else ""
    raise ValueError(f"unknown {cls.__name__} field(s) {unknown}{origin}; "
                     f"known fields: {sorted(names)}")
  return cls(**values)


Check = tuple[bool, str, str]  # (holds, field name, what was expected)


def runtime_checks(config: Any) -> list[Check]:
  """Checks of the fields every model config shares: precision, attention backend,
  rematerialization, layer-scan unrolling and pipeline microbatches."""
  return [
      (config.attention in BACKENDS, "attention", f"one of {BACKENDS}"),
      (config.remat_policy in REMAT_POLICIES, "remat_policy",
       f"one of {sorted(REMAT_POLICIES)}"),
      (config.dtype in DTYPES, "dtype", f"one of {sorted(DTYPES)}"),
      (config.param_dtype in DTYPES, "param_dtype", f"one of {sorted(DTYPES)}"),
      (config.rsa_k >= 1 and config.rsa_block_size >= 1, "rsa_k",
       "rsa_k and rsa_block_size positive"),
      (config.scan_unroll >= 1, "scan_unroll", "positive"),
      (config.pipeline_microbatches >= 1, "pipeline_microbatches", "positive"),
  ]


def raise_failed(config: Any, checks: list[Check]) -> None:
  """Raises ValueError naming the first failed check's field, value and expectation."""
  for ok, name, expected in checks:
    if not ok:
      raise ValueError(f"{type(config).__name__}.{name} = {getattr(config, name, None)!r}:"
                       f" expected {expected}")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """A BERT-family encoder: BERT, RoBERTa, ALBERT.

  ALBERT is the same post-LN encoder with factorized embeddings (embedding_size <
  hidden_size, projected up) and one layer's parameters shared by all layers.
  RoBERTa numbers positions from pad_token_id + 1, skipping padding.
  """
  model_type: str = "bert"
  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  embedding_size: Optional[int] = None
  share_layers: bool = False
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-12
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  initializer_range: float = 0.02
  pad_token_id: int = 0
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention: str = "dense"
  rsa_k: int = 4
  rsa_block_size: int = 64
  remat_policy: str = "none"
  scan_unroll: int = 1
  pipeline_stages: int = 1
  pipeline_microbatches: int = 1

  def __post_init__(self):
    checks = [
        (self.model_type in ("bert", "roberta", "albert"),
         "model_type", "one of bert, roberta, albert"),
        (self.hidden_size % self.num_heads == 0, "hidden_size",
         f"divisible by num_heads={self.num_heads}"),
        (self.hidden_act in ACTIVATIONS, "hidden_act", f"one of {sorted(ACTIVATIONS)}"),
        (min(self.vocab_size, self.hidden_size, self.num_layers, self.num_heads,
             self.intermediate_size, self.max_position_embeddings) > 0,
         "sizes", "positive"),
        (self.pipeline_stages >= 1 and self.num_layers % self.pipeline_stages == 0,
         "pipeline_stages", f"a divisor of num_layers={self.num_layers}"),
    ]
    raise_failed(self, checks + runtime_checks(self))

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def embed_dim(self) -> int:
    """Width of the embedding tables (ALBERT's E; the hidden size otherwise)."""
    return self.embedding_size or self.hidden_size

  def replace(self, **changes) -> "EncoderConfig":
    return dataclasses.replace(self, **changes)
