"""FashionBERT pretraining: masked language and patch modelling plus text-image
alignment, combined with the adaptive loss of Gao et al. (SIGIR 2020), as a TrainStep.

Each step masks the batch (text: `mlm_prob` of the real, non-special tokens, replaced
80% by [MASK], 10% by a random token, 10% kept, by etjax.algorithms.mlm.mask_tokens;
image: `mpm_prob` of the patches, which enter the encoder as zeros), runs
etjax.models.fashionbert.FashionBert and computes three losses:

  l_mlm  cross-entropy at the masked tokens of matched pairs;
  l_mpm  KL(softmax(target) || softmax(prediction)) at the masked patches of matched
         pairs (EasyTransfer's image_reconstruction_kld_loss);
  l_itm  cross-entropy of the alignment head on every pair (label 1 = matched).
Masked modelling counts only matched pairs: a mismatched image does not describe the
caption, so its tokens are no target.

Adaptive loss. FashionBERT (Gao et al. 2020, Sec. 3.3; the EasyTransfer paper only
names it) weighs the task losses per step by weights w solved from the task gradients
g_i = d l_i / d theta (theta: the shared backbone, the heads excluded):

  minimise  1/2 || sum_i w_i g_i ||^2 + 1/2 sum_i (w_i - 1/T)^2
  subject to  sum_i w_i = 1,  w_i >= 0,

the first term seeking the common descent direction of all tasks (a Pareto-stationary
combination, as MGDA), the second keeping every task near the uniform weight 1/T. With
G the Gram matrix of the gradients (G_ij = g_i . g_j) this is a T-variable quadratic
programme on the simplex; `adaptive_weights` solves it exactly by trying every support
(2^T - 1 of them, T = 3) with its KKT system. When the gradients are orthogonal the
KKT conditions reduce to the closed form w_i = (1 + |g_i|^2)^-1 / sum_j (1 +
|g_j|^2)^-1, which the tests hold the solver to, beside a brute-force search over the
simplex for correlated gradients. The weights are constants for the update:
the step's gradient is sum_i w_i g_i over all parameters, heads included. (EasyTransfer's
released script replaces |g_i|^2 by the squared softmax of the losses, a cheaper
proxy; etjax computes the gradients, three backward passes through one forward.)
`weighting='fixed'` uses constant `fixed_weights` instead.
"""

from __future__ import annotations

import itertools
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from etjax.algorithms import mlm
from etjax.algorithms.finetune import weighted_accuracy, weighted_cross_entropy
from etjax.algorithms.finetune import with_pretrained
from etjax.algorithms.step import Batch, TrainState, TrainStep, apply_gradients, next_rng
from etjax.models.fashionbert import HEAD_NAMES

TASKS = ("mlm", "mpm", "itm")
WEIGHTINGS = ("adaptive", "fixed")


# --- the adaptive loss weights ------------------------------------------------------

def adaptive_weights(gram_tt: jax.Array) -> jax.Array:
  """FashionBERT's loss weights from the task gradients' Gram matrix.

  Solves  min_w 1/2 w^T (G + I) w - (1/T) sum(w)  on the simplex {w >= 0, sum w = 1}
  (the module docstring's problem, expanded) exactly: for every non-empty support S
  it solves the KKT system with w = 0 outside S, and keeps the feasible solution of
  least objective (the problem is strictly convex, so that is the optimum).

  Args:
    gram_tt: [T, T] symmetric positive semi-definite, G_ij = g_i . g_j.
  Returns:
    w [T]: non-negative, summing to 1.
  """
  t = gram_tt.shape[0]
  a_tt = gram_tt + jnp.eye(t, dtype=gram_tt.dtype)
  b_t = jnp.full((t,), 1.0 / t, gram_tt.dtype)
  supports = jnp.asarray([s for s in itertools.product((0, 1), repeat=t) if any(s)],
                         gram_tt.dtype)  # [2^T - 1, T]

  def solve(support_t):
    # Unknowns (w_1..w_T, lam). Rows i in S: (A w)_i - lam = b_i; rows outside S:
    # w_i = 0; last row: sum_{i in S} w_i = 1.
    inside = support_t[:, None]
    rows = jnp.where(inside, jnp.concatenate([a_tt, -jnp.ones((t, 1), a_tt.dtype)], 1),
                     jnp.concatenate([jnp.eye(t, dtype=a_tt.dtype),
                                      jnp.zeros((t, 1), a_tt.dtype)], 1))
    system = jnp.concatenate([rows, jnp.concatenate([support_t, jnp.zeros(1)])[None]])
    rhs = jnp.concatenate([b_t * support_t, jnp.ones(1, a_tt.dtype)])
    w_t = jnp.linalg.solve(system, rhs)[:t]
    objective = 0.5 * w_t @ a_tt @ w_t - b_t @ w_t
    feasible = jnp.all(w_t >= -1e-6) & jnp.all(jnp.isfinite(w_t))
    return w_t, jnp.where(feasible, objective, jnp.inf)

  w_st, objective_s = jax.vmap(solve)(supports)
  w_t = jnp.clip(w_st[jnp.argmin(objective_s)], 0.0, None)
  return w_t / w_t.sum()


