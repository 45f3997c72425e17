"""feat_ext_bert: vectors of a pretrained encoder for each text (no training).

--outputSchema picks among pool_output (the pooler's tanh([CLS]) vector),
first_token_output (the last layer at [CLS]) and all_hidden_outputs (every token's
last-layer vector, [sequenceLength, hidden] flattened; padding rows are zero). An
--outputTable ending in .npy gets the first column as one array [N, ...].
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from etjax.apps import base
from etjax.apps.classify import encode_texts


class FeatureExtractor(nn.Module):
  """The encoder's pooled, first-token and per-token vectors."""
  encoder: nn.Module

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids, *, deterministic=True):
    out = self.encoder(input_ids, attention_mask, token_type_ids,
                       deterministic=deterministic)
    tokens_bld = out.last_hidden_state * attention_mask[..., None].astype(jnp.float32)
    return {"pool_output": out.pooled_output.astype(jnp.float32),
            "first_token_output": out.last_hidden_state[:, 0].astype(jnp.float32),
            "all_hidden_outputs": tokens_bld.astype(jnp.float32)}


class FeatExtBert(base.App):
  name = "feat_ext_bert"
  description = ("write a pretrained encoder's pooled (and optionally per-token) "
                 "vectors to a TSV or .npy (no training: --mode=predict)")
  has_labels = False
  trainable = False
  output_columns = ("pool_output", "first_token_output", "all_hidden_outputs")
  default_output = ("pool_output",)

  def check_flags(self, cfg):
    if cfg.mode != "predict":
      raise ValueError(f"{self.name} extracts features from a pretrained model and has "
                       f"no --mode={cfg.mode}; use --mode=predict")
    super().check_flags(cfg)

  def encode(self, rows, ctx, with_labels):
    return {**encode_texts(rows, ctx), **base.batch_keys(len(rows))}

  def build(self, ctx):
    encoder, params = base.bert_backbone(ctx)
    return FeatureExtractor(encoder), ({"encoder": params} if params is not None
                                       else None)

  def loss_fn(self, module, ctx):
    def loss_fn(params, batch, rng, deterministic=True):
      del rng
      out = module.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                         batch["token_type_ids"], deterministic=deterministic)
      return jnp.zeros(()), out
    return loss_fn

  def output_rows(self, outputs, data, rows, ctx):
    return [{k: outputs[k][i] for k in self.output_columns} for i in range(len(rows))]
