"""GPT-2's typed config and its named sizes in the ModelZoo.

Field names follow transformers' GPT2Config. Sizes are the public checkpoints'
(openai-community/gpt2, -medium, -large, -xl): 124,439,808 / 354,823,168 /
774,030,080 / 1,557,611,200 parameters (the output layer is tied to the token
embedding, so it adds none).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from etjax.models import zoo
from etjax.models.config import raise_failed, runtime_checks
from etjax.models.layers import ACTIVATIONS


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  """A GPT-2 decoder-only language model (pre-LN Transformer, learned positions).

  `n_inner` None means 4 * n_embd. `use_token_types`: transformers adds
  wte(token_type_ids) to the input when token types are given; GPT-2 was pretrained
  without them, and etjax's classification batches always carry (zero) token types,
  so they are ignored unless this is True.
  """
  model_type: str = "gpt2"
  vocab_size: int = 50257
  n_positions: int = 1024
  n_embd: int = 768
  n_layer: int = 12
  n_head: int = 12
  n_inner: Optional[int] = None
  activation_function: str = "gelu_new"
  resid_pdrop: float = 0.1
  embd_pdrop: float = 0.1
  attn_pdrop: float = 0.1
  layer_norm_epsilon: float = 1e-5
  initializer_range: float = 0.02
  bos_token_id: int = 50256
  eos_token_id: int = 50256
  pad_token_id: Optional[int] = None
  use_token_types: bool = False
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
        (self.model_type == "gpt2", "model_type", "'gpt2'"),
        (min(self.vocab_size, self.n_positions, self.n_embd, self.n_layer, self.n_head,
             self.inner_size) > 0, "sizes", "positive"),
        (self.n_embd % self.n_head == 0, "n_embd", f"divisible by n_head={self.n_head}"),
        (self.activation_function in ACTIVATIONS, "activation_function",
         f"one of {sorted(ACTIVATIONS)}"),
        (all(0.0 <= p < 1.0 for p in (self.resid_pdrop, self.embd_pdrop, self.attn_pdrop)),
         "resid_pdrop", "dropout rates (resid, embd, attn) in [0, 1)"),
        (all(t is None or 0 <= t < self.vocab_size
             for t in (self.bos_token_id, self.eos_token_id, self.pad_token_id)),
         "eos_token_id", f"special token ids in [0, vocab_size={self.vocab_size})"),
        (self.pipeline_stages >= 1 and self.n_layer % self.pipeline_stages == 0,
         "pipeline_stages", f"a divisor of n_layer={self.n_layer}"),
    ]
    raise_failed(self, checks + runtime_checks(self))

  @property
  def head_dim(self) -> int:
    return self.n_embd // self.n_head

  @property
  def inner_size(self) -> int:
    """The feed-forward width (n_inner, or 4 * n_embd)."""
    return 4 * self.n_embd if self.n_inner is None else self.n_inner

  def num_params(self) -> int:
    """Parameter count: embeddings, n_layer blocks, the final norm (tied head)."""
    d, f = self.n_embd, self.inner_size
    block = 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d   # attention, MLP, 2 norms
    return (self.vocab_size + self.n_positions) * d + self.n_layer * block + 2 * d

  def replace(self, **changes) -> "GPT2Config":
    return dataclasses.replace(self, **changes)

  def build_module(self):
    """The GPT2 language model (etjax.models.gpt2.GPT2)."""
    from etjax.models import gpt2  # pylint: disable=g-import-not-at-top
    return gpt2.GPT2(self)


# name -> (n_embd, n_layer, n_head), from the public checkpoints' configs.
NAMED_SIZES = {
    "gpt2": (768, 12, 12),
    "gpt2-medium": (1024, 24, 16),
    "gpt2-large": (1280, 36, 20),
    "gpt2-xl": (1600, 48, 25),
}

for _name, _sizes in NAMED_SIZES.items():
  zoo.register(_name, lambda sizes=_sizes: GPT2Config(
      n_embd=sizes[0], n_layer=sizes[1], n_head=sizes[2]))
