"""Class prototypes across domains, typicality weights and domain corruption.

The pieces MetaFT and MetaKD's meta-teacher share:

- a prototype p_{k,c} is the mean feature of the examples of class c in domain k;
- an example (x, y) of domain k is "typical" (transferable) when its feature is close
  to the prototypes of its class y in the OTHER domains:
      t = a * cos(h(x), p_{k,y}) + (1 - a) * mean_{k' != k, n_{k',y} > 0} cos(h(x), p_{k',y})
  with a = own_domain_weight (0 by default: other domains only). The MetaFT/MetaKD
  papers mix the own- and other-domain terms with a weight; a = 0 is the purely
  cross-domain score. An example whose class appears in no other domain gets the
  neutral other-domain term 0.
- weights for the loss are w = n * softmax(t / tau) over the n valid examples: always
  positive, mean one, sharper for a smaller temperature tau. (The papers use t
  directly, which can be negative for a cosine; the softmax is our documented choice.)
- a corrupted-domain loss trains a domain classifier on randomly corrupted domain
  labels, so the shared features cannot carry domain-specific information;
  `corrupt_domains` makes those labels.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array


def _check_ids(name: str, ids_b: Array, batch: int) -> None:
  if ids_b.shape != (batch,):
    raise ValueError(f"{name} must have shape [batch]=({batch},), got {ids_b.shape}")


def class_prototypes(features_bd: Array, labels_b: Array, domains_b: Array, *,
                     num_classes: int, num_domains: int,
                     mask_b: Optional[Array] = None) -> tuple[Array, Array]:
  """Masked mean feature per (domain, class).

  Args:
    features_bd: [b, d] example features (e.g. the [CLS] state).
    labels_b: [b] int classes in [0, num_classes).
    domains_b: [b] int domains in [0, num_domains).
    mask_b: optional [b], nonzero for examples to count.

  Returns:
    (prototypes_kcd [K, C, d], counts_kc [K, C]); a prototype with no examples is 0.
  """
  features_bd = jnp.asarray(features_bd)
  b = features_bd.shape[0]
  _check_ids("labels_b", jnp.asarray(labels_b), b)
  _check_ids("domains_b", jnp.asarray(domains_b), b)
  m_b = jnp.ones((b,), jnp.float32) if mask_b is None else (jnp.asarray(mask_b) != 0)
  dom_bk = jax.nn.one_hot(domains_b, num_domains) * m_b[:, None]
  cls_bc = jax.nn.one_hot(labels_b, num_classes)
  counts_kc = jnp.einsum("bk,bc->kc", dom_bk, cls_bc)
  sums_kcd = jnp.einsum("bk,bc,bd->kcd", dom_bk, cls_bc, features_bd.astype(jnp.float32))
  protos_kcd = sums_kcd / jnp.maximum(counts_kc, 1.0)[..., None]
  return protos_kcd, counts_kc


def typicality_scores(features_bd: Array, labels_b: Array, domains_b: Array,
                      prototypes_kcd: Array, counts_kc: Array, *,
                      own_domain_weight: float = 0.0, eps: float = 1e-8) -> Array:
  """Prototype-based typicality of each example (formula in the module doc).

  Args:
    features_bd: [b, d] example features.
    labels_b: [b] int classes.
    domains_b: [b] int domains.
    prototypes_kcd, counts_kc: from `class_prototypes`.
    own_domain_weight: a in [0, 1].
    eps: floor of the norms in the cosine.

  Returns:
    [b] scores in [-1, 1].
  """
  if not 0.0 <= own_domain_weight <= 1.0:
    raise ValueError(f"own_domain_weight must be in [0, 1], got {own_domain_weight}")
  h_bd = jnp.asarray(features_bd, jnp.float32)
  num_domains = prototypes_kcd.shape[0]
  p_bkd = jnp.swapaxes(prototypes_kcd[:, labels_b], 0, 1)  # each example's class
  n_bk = jnp.swapaxes(counts_kc[:, labels_b], 0, 1)
  norm = lambda x: jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1), eps * eps))
  cos_bk = jnp.einsum("bd,bkd->bk", h_bd, p_bkd) / (norm(h_bd)[:, None] * norm(p_bkd))
  own_bk = jax.nn.one_hot(domains_b, num_domains) > 0
  other_bk = (~own_bk) & (n_bk > 0)
  other_b = (jnp.sum(jnp.where(other_bk, cos_bk, 0), axis=1)
             / jnp.maximum(jnp.sum(other_bk, axis=1), 1))
  own_b = jnp.sum(jnp.where(own_bk & (n_bk > 0), cos_bk, 0), axis=1)
  return own_domain_weight * own_b + (1.0 - own_domain_weight) * other_b


def typicality_weights(scores_b: Array, *, temperature: float = 1.0,
                       mask_b: Optional[Array] = None) -> Array:
  """Instance weights w = n * softmax(scores / temperature) over the n valid examples.

  The weights are constants for the loss (stop_gradient), as in MetaFT.

  Returns:
    [b] weights, mean one over valid examples, 0 where mask_b is 0.
  """
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  scores_b = jax.lax.stop_gradient(jnp.asarray(scores_b, jnp.float32))
  valid_b = (jnp.ones_like(scores_b, bool) if mask_b is None
             else jnp.asarray(mask_b) != 0)
  logits_b = jnp.where(valid_b, scores_b / temperature, -jnp.inf)
  n = jnp.sum(valid_b)
  return jnp.where(valid_b, n * jax.nn.softmax(logits_b), 0.0)


def corrupt_domains(rng: Array, domains_b: Array, *, num_domains: int,
                    rate: float) -> Array:
  """Replaces each domain label, with probability `rate`, by a different domain.

  The replacement is uniform over the other num_domains - 1 domains.

  Returns:
    [b] int32 corrupted domain labels.
  """
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f"corrupt_domains: rate must be in [0, 1], got {rate}")
  if rate > 0 and num_domains < 2:
    raise ValueError(f"corrupt_domains: needs num_domains >= 2 to corrupt, got "
                     f"{num_domains}")
  domains_b = jnp.asarray(domains_b, jnp.int32)
  flip_rng, shift_rng = jax.random.split(rng)
  flip_b = jax.random.bernoulli(flip_rng, rate, domains_b.shape)
  shift_b = jax.random.randint(shift_rng, domains_b.shape, 1, max(num_domains, 2))
  return jnp.where(flip_b, (domains_b + shift_b) % num_domains, domains_b)
