"""Loss-to-loss combinators: a TL objective is one base loss plus weighted terms.

A `Loss` is (params, batch, rng, deterministic, **ctx) -> (loss [], aux). The base loss
runs the model once and leaves its outputs in aux (arrays such as 'logits' [B, C],
'features' [B, H], 'domain_logits' [B, K]); a combinator wraps a Loss and adds
weight * term, a `Term` read off the same outputs, so the model runs once however many
terms are composed:

    loss = task_loss(forward, label_smoothing)          # weighted CE on the labels
    loss = with_term(loss, 0.05, domain_adversary)     # + 0.05 CE(D(R(h)), domain)
    loss = compose(loss, [(1e-3, prior), (0.0, off)])  # weight 0: left out

Terms add left to right in the order composed: L = L_task + w_1 T_1 + w_2 T_2 + ...,
in that floating-point order. `ctx` carries what is not in the batch or the params
(DRSS's Omega, the gradient-reversal lambda, the rngs of sampled terms).

The feature-based steps (task + orthogonality + domain adversary + DRSS prior), the
instance-based ones (task on the selected rows + MGTL's domain adversary) and the
meta-learners (instance-weighted task + corrupted-domain or relation term + episode
meta-gradient, `episode_term`) are compositions of these.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp

from etjax.algorithms import meta
from etjax.algorithms import prototypes as proto
from etjax.algorithms.finetune import weighted_accuracy, weighted_cross_entropy

PyTree = Any
Batch = Mapping[str, Any]
Loss = Callable[..., tuple[jax.Array, dict]]
# (params, batch, aux of the wrapped loss, ctx) -> (term [], aux entries to add)
Term = Callable[[PyTree, Batch, dict, dict], tuple[jax.Array, dict]]
# (params, batch, rng, deterministic, **ctx) -> model outputs, at least 'logits' [B, C]
Forward = Callable[..., dict]


def task_loss(forward: Forward, label_smoothing: float = 0.0) -> Loss:
  """The base loss: cross-entropy of forward's 'logits' on batch['labels'], each row
  weighted by batch['weight'] (absent: a plain mean).

  Returns:
    Loss whose aux is forward's outputs plus 'task_loss' [] and 'accuracy' [].
  """
  def loss_fn(params, batch, rng, deterministic, **ctx):
    out = forward(params, batch, rng, deterministic, **ctx)
    weights_b = batch.get("weight")
    task = weighted_cross_entropy(out["logits"], batch["labels"], weights_b,
                                  label_smoothing)
    return task, {**out, "task_loss": task,
                  "accuracy": weighted_accuracy(out["logits"], batch["labels"], weights_b)}
  return loss_fn


def with_term(loss_fn: Loss, weight: Any, term: Term) -> Loss:
  """`loss_fn` + weight * term, the term's aux entries added to (or replacing) the
  wrapped loss's. The term sees the batch and ctx the combined loss is called with."""
  def combined(params, batch, rng, deterministic, **ctx):
    loss, aux = loss_fn(params, batch, rng, deterministic, **ctx)
    value, more = term(params, batch, aux, ctx)
    return loss + weight * value, {**aux, **more}
  return combined


def compose(loss_fn: Loss, terms: Sequence[tuple[Any, Term]]) -> Loss:
  """`with_term` over (weight, term) pairs, left to right; a term of weight 0 is left
  out (not computed, no aux entries)."""
  for weight, term in terms:
    if weight:
      loss_fn = with_term(loss_fn, weight, term)
  return loss_fn


def domain_adversary(params, batch, aux, ctx):
  """Term: weighted CE of aux['domain_logits'] [B, K] on batch['domain'] (rows weighted
  by batch['weight']). The model puts gradient reversal between its features and the
  discriminator, so minimizing this trains the discriminator and makes the features
  domain-invariant. Aux: 'domain_loss', 'domain_accuracy'."""
  del params, ctx
  domain_b, weights_b = batch["domain"], batch.get("weight")
  loss = weighted_cross_entropy(aux["domain_logits"], domain_b, weights_b)
  return loss, {"domain_loss": loss,
                "domain_accuracy": weighted_accuracy(aux["domain_logits"], domain_b,
                                                     weights_b)}


