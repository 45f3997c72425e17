"""The shared/private (shared-specific) model of the feature-based TL algorithms.

One module covers the whole family (Liu et al. 2017; Yu et al. 2018's DRSS):

    s_b   = shared(x_b)                        shared features      [B, Ds]
    p_b   = private[domain_b](x_b)             private features     [B, Dp]  (optional)
    logits_b = head([s_b; p_b])                one head for every domain, or
             = head_{domain_b}([s_b; p_b])     one output layer per domain (DRSS)
    domain_logits_b = D(R(s_b))                a discriminator behind gradient
                                               reversal R (optional, the -Adv methods)

FullyShared has no private encoders and one head; SharedPrivate adds the private
encoders; DRSS gives each domain its own output layer, whose weights on the shared
features are the W of the matrix-normal prior (see `shared_head_weights`).

Two ways to run the private encoders, the same mathematics:
- rows of any domains (`domain_blocks=0`): every private encoder runs on every row
  and each row's own domain is picked (K times one private encoder's cost);
- domain-blocked batches (`domain_blocks=K`, etjax.data.streams.domain_blocked_stream):
  the batch is K equal contiguous blocks, block k holding rows of domain k, and private
  encoder k runs on block k only (one private pass per row). Training uses this.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from etjax.algorithms.reversal import gradient_reversal
from etjax.algorithms.tl_modules import DomainDiscriminator
from etjax.models import layers


@flax.struct.dataclass
class SharedPrivateOutput:
  """logits [B, C]; features [B, Ds + Dp] (the head's input); shared [B, Ds];
  own_private [B, Dp] (each row's own domain's private features) or None;
  private [K, B, Dp] (every domain's private encoder on every row; None for
  domain-blocked batches, which run each encoder on its own block only);
  domain_logits [B, K] or None."""
  logits: jax.Array
  features: jax.Array
  shared: jax.Array
  private: Optional[jax.Array]
  domain_logits: Optional[jax.Array]
  own_private: Optional[jax.Array] = None


def _param(module: nn.Module, name: str, shape: Sequence[int], axes: Sequence[Any],
           stddev: float, tied_first_axis: bool = False) -> jax.Array:
  init = nn.initializers.normal(stddev) if stddev else nn.initializers.zeros
  if tied_first_axis:
    base = init
    def init(key, shape, dtype):  # pylint: disable=function-redefined
      return jnp.broadcast_to(base(key, (1,) + tuple(shape[1:]), dtype), shape)
  return module.param(name, layers.logical_init(init, axes), tuple(shape), jnp.float32)


class SharedPrivateClassifier(nn.Module):
  """Shared encoder, optional private encoders, one or per-domain heads, optional
  adversarial domain discriminator.

  Attributes:
    shared: the shared encoder (returns an output with `.pooled_output`).
    private: one encoder per domain, or () for FullyShared.
    num_domains: K; batch 'domain' ids must lie in [0, K).
    num_labels: C.
    domain_heads: one output layer per domain (DRSS) instead of one shared head.
    discriminator_hidden: hidden width of the domain discriminator; None for none.
    dropout_rate: dropout on the head's input.
    initializer_range: stddev of the heads' initializers.
    tied_head_init: start every domain's output layer (shared-feature part) from
      the same initial weights.
    common_head: with domain_heads, add one head shared by every domain, so the
      per-domain layers (and Omega) model each domain's departure from it.
  """
  shared: nn.Module
  private: Sequence[nn.Module] = ()
  num_domains: int = 2
  num_labels: int = 2
  domain_heads: bool = False
  discriminator_hidden: Optional[int] = None
  dropout_rate: float = 0.0
  initializer_range: float = 0.02
  tied_head_init: bool = False
  common_head: bool = False

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None,
               token_type_ids: Optional[jax.Array] = None,
               domain: Optional[jax.Array] = None, *, deterministic: bool = True,
               grl_scale: Any = 1.0, domain_blocks: int = 0) -> SharedPrivateOutput:
    """Runs the model on a batch whose rows come from domains `domain` (int [B]).

    Args:
      domain_blocks: 0 for rows of any domains; K (static) for a domain-blocked batch:
        K equal contiguous blocks of B / K rows, block k of domain k (`domain` must
        say the same; the heads and discriminator read it).

    Returns:
      SharedPrivateOutput (see its docstring for shapes).
    """
    self._check_call(input_ids, domain, domain_blocks)
    inputs = (input_ids, attention_mask, token_type_ids)
    shared_bd = self.shared(*inputs, deterministic=deterministic).pooled_output
    onehot_bk = (None if domain is None else jax.nn.one_hot(
        jnp.asarray(domain, jnp.int32), self.num_domains, dtype=jnp.float32))
    private_kbe, own_be = self._private(inputs, onehot_bk, deterministic, domain_blocks)
    features_bf = (shared_bd if own_be is None
                   else jnp.concatenate([shared_bd, own_be], -1))
    logits_bc = self._logits(features_bf, shared_bd.shape[-1], onehot_bk, deterministic)
    domain_logits_bk = None
    if self.discriminator_hidden is not None:
      domain_logits_bk = DomainDiscriminator(self.num_domains, self.discriminator_hidden,
                                             name="discriminator")(
          gradient_reversal(shared_bd, grl_scale))
    return SharedPrivateOutput(logits=logits_bc.astype(jnp.float32), features=features_bf,
                               shared=shared_bd, private=private_kbe,
                               domain_logits=domain_logits_bk, own_private=own_be)

  def _check_call(self, input_ids, domain, domain_blocks: int) -> None:
    """Raises ValueError for a batch or configuration the call cannot run."""
    k = self.num_domains
    if domain_blocks and domain_blocks != k:
      raise ValueError(f"SharedPrivateClassifier: domain_blocks={domain_blocks}; a "
                       f"domain-blocked batch has one block per domain ({k})")
    if domain_blocks and input_ids.shape[0] % k:
      raise ValueError(f"SharedPrivateClassifier: a domain-blocked batch of "
                       f"{input_ids.shape[0]} rows does not split into {k} equal "
                       f"blocks (one per domain); make the batch size a multiple of {k}")
    if self.private and len(self.private) != k:
      raise ValueError(f"SharedPrivateClassifier: {len(self.private)} private encoders "
                       f"for num_domains={k}; give one per domain or none")
    if (self.private or self.domain_heads) and domain is None:
      raise ValueError("SharedPrivateClassifier: private encoders and per-domain heads "
                       "need the batch's 'domain' ids")

  def _private(self, inputs, onehot_bk, deterministic: bool, domain_blocks: int):
    """(private [K, B, Dp] or None, own_private [B, Dp] or None): see
    SharedPrivateOutput; None, None without private encoders."""
    if not self.private:
      return None, None
    if domain_blocks:
      # Private encoder k on block k only: static slices, one private pass per row.
      size = inputs[0].shape[0] // self.num_domains
      own_be = jnp.concatenate([
          enc(*(None if x is None else x[i * size:(i + 1) * size] for x in inputs),
              deterministic=deterministic).pooled_output
          for i, enc in enumerate(self.private)])
      return None, own_be
    # Every private encoder runs on every row and the row's own domain is picked:
    # static shapes, at K times one private encoder's cost.
    private_kbe = jnp.stack([enc(*inputs, deterministic=deterministic).pooled_output
                             for enc in self.private])
    return private_kbe, jnp.einsum("kbe,bk->be", private_kbe, onehot_bk)

  def _logits(self, features_bf, shared_width: int, onehot_bk,
              deterministic: bool) -> jax.Array:
    """[B, C] logits: the shared head, the row's own domain's head, or both."""
    x_bf = layers.Dropout(self.dropout_rate)(features_bf, deterministic=deterministic)
    logits_bc = 0.0
    if not self.domain_heads or self.common_head:
      logits_bc = layers.Dense((self.num_labels,), ("embed",), ("classes",),
                               init_stddev=self.initializer_range, name="head")(x_bf)
    if self.domain_heads:
      logits_bc += self._domain_heads(x_bf, shared_width, onehot_bk)
    return logits_bc

  def _domain_heads(self, x_bf: jax.Array, shared_width: int,
                    onehot_bk: jax.Array) -> jax.Array:
    """Per-domain output layers; the row's own domain's logits: [B, C]."""
    k, c = self.num_domains, self.num_labels
    # tied_head_init: every domain's output layer starts equal, so the domains
    # start fully related and training pulls apart those the data tells apart.
    # (Nearly collinear columns make W^T W ill-conditioned, and Omega's square
    # root then amplifies round-off; the default starts them independent.)
    w_shared_kdc = _param(self, "shared_kernel", (k, shared_width, c),
                          (None, "embed", "classes"), self.initializer_range,
                          tied_first_axis=self.tied_head_init)
    logits_bkc = jnp.einsum("bd,kdc->bkc", x_bf[:, :shared_width], w_shared_kdc)
    if x_bf.shape[-1] > shared_width:
      w_private_kec = _param(self, "private_kernel",
                             (k, x_bf.shape[-1] - shared_width, c),
                             (None, "embed", "classes"), self.initializer_range)
      logits_bkc += jnp.einsum("be,kec->bkc", x_bf[:, shared_width:], w_private_kec)
    bias_kc = _param(self, "bias", (k, c), (None, "classes"), 0.0)
    return jnp.einsum("bkc,bk->bc", logits_bkc + bias_kc, onehot_bk)


def shared_head_weights(params: Any) -> jax.Array:
  """DRSS's W: each domain's output weights on the shared features as one column.

  Only the shared-feature weights are compared across domains: they act on one common
  feature space, while each domain's private weights act on a space of its own.

  Args:
    params: the (unboxed) parameters of a SharedPrivateClassifier with domain_heads.

  Returns:
    [Ds * C, K] W (column k = domain k's flattened [Ds, C] kernel).
  """
  if "shared_kernel" not in params:
    raise ValueError("shared_head_weights: the model has no per-domain heads "
                     "(domain_heads=False); DRSS needs them")
  w_kdc = nn.meta.unbox(params["shared_kernel"])
  return w_kdc.reshape(w_kdc.shape[0], -1).T