def gram_matrix(task_grads: Any, shared: Any) -> jax.Array:
  """[T, T] inner products of the per-task gradients over the leaves where `shared`
  (a bool pytree of the params' structure) is True; task_grads leaves are [T, ...]."""
  grads = [g for g, keep in zip(jax.tree.leaves(task_grads), jax.tree.leaves(shared))
           if keep]
  flat_tn = jnp.concatenate([g.reshape(g.shape[0], -1).astype(jnp.float32)
                             for g in grads], axis=1)
  return flat_tn @ flat_tn.T


def shared_mask(params: Mapping[str, Any]) -> Any:
  """True on the backbone's leaves, False on the pretraining heads' (HEAD_NAMES)."""
  return {k: jax.tree.map(lambda _, keep=k not in HEAD_NAMES: keep, v)
          for k, v in params.items()}


# --- masking and the three losses ---------------------------------------------------

def patch_kl(mpm_logits: jax.Array, targets: jax.Array) -> jax.Array:
  """KL(softmax(targets) || softmax(mpm_logits)) per patch: [..., F] -> [...]."""
  log_p = jax.nn.log_softmax(targets.astype(jnp.float32), axis=-1)
  log_q = jax.nn.log_softmax(mpm_logits.astype(jnp.float32), axis=-1)
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def _masked_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  weights = weights.astype(jnp.float32)
  return (values * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def image_inputs(batch: Batch) -> dict:
  """The model's image keyword arguments present in `batch`."""
  return {k: batch[k] for k in ("pixels", "patch_features", "patch_mask") if k in batch}


def task_losses(model: nn.Module, params: Any, batch: Batch, rng: jax.Array, *,
                mlm_prob: float, mpm_prob: float, mask_token_id: int,
                special_token_ids: Sequence[int],
                deterministic: bool = False) -> tuple[jax.Array, dict]:
  """The three pretraining losses of one batch.

  Returns (losses [3] in TASKS order, aux: scalar accuracies and the mask counts)."""
  cfg = model.config
  text_rng, patch_rng, dropout_rng = jax.random.split(rng, 3)
  input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
  maskable_bl = attention_mask != 0
  for special in special_token_ids:
    maskable_bl &= input_ids != special
  masked_ids, targets_bl = mlm.mask_tokens(
      text_rng, input_ids, maskable_bl, vocab_size=cfg.encoder.vocab_size,
      mask_id=mask_token_id, mask_prob=mlm_prob)
  chosen_bl = targets_bl != mlm.IGNORE
  num_patches = cfg.patches_per_image if "patch_features" not in batch else \
      batch["patch_features"].shape[1]
  masked_bp = jax.random.uniform(patch_rng, (input_ids.shape[0], num_patches)) < mpm_prob
  if "patch_mask" in batch:
    masked_bp &= batch["patch_mask"] != 0
  out = model.apply({"params": params}, masked_ids, attention_mask,
                    batch.get("token_type_ids"), masked_patches=masked_bp,
                    deterministic=deterministic, rngs={"dropout": dropout_rng},
                    **image_inputs(batch))
  weight_b = batch.get("weight", jnp.ones(input_ids.shape[:1], jnp.float32))
  matched_b = (batch["labels"] == 1) * weight_b
  token_w = chosen_bl * matched_b[:, None]
  mlm_ce = optax.softmax_cross_entropy_with_integer_labels(out.mlm_logits, input_ids)
  patch_w = masked_bp * matched_b[:, None]
  losses = jnp.stack([
      _masked_mean(mlm_ce, token_w),
      _masked_mean(patch_kl(out.mpm_logits, out.patch_targets), patch_w),
      weighted_cross_entropy(out.itm_logits, batch["labels"], weight_b)])
  aux = {"itm_accuracy": weighted_accuracy(out.itm_logits, batch["labels"], weight_b),
         "mlm_accuracy": _masked_mean(out.mlm_logits.argmax(-1) == input_ids, token_w),
         "masked_tokens": token_w.sum(), "masked_patches": patch_w.sum()}
  return losses, aux


# --- the TrainStep ------------------------------------------------------------------

def fashionbert_pretrain(model: nn.Module, tx: optax.GradientTransformation, *,
                         mask_token_id: int, special_token_ids: Sequence[int],
                         weighting: str = "adaptive",
                         fixed_weights: Sequence[float] = (1.0, 1.0, 1.0),
                         mlm_prob: float = 0.15, mpm_prob: float = 0.1,
                         pretrained: Optional[Mapping[str, Any]] = None) -> TrainStep:
  """FashionBERT pretraining as a TrainStep.

  Args:
    model: a FashionBert module.
    tx: the optimizer.
    mask_token_id: the [MASK] id; special_token_ids: ids never masked ([CLS], [SEP]).
    weighting: 'adaptive' (FashionBERT's per-step weights, see `adaptive_weights`) or
      'fixed' (the constant `fixed_weights` for mlm, mpm, itm).
    mlm_prob, mpm_prob: fractions of tokens and patches masked.
    pretrained: plain arrays for a sub-tree of the params (e.g. a BERT checkpoint's
      'embeddings', 'encoder', 'pooler'); the rest is freshly initialised.

  Batches: input_ids, attention_mask (int32 [B, L]), token_type_ids, labels (int32 [B],
  1 = matched pair), optional weight, and pixels [B, H, W, C] or patch_features
  [B, P, F] (+ optional patch_mask [B, P]).
  Metrics: loss (the weighted sum), {mlm,mpm,itm}_loss, w_{mlm,mpm,itm}, itm_accuracy,
  mlm_accuracy, masked_tokens, masked_patches, grad_norm.
  Predict: 'logits' [B, 2] (alignment) and 'match_score' [B] (log P(matched)).
  """
  if weighting not in WEIGHTINGS:
    raise ValueError(f"fashionbert_pretrain: weighting={weighting!r}; expected one of "
                     f"{WEIGHTINGS}")
  if len(fixed_weights) != len(TASKS):
    raise ValueError(f"fashionbert_pretrain: fixed_weights needs {len(TASKS)} values "
                     f"(mlm, mpm, itm), got {tuple(fixed_weights)}")
  for name, p in (("mlm_prob", mlm_prob), ("mpm_prob", mpm_prob)):
    if not 0.0 < p < 1.0:
      raise ValueError(f"fashionbert_pretrain: {name} must be in (0, 1), got {p}")
  fixed = jnp.asarray(fixed_weights, jnp.float32)

  def losses_fn(params, batch, rng):
    return task_losses(model, params, batch, rng, mlm_prob=mlm_prob, mpm_prob=mpm_prob,
                       mask_token_id=mask_token_id, special_token_ids=special_token_ids)

  def init(rng, batch):
    params_rng, state_rng = jax.random.split(rng)
    params = model.init({"params": params_rng, "dropout": params_rng},
                        batch["input_ids"], batch.get("attention_mask"),
                        batch.get("token_type_ids"), **image_inputs(batch))["params"]
    if pretrained:
      params = with_pretrained(params, pretrained)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), rng=state_rng)

  def update(state, batch):
    step_rng, rng = next_rng(state)
    if weighting == "adaptive":
      # One forward, one backward pass per task (reverse-mode Jacobian of 3 losses).
      task_grads, (losses, aux) = jax.jacrev(
          lambda p: (lambda l, a: (l, (l, a)))(*losses_fn(p, batch, step_rng)),
          has_aux=True)(state.params)
      weights = jax.lax.stop_gradient(adaptive_weights(
          gram_matrix(task_grads, shared_mask(state.params))))
      grads = jax.tree.map(lambda g: jnp.tensordot(weights, g, 1).astype(g.dtype),
                           task_grads)
    else:
      weights = fixed
      grads, (losses, aux) = jax.grad(
          lambda p: (lambda l, a: (fixed @ l, (l, a)))(*losses_fn(p, batch, step_rng)),
          has_aux=True)(state.params)
    metrics = {"loss": weights @ losses, "grad_norm": optax.tree.norm(grads), **aux}
    for i, task in enumerate(TASKS):
      metrics[f"{task}_loss"] = losses[i]
      metrics[f"w_{task}"] = weights[i]
    return apply_gradients(state, grads, tx, rng=rng), metrics

  def predict(state, batch):
    out = model.apply({"params": state.params}, batch["input_ids"],
                      batch.get("attention_mask"), batch.get("token_type_ids"),
                      deterministic=True, **image_inputs(batch))
    return {"logits": out.itm_logits,
            "match_score": jax.nn.log_softmax(out.itm_logits)[:, 1]}

  return TrainStep(init=init, update=update, predict=predict)


# --- retrieval metrics --------------------------------------------------------------

def retrieval_ranks(scores_qc: np.ndarray, positive_q: np.ndarray) -> np.ndarray:
  """The rank (1 = best) of each query's positive candidate: 1 + the number of other
  candidates scoring at least as high (ties count against the positive, so constant
  scores give the worst rank, not the best). int [Q]."""
  scores_qc = np.asarray(scores_qc, np.float64)
  positive_q = np.asarray(positive_q)
  if scores_qc.ndim != 2 or positive_q.shape != scores_qc.shape[:1]:
    raise ValueError(f"retrieval_ranks: scores [Q, C] and positive [Q], got "
                     f"{scores_qc.shape} and {positive_q.shape}")
  rows = np.arange(len(positive_q))
  pos_score = scores_qc[rows, positive_q]
  at_least = (scores_qc >= pos_score[:, None]).sum(1)
  return at_least.astype(np.int64)  # counts the positive itself once


def rank_at_k(ranks_q: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
  """{'rank@k': fraction of queries whose positive ranks within the top k}."""
  ranks_q = np.asarray(ranks_q)
  return {f"rank@{k}": float((ranks_q <= k).mean()) for k in ks}
