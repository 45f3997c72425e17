"""Ruder & Plank (2017): learning to select source data by Bayesian optimization.

Each source example x gets a feature vector phi(x): its similarity to the target
domain over term distributions and its diversity. The selection score is a weighted
sum, S(x) = w . phi(x); the top-n source examples by S train the model; the weights w
are chosen by Bayesian optimization of the target development metric. The optimizer
is optuna's (TPE by default; any optuna sampler, e.g. its GP sampler, can be passed),
not a hand-written one.

Features (columns of `selection_features`, names in FEATURE_NAMES), for an example's
term distribution P and the target's Q (both over the same vocabulary, natural logs):
  jensen_shannon    JS(P, Q) = KL(P || M) / 2 + KL(Q || M) / 2, M = (P + Q) / 2
  renyi             D_a(P || Q) = log(sum_v P_v^a Q_v^(1 - a)) / (a - 1), a = 0.99
  cosine            <P, Q> / (||P|| ||Q||)
  euclidean         ||P - Q||_2
  num_types         number of distinct terms in the example
  type_token_ratio  num_types / number of tokens
  entropy           -sum_v P_v log P_v
  simpson           sum_v P_v^2 (Simpson's concentration index)
Distances are kept as distances (not negated): the weights' range [-1, 1] lets the
optimizer pick each sign, as in the paper. Diversity is measured on the example's own
term distribution. Features are z-normalized over the source pool by default, so that
the weights are comparable. An example with no tokens has P = 0.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

FEATURE_NAMES = ("jensen_shannon", "renyi", "cosine", "euclidean", "num_types",
                 "type_token_ratio", "entropy", "simpson")
_TINY = 1e-30


def _float(x) -> Array:
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def term_distributions(counts_nv: Array, *, smoothing: float = 0.0) -> Array:
  """Normalizes term counts (plus additive smoothing) to distributions.

  Args:
    counts_nv: [n, v] (or [v]) term counts.
    smoothing: pseudo-count added to every term, >= 0.

  Returns:
    [n, v] rows summing to one (all-zero rows without smoothing stay zero).
  """
  if smoothing < 0:
    raise ValueError(f"term_distributions: smoothing must be >= 0, got {smoothing}")
  c = _float(counts_nv) + smoothing
  total = jnp.sum(c, axis=-1, keepdims=True)
  return c / jnp.where(total > 0, total, 1.0)


def _kl(p, q):
  # sum p log(p / q) with 0 log 0 = 0; q > 0 wherever p > 0 for the mixture M.
  return jnp.sum(jnp.where(p > 0, p * (jnp.log(jnp.where(p > 0, p, 1.0))
                                       - jnp.log(jnp.where(p > 0, q, 1.0))), 0.0), -1)


def jensen_shannon(p_nv: Array, q_v: Array) -> Array:
  """Jensen-Shannon divergence (natural log) of each row of P to Q; [n] in [0, ln 2]."""
  p, q = _float(p_nv), _float(q_v)
  m = 0.5 * (p + q)
  return 0.5 * _kl(p, m) + 0.5 * _kl(jnp.broadcast_to(q, p.shape), m)


def renyi_divergence(p_nv: Array, q_v: Array, *, alpha: float = 0.99) -> Array:
  """Renyi divergence D_alpha(P || Q) of each row; [n].

  For alpha < 1 zeros in P or Q are fine; alpha > 1 needs Q > 0 where P > 0 (smooth).
  """
  if not alpha > 0 or alpha == 1:
    raise ValueError(f"renyi_divergence: alpha must be > 0 and != 1, got {alpha}")
  p, q = _float(p_nv), _float(q_v)
  terms = jnp.where(p > 0, jnp.power(p, alpha) * jnp.power(q, 1.0 - alpha), 0.0)
  return jnp.log(jnp.maximum(jnp.sum(terms, -1), _TINY)) / (alpha - 1.0)


def cosine_similarity(p_nv: Array, q_v: Array) -> Array:
  """Cosine similarity of each row of P to Q; [n] (0 for an empty row)."""
  p, q = _float(p_nv), _float(q_v)
  norms = jnp.linalg.norm(p, axis=-1) * jnp.linalg.norm(q, axis=-1)
  return jnp.sum(p * q, -1) / jnp.maximum(norms, _TINY)


def euclidean_distance(p_nv: Array, q_v: Array) -> Array:
  """Euclidean distance of each row of P to Q; [n]."""
  return jnp.linalg.norm(_float(p_nv) - _float(q_v), axis=-1)


def diversity_features(counts_nv: Array) -> Array:
  """Diversity of each example from its own term counts.

  Returns:
    [n, 4] columns: number of types, type/token ratio, entropy (nats), Simpson's
    index sum_v P_v^2.
  """
  c = _float(counts_nv)
  tokens = jnp.sum(c, -1)
  types = jnp.sum(c > 0, -1).astype(c.dtype)
  p = term_distributions(c)
  ent = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), -1)
  ttr = types / jnp.maximum(tokens, 1.0)
  return jnp.stack([types, ttr, ent, jnp.sum(p * p, -1)], axis=-1)


def standardize(features_nf: Array) -> Array:
  """Z-normalizes each column over the pool; constant columns become 0. [n, f]."""
  x = _float(features_nf)
  mean = jnp.mean(x, axis=0)
  std = jnp.std(x, axis=0)
  return jnp.where(std > 0, (x - mean) / jnp.where(std > 0, std, 1.0), 0.0)


def selection_features(source_counts_nv: Array, target_counts: Array, *,
                       smoothing: float = 0.0, alpha: float = 0.99,
                       normalize: bool = True) -> Array:
  """The feature matrix phi of the source pool, columns as in FEATURE_NAMES.

  Args:
    source_counts_nv: [n, v] term counts of each source example.
    target_counts: [v] target-domain term counts, or [m, v] target examples (summed).
    smoothing: pseudo-count for the term distributions.
    alpha: order of the Renyi divergence.
    normalize: z-normalize each feature over the pool.

  Returns:
    [n, 8] features.
  """
  src = _float(source_counts_nv)
  tgt = _float(target_counts)
  if tgt.ndim == 2:
    tgt = jnp.sum(tgt, axis=0)
  if src.ndim != 2 or tgt.shape != src.shape[-1:]:
    raise ValueError(f"selection_features: source counts must be [n, v] and target "
                     f"counts [v] or [m, v] with the same vocabulary, got "
                     f"{source_counts_nv.shape} and {jnp.shape(target_counts)}")
  p = term_distributions(src, smoothing=smoothing)
  q = term_distributions(tgt, smoothing=smoothing)
  sim = jnp.stack([jensen_shannon(p, q), renyi_divergence(p, q, alpha=alpha),
                   cosine_similarity(p, q), euclidean_distance(p, q)], axis=-1)
  features = jnp.concatenate([sim, diversity_features(src)], axis=-1)
  return standardize(features) if normalize else features


def selection_scores(features_nf: Array, weights_f: Array) -> Array:
  """S = phi w; [n] scores."""
  features_nf, weights_f = _float(features_nf), _float(weights_f)
  if weights_f.shape != features_nf.shape[-1:]:
    raise ValueError(f"selection_scores: {weights_f.shape[0] if weights_f.ndim else 0} "
                     f"weights for {features_nf.shape[-1]} features")
  return features_nf @ weights_f


def select_top_n(scores_n: Array, n: int) -> np.ndarray:
  """Indices of the n highest scores, best first; ties go to the lower index.

  Returns:
    [n] int64 numpy indices (selection is host-side data preparation).
  """
  scores = np.asarray(scores_n)
  if not 0 < n <= scores.shape[0]:
    raise ValueError(f"select_top_n: n must be in 1..{scores.shape[0]}, got {n}")
  return np.argsort(-scores, kind="stable")[:n]


class WeightSearch(NamedTuple):
  """Result of `optimize_selection_weights`.

  Attributes:
    weights: [f] numpy best weights.
    value: the best development metric.
    selected: [num_selected] the indices those weights select.
    study: the optuna Study (all trials, for reporting).
  """
  weights: np.ndarray
  value: float
  selected: np.ndarray
  study: Any


def _weight_names(features: np.ndarray, feature_names: Optional[Sequence[str]],
                  weight_range: tuple[float, float], num_trials: int,
                  num_selected: int) -> tuple[str, ...]:
  """The weights' names (see `optimize_selection_weights`); ValueError for a bad
  search setting, naming it."""
  f = features.shape[-1]
  names = tuple(feature_names) if feature_names is not None else (
      FEATURE_NAMES if f == len(FEATURE_NAMES) else tuple(f"f{i}" for i in range(f)))
  if len(names) != f:
    raise ValueError(f"optimize_selection_weights: {len(names)} feature names for {f} "
                     f"features")
  low, high = weight_range
  if not low < high:
    raise ValueError(f"optimize_selection_weights: weight_range must be (low, high) "
                     f"with low < high, got {weight_range}")
  if num_trials < 1:
    raise ValueError(f"optimize_selection_weights: num_trials must be >= 1, got "
                     f"{num_trials}")
  select_top_n(np.zeros(features.shape[0]), num_selected)  # validates num_selected
  return names


def optimize_selection_weights(
    features_nf: Array, evaluate: Callable[[np.ndarray], float], *,
    num_selected: int, num_trials: int, seed: int = 0,
    weight_range: tuple[float, float] = (-1.0, 1.0),
    feature_names: Optional[Sequence[str]] = None, direction: str = "maximize",
    sampler: Any = None) -> WeightSearch:
  """Bayesian optimization of the selection weights with optuna.

  Each trial proposes w in weight_range^f, selects the top `num_selected` source
  examples by phi w and scores them with `evaluate` (typically: train the TL model on
  them and return the target development metric).

  Args:
    features_nf: [n, f] features of the source pool.
    evaluate: indices [num_selected] -> float metric.
    num_selected: how many source examples each trial selects.
    num_trials: number of evaluations.
    seed: seed of the default TPE sampler (reproducible searches).
    weight_range: (low, high) bounds of every weight.
    feature_names: names of the f weights (default FEATURE_NAMES when f matches).
    direction: "maximize" or "minimize" the metric.
    sampler: an optuna sampler to use instead of TPE (e.g. a GP sampler).

  Returns:
    WeightSearch(weights, value, selected, study).
  """
  import optuna  # pylint: disable=g-import-not-at-top  (optional dependency: etjax[tl])

  features = np.asarray(features_nf)
  names = _weight_names(features, feature_names, weight_range, num_trials, num_selected)
  low, high = weight_range

  def weights_of(params):
    return np.array([params[f"w_{name}"] for name in names])

  def objective(trial):
    w = np.array([trial.suggest_float(f"w_{name}", low, high) for name in names])
    return float(evaluate(select_top_n(features @ w, num_selected)))

  optuna.logging.set_verbosity(optuna.logging.WARNING)
  study = optuna.create_study(direction=direction,
                              sampler=sampler or optuna.samplers.TPESampler(seed=seed))
  study.optimize(objective, n_trials=num_trials)
  best = weights_of(study.best_params)
  return WeightSearch(best, float(study.best_value),
                      select_top_n(features @ best, num_selected), study)
