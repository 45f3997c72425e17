"""T5's typed config and its named sizes in the ModelZoo.

Two flavours (Raffel et al. 2020 and the T5 1.1 checkpoints):
  - T5 1.0: ReLU feed-forward, the output layer tied to the embedding (logits scaled by
    d_model**-0.5), sizes t5-{small,base,large,3b,11b};
  - T5 1.1: gated-GELU feed-forward, an untied output layer, no dropout in pre-training,
    sizes t5.1.1-{small,base,large,xl,xxl}.
T5-11B is the paper's: 24 + 24 layers, d_model 1024, d_ff 65536, 128 heads of 128.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from etjax.models import zoo
from etjax.models.config import raise_failed, runtime_checks
from etjax.models.layers import ACTIVATIONS

# transformers maps feed_forward_proj 'gated-gelu' to the tanh GELU (T5 1.1 was trained
# with it); every other activation keeps its own name.
_HF_ACTIVATION = {"gelu": "gelu_new"}


@dataclasses.dataclass(frozen=True)
class T5Config:
  """A T5 encoder-decoder (or its encoder alone, with `encoder_only`).

  Field names follow transformers' T5Config. `num_decoder_layers` None means as many as
  `num_layers`. `feed_forward_proj` is an activation name, or 'gated-' + one (T5 1.1).
  """
  model_type: str = "t5"
  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  num_heads: int = 8
  d_ff: int = 2048
  num_layers: int = 6
  num_decoder_layers: Optional[int] = None
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  feed_forward_proj: str = "relu"
  tie_word_embeddings: bool = True
  layer_norm_epsilon: float = 1e-6
  dropout_rate: float = 0.1
  initializer_factor: float = 1.0
  pad_token_id: int = 0
  eos_token_id: int = 1
  decoder_start_token_id: int = 0
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention: str = "dense"
  rsa_k: int = 4
  rsa_block_size: int = 64
  remat_policy: str = "none"
  scan_unroll: int = 1
  pipeline_stages: int = 1
  pipeline_microbatches: int = 1
  encoder_only: bool = False

  def __post_init__(self):
    act = self.feed_forward_proj.split("-")
    checks = [
        (self.model_type == "t5", "model_type", "'t5'"),
        ((len(act) == 1 or (len(act) == 2 and act[0] == "gated")) and act[-1] in ACTIVATIONS,
         "feed_forward_proj", f"an activation or 'gated-' + one, of {sorted(ACTIVATIONS)}"),
        (min(self.vocab_size, self.d_model, self.d_kv, self.num_heads, self.d_ff,
             self.num_layers, self.decoder_layers) > 0, "sizes", "positive"),
        (self.relative_attention_num_buckets >= 4, "relative_attention_num_buckets",
         "at least 4 (half exact, half logarithmic, on each side)"),
        (self.relative_attention_max_distance > self.relative_attention_num_buckets // 2,
         "relative_attention_max_distance",
         "larger than the exact buckets (relative_attention_num_buckets // 2)"),
        (0.0 <= self.dropout_rate < 1.0, "dropout_rate", "in [0, 1)"),
        (min(self.pad_token_id, self.eos_token_id, self.decoder_start_token_id) >= 0
         and max(self.pad_token_id, self.eos_token_id,
                 self.decoder_start_token_id) < self.vocab_size,
         "pad_token_id", f"special token ids in [0, vocab_size={self.vocab_size})"),
        (self.pipeline_stages >= 1 and self.num_layers % self.pipeline_stages == 0
         and (self.encoder_only or self.decoder_layers % self.pipeline_stages == 0),
         "pipeline_stages", f"a divisor of num_layers={self.num_layers} and "
         f"num_decoder_layers={self.decoder_layers}"),
    ]
    raise_failed(self, checks + runtime_checks(self))

  @property
  def decoder_layers(self) -> int:
    """The decoder's depth (num_decoder_layers, or num_layers when that is None)."""
    return self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers

  @property
  def gated(self) -> bool:
    """Whether the feed-forward is gated (T5 1.1): wo(act(wi_0 x) * wi_1 x)."""
    return self.feed_forward_proj.startswith("gated-")

  @property
  def activation(self) -> str:
    """The feed-forward activation's name in etjax.models.layers.ACTIVATIONS."""
    act = self.feed_forward_proj.split("-")[-1]
    return _HF_ACTIVATION.get(act, act) if self.gated else act

  def replace(self, **changes) -> "T5Config":
    return dataclasses.replace(self, **changes)

  def build_module(self):
    """T5Encoder when `encoder_only`, else T5Model (see etjax.models.t5)."""
    from etjax.models import t5  # pylint: disable=g-import-not-at-top
    return t5.T5Encoder(self) if self.encoder_only else t5.T5Model(self)


def _t5(d_model, d_ff, d_kv, heads, layers) -> T5Config:
  return T5Config(d_model=d_model, d_ff=d_ff, d_kv=d_kv, num_heads=heads,
                  num_layers=layers)


def _t5_1_1(d_model, d_ff, d_kv, heads, layers) -> T5Config:
  return T5Config(d_model=d_model, d_ff=d_ff, d_kv=d_kv, num_heads=heads,
                  num_layers=layers, feed_forward_proj="gated-gelu",
                  tie_word_embeddings=False, dropout_rate=0.0)


# name -> (flavour, d_model, d_ff, d_kv, heads, layers per stack), from the public
# checkpoints' configs (google-t5/t5-*, google/t5-v1_1-*).
NAMED_SIZES = {
    "t5-small": (_t5, 512, 2048, 64, 8, 6),
    "t5-base": (_t5, 768, 3072, 64, 12, 12),
    "t5-large": (_t5, 1024, 4096, 64, 16, 24),
    "t5-3b": (_t5, 1024, 16384, 128, 32, 24),
    "t5-11b": (_t5, 1024, 65536, 128, 128, 24),
    "t5.1.1-small": (_t5_1_1, 512, 1024, 64, 6, 8),
    "t5.1.1-base": (_t5_1_1, 768, 2048, 64, 12, 12),
    "t5.1.1-large": (_t5_1_1, 1024, 2816, 64, 16, 24),
    "t5.1.1-xl": (_t5_1_1, 2048, 5120, 64, 32, 24),
    "t5.1.1-xxl": (_t5_1_1, 4096, 10240, 64, 64, 24),
}

for _name, (_flavour, *_sizes) in NAMED_SIZES.items():
  zoo.register(_name, lambda flavour=_flavour, sizes=tuple(_sizes): flavour(*sizes))