def episode_loss(task_loss: Callable[[PyTree, Batch], jax.Array], params: PyTree,
                 batch: Batch, groups_b: jax.Array, weights_b: jax.Array,
                 rng: jax.Array, *, inner_lr: float, inner_steps: int,
                 first_order: bool = False) -> tuple[jax.Array, jax.Array]:
  """One meta-learning episode: adapt on one group's rows, score on the others.

  Args:
    task_loss: (params, batch) -> [] loss, weighting rows by batch['weight'].
    params: theta_0 (boxes kept).
    batch: the whole batch.
    groups_b: [B] int group (domain or task) of each row.
    weights_b: [B] row weights (0 = padding).
    rng: picks the support group: that of a uniformly drawn row with weight > 0.
    inner_lr, inner_steps, first_order: as in `etjax.algorithms.meta.inner_adapt`.

  Returns:
    ([] query loss at the adapted params, [] int support group g). The support is
    `batch` with weight weights_b * (groups_b == g), the query with (groups_b != g).
  """
  groups_b, weights_b = jnp.asarray(groups_b), jnp.asarray(weights_b)
  valid_b = weights_b > 0
  row = jax.random.categorical(rng, jnp.where(valid_b, 0.0, -jnp.inf))
  group = groups_b[row]
  support = dict(batch, weight=weights_b * (groups_b == group))
  query = dict(batch, weight=weights_b * (groups_b != group))
  adapted = meta.inner_adapt(task_loss, params, support, inner_lr=inner_lr,
                             inner_steps=inner_steps, first_order=first_order)
  return task_loss(adapted, query), group


def check_episode(inner_lr: Optional[float], inner_steps: int) -> None:
  """Raises ValueError unless inner_steps >= 0 and inner_lr > 0 when inner_steps > 0."""
  if not isinstance(inner_steps, int) or isinstance(inner_steps, bool) or inner_steps < 0:
    raise ValueError(f"inner_steps must be an int >= 0, got {inner_steps!r}")
  if inner_steps and not (inner_lr is not None and inner_lr > 0):
    raise ValueError(f"inner_steps={inner_steps} needs inner_lr > 0, got {inner_lr!r}")


def episode_term(inner_loss: Callable[[PyTree, Batch, dict], jax.Array], *,
                 inner_lr: float, inner_steps: int, first_order: bool) -> Term:
  """Term: one meta-learning episode (`episode_loss`) on params['model'] over the
  groups batch['domain'] (MetaFT: domains, MetaDTL: tasks), the rows weighted by
  aux['weights'], the support group drawn with ctx['episode_rng'].

  Args:
    inner_loss: (model params, batch, ctx) -> [] weighted task loss of the inner loop.
    inner_lr, inner_steps, first_order: as `etjax.algorithms.meta.inner_adapt`.

  Returns:
    A Term with aux 'meta_loss' [] and 'episode_group' [] int (the support group).
  """
  def term(params, batch, aux, ctx):
    meta_loss, group = episode_loss(
        lambda p, b: inner_loss(p, b, ctx), params["model"], batch,
        jnp.asarray(batch["domain"], jnp.int32),
        aux["weights"], ctx["episode_rng"], inner_lr=inner_lr, inner_steps=inner_steps,
        first_order=first_order)
    return meta_loss, {"meta_loss": meta_loss, "episode_group": group}
  return term


def instance_weights(scores_b: jax.Array, valid_b: jax.Array, enabled: bool,
                     temperature: float) -> jax.Array:
  """[B] row weights from per-row scores (MetaFT's typicality, MetaDTL's
  transferability): valid_b * n softmax(scores / temperature) over the n valid rows
  (`prototypes.typicality_weights`), or valid_b itself when not enabled (an ablation).
  """
  if not enabled:
    return valid_b
  return valid_b * proto.typicality_weights(scores_b, temperature=temperature,
                                            mask_b=valid_b > 0)


def no_episode() -> dict:
  """The aux entries of a loss without episodes: meta_loss 0, episode_group -1."""
  return {"meta_loss": jnp.zeros((), jnp.float32),
          "episode_group": jnp.asarray(-1, jnp.int32)}


def scalars(aux: Mapping[str, Any]) -> dict:
  """The scalar entries of aux (the metrics a step reports)."""
  return {k: v for k, v in aux.items() if jnp.ndim(v) == 0}
