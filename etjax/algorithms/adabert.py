"""AdaBERT (Chen et al. 2020): task-adaptive compression of BERT by differentiable
architecture search, distilled from the task's fine-tuned teacher.

The student is a stack of `num_cells` DARTS-style cells on token embeddings. A cell
takes the outputs of the two previous cells (s0, s1) and computes `num_nodes` nodes;
node j sums one operation on each earlier state (s0, s1, nodes < j), and the cell
outputs the mean of its nodes. Every edge chooses among OPS: 1-D convolutions of
widths 3, 5, 7 (dilation 1 and 2), max and average pooling of width 3, identity and
zero. All cells share one architecture matrix alpha [edges, ops] (DARTS's normal
cell). The classifier max-pools the last cell over valid tokens.

Search relaxes each edge to a Gumbel-softmax mixture, w = softmax((alpha + g) / tau)
(g Gumbel noise; none when deterministic), and minimises

    L = (1 - gamma) CE(y, s) + gamma T^2 KL(t / T || s / T) + beta L_E,

where L_E is the expected cost of the mixture (parameters or FLOPs per token of every
edge's ops, weighted by w, summed over cells) divided by its maximum, so it lies in
[0, 1]. alpha has its own optimizer. AdaBERT also searched the number of cells and
used the teacher's layer-wise probes; here K is fixed and the KD is on the logits.
The discrete student keeps, per edge, the strongest non-zero op, and per node its
two strongest edges (DARTS's derivation); it is then retrained from scratch with the
search's CE and KD terms (`retrain`, a `distill` step). In a recipe the retraining
step is built before the search has run (`deferred_retrain`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from etjax.algorithms.distill import (DistillLoss, DistillState, Teacher, distill,
                                     distill_train_step, hinton)
from etjax.algorithms.finetune import (init_params, weighted_accuracy,
                                       weighted_cross_entropy)
from etjax.algorithms.step import TrainStep
from etjax.models import layers

# op name -> (kind, window, dilation)
OPS: dict[str, tuple[str, int, int]] = {
    "conv3": ("conv", 3, 1), "conv5": ("conv", 5, 1), "conv7": ("conv", 7, 1),
    "dilconv3": ("conv", 3, 2), "dilconv5": ("conv", 5, 2), "dilconv7": ("conv", 7, 2),
    "maxpool3": ("max", 3, 1), "avgpool3": ("avg", 3, 1),
    "identity": ("identity", 1, 1), "zero": ("zero", 1, 1)}
OP_NAMES = tuple(OPS)
COSTS = ("params", "flops")


@dataclasses.dataclass(frozen=True)
class AdaBertConfig:
  """The searched student's fixed hyper-parameters."""
  vocab_size: int
  num_labels: int = 2
  width: int = 32
  num_cells: int = 2
  num_nodes: int = 3
  max_length: int = 128
  tau: float = 1.0

  def __post_init__(self):
    for name in ("vocab_size", "num_labels", "width", "num_cells", "num_nodes",
                 "max_length"):
      if getattr(self, name) < 1:
        raise ValueError(f"AdaBertConfig.{name} must be positive, got "
                         f"{getattr(self, name)}")
    if not self.tau > 0:
      raise ValueError(f"AdaBertConfig.tau must be > 0, got {self.tau}")

  @property
  def num_edges(self) -> int:
    """Edges of one cell: node j has 2 + j inputs."""
    return sum(2 + j for j in range(self.num_nodes))

  def edges(self) -> list[tuple[int, int]]:
    """(node j, input i) per edge, in alpha's row order; inputs 0, 1 are s0, s1."""
    return [(j, i) for j in range(self.num_nodes) for i in range(2 + j)]


def op_cost(op: str, width: int, cost: str = "params") -> float:
  """Parameters of an op, or its multiply-adds x 2 per token ('flops')."""
  if cost not in COSTS:
    raise ValueError(f"unknown cost {cost!r}; expected one of {COSTS}")
  kind, window, _ = OPS[op]
  if kind == "conv":
    return float(window * width * width + width) if cost == "params" else float(
        2 * window * width * width)
  if kind in ("max", "avg"):
    return 0.0 if cost == "params" else float(window * width)
  return 0.0


def cost_vector(width: int, cost: str = "params") -> np.ndarray:
  """[ops] the cost of every op of OP_NAMES."""
  return np.asarray([op_cost(op, width, cost) for op in OP_NAMES], np.float32)


def _pool(x_bld, mask_bl, window, kind):
  pad = window // 2
  if kind == "max":
    x = jnp.where(mask_bl[..., None] > 0, x_bld, -jnp.inf)
    x = jnp.pad(x, ((0, 0), (pad, pad), (0, 0)), constant_values=-jnp.inf)
    out = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, window, 1), (1, 1, 1),
                                "VALID")
    return jnp.where(jnp.isfinite(out), out, 0.0)
  m = jnp.pad(mask_bl[..., None].astype(x_bld.dtype), ((0, 0), (pad, pad), (0, 0)))
  x = jnp.pad(x_bld * m[:, pad:pad + x_bld.shape[1]], ((0, 0), (pad, pad), (0, 0)))
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, window, 1), (1, 1, 1), "VALID")
  count = jax.lax.reduce_window(m, 0.0, jax.lax.add, (1, window, 1), (1, 1, 1), "VALID")
  return total / jnp.maximum(count, 1.0)


class Op(nn.Module):
  """One candidate operation: [B, L, d] -> [B, L, d], zero at padding."""
  op: str

  @nn.compact
  def __call__(self, x_bld, mask_bl):
    kind, window, dilation = OPS[self.op]
    m = mask_bl[..., None].astype(x_bld.dtype)
    if kind == "conv":
      # ReLU-conv as in DARTS; masking the input keeps padding out of the windows.
      y = nn.Conv(x_bld.shape[-1], (window,), kernel_dilation=(dilation,),
                  padding="SAME", name="conv")(jax.nn.relu(x_bld) * m)
    elif kind in ("max", "avg"):
      y = _pool(x_bld, mask_bl, window, kind)
    elif kind == "identity":
      y = x_bld
    else:
      y = jnp.zeros_like(x_bld)
    return y * m


class Cell(nn.Module):
  """A cell. With `genotype` (one op name per edge) it is discrete; otherwise every
  edge mixes all ops with weights_eo [edges, ops]."""
  config: AdaBertConfig
  genotype: Optional[tuple[str, ...]] = None

  @nn.compact
  def __call__(self, s0_bld, s1_bld, mask_bl, weights_eo=None):
    states = [s0_bld, s1_bld]
    for e_start, j in zip(np.cumsum([0] + [2 + j for j in range(self.config.num_nodes)]),
                          range(self.config.num_nodes)):
      node = jnp.zeros_like(s1_bld)
      for i, x_bld in enumerate(states):
        e = int(e_start) + i
        if self.genotype is not None:
          if self.genotype[e] != "zero":
            node = node + Op(self.genotype[e], name=f"edge{e}_{self.genotype[e]}")(
                x_bld, mask_bl)
        else:
          for k, op in enumerate(OP_NAMES):
            if op != "zero":
              node = node + weights_eo[e, k] * Op(op, name=f"edge{e}_{op}")(x_bld,
                                                                          mask_bl)
      states.append(layers.LayerNorm(1e-6, name=f"norm{j}")(node))
    return jnp.mean(jnp.stack(states[2:]), axis=0)


@flax.struct.dataclass
class AdaBertOutput:
  """logits [B, C]; weights_eo [edges, ops] the relaxed op weights (search only)."""
  logits: jax.Array
  weights_eo: Optional[jax.Array] = None


class AdaBert(nn.Module):
  """The searchable student (genotype None) or a derived discrete one.

  Call: (input_ids [B, L], attention_mask [B, L], token_type_ids (ignored), *,
  deterministic) -> AdaBertOutput. Gumbel noise needs the rng stream 'gumbel'.
  """
  config: AdaBertConfig
  genotype: Optional[tuple[str, ...]] = None

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *,
               deterministic: bool = True, output_hidden_states: bool = False,
               output_attentions: bool = False) -> AdaBertOutput:
    del token_type_ids
    if output_hidden_states or output_attentions:
      raise ValueError("AdaBert students have no BERT hidden states or attentions; "
                       "distil them through the logits")
    cfg = self.config
    if self.genotype is not None and len(self.genotype) != cfg.num_edges:
      raise ValueError(f"genotype has {len(self.genotype)} ops, the cell has "
                       f"{cfg.num_edges} edges")
    if input_ids.shape[1] > cfg.max_length:
      raise ValueError(f"AdaBert: sequences of {input_ids.shape[1]} tokens exceed "
                       f"AdaBertConfig.max_length = {cfg.max_length} positions")
    mask_bl = (jnp.ones_like(input_ids) if attention_mask is None else attention_mask)
    positions = jnp.arange(input_ids.shape[1])
    # BERT's N(0, 0.02) tables: with unit-variance tables the positions drown the
    # words after the norm, and the student learns slowly.
    init = nn.initializers.normal(0.02)
    x_bld = (nn.Embed(cfg.vocab_size, cfg.width, embedding_init=init,
                      name="word")(input_ids)
             + nn.Embed(cfg.max_length, cfg.width, embedding_init=init,
                        name="position")(positions)[None])
    x_bld = layers.LayerNorm(1e-6, name="embed_norm")(x_bld)
    weights_eo = None
    if self.genotype is None:
      alpha = self.param("alpha", nn.initializers.zeros, (cfg.num_edges, len(OP_NAMES)))
      logits_eo = alpha
      if not deterministic:
        logits_eo = alpha + jax.random.gumbel(self.make_rng("gumbel"), alpha.shape)
      weights_eo = jax.nn.softmax(logits_eo / cfg.tau, axis=-1)
    s0, s1 = x_bld, x_bld
    for k in range(cfg.num_cells):
      s0, s1 = s1, Cell(cfg, self.genotype, name=f"cell{k}")(s0, s1, mask_bl, weights_eo)
    pooled_bd = jnp.max(jnp.where(mask_bl[..., None] > 0, s1, -jnp.inf), axis=1)
    logits = nn.Dense(cfg.num_labels, name="classifier")(pooled_bd)
    return AdaBertOutput(logits=logits.astype(jnp.float32), weights_eo=weights_eo)


def expected_cost(weights_eo: jax.Array, config: AdaBertConfig,
                  cost: str = "params") -> jax.Array:
  """[] the mixture's cost over all cells divided by its maximum (every edge's
  costliest op), in [0, 1]."""
  c = jnp.asarray(cost_vector(config.width, cost))
  return jnp.sum(weights_eo * c) / (config.num_edges * jnp.max(c))


def search_loss(model: AdaBert, cost: str = "params"):
  """The searchable student's LossFn: cross-entropy; aux has logits, accuracy and
  'efficiency', the expected cost under the (Gumbel-)relaxed op weights."""
  if cost not in COSTS:
    raise ValueError(f"unknown cost {cost!r}; expected one of {COSTS}")

  def loss_fn(params, batch, rng, deterministic=False):
    dropout_rng, gumbel_rng = jax.random.split(rng)
    out = model.apply({"params": params}, batch["input_ids"], batch.get("attention_mask"),
                      deterministic=deterministic,
                      rngs={"dropout": dropout_rng, "gumbel": gumbel_rng})
    weights = batch.get("weight")
    loss = weighted_cross_entropy(out.logits, batch["labels"], weights)
    return loss, {"logits": out.logits,
                  "accuracy": weighted_accuracy(out.logits, batch["labels"], weights),
                  "efficiency": expected_cost(out.weights_eo, model.config, cost)}
  return loss_fn


class SearchObjective:
  """The distillation objective plus beta times the efficiency term."""

  def __init__(self, objective: DistillLoss, beta: float):
    if not beta >= 0:
      raise ValueError(f"adabert: beta must be >= 0, got {beta}")
    self.objective, self.beta = objective, beta
    self.student_loss = objective.student_loss

  def loss(self, params, teacher_params, batch, rng, deterministic=False):
    total, aux = self.objective.loss(params, teacher_params, batch, rng, deterministic)
    return total + self.beta * aux["efficiency"], aux


def arch_labels(params: Any) -> Any:
  """'arch' for the architecture matrix (a leaf named alpha), 'weights' elsewhere."""
  def label(path, _):
    return "arch" if any(getattr(k, "key", None) == "alpha" for k in path) else "weights"
  return jax.tree_util.tree_map_with_path(
      label, params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def adabert_search(config: AdaBertConfig, teacher: Teacher,
                   tx_weights: optax.GradientTransformation,
                   tx_arch: optax.GradientTransformation, *, gamma: float = 0.8,
                   beta: float = 0.1, temperature: float = 1.0,
                   cost: str = "params") -> TrainStep:
  """AdaBERT's search as a TrainStep over DistillState.

  Args:
    config: the student's cell space.
    teacher: (fine-tuned classifier, params), frozen.
    tx_weights, tx_arch: optimizers of the op weights and of alpha.
    gamma: weight of the KD term against the hard cross-entropy.
    beta: weight of the efficiency term.
    temperature: T of the KD term.
    cost: 'params' or 'flops'.

  Returns:
    A TrainStep; params['student']['alpha'] is the architecture matrix [edges, ops];
    metrics add 'efficiency' (the sampled expected cost).
  """
  if not 0.0 <= gamma <= 1.0:
    raise ValueError(f"adabert: gamma must be in [0, 1], got {gamma}")
  model = AdaBert(config)
  objective = SearchObjective(
      DistillLoss(search_loss(model, cost), teacher, {"ce": 1.0 - gamma, "kd": gamma},
                  temperature=temperature,
                  student_init=lambda rng, batch: init_params(model, rng, batch)),
      beta)
  tx = optax.multi_transform({"weights": tx_weights, "arch": tx_arch}, arch_labels)
  return distill_train_step(objective, tx, objective.objective.init)


def arch_optimizer(learning_rate: float = 3e-2) -> optax.GradientTransformation:
  """The optimizer of alpha in `adabert_search`: Adam at a constant `learning_rate`."""
  return optax.adam(learning_rate)


def retrain(config: AdaBertConfig, genotype: Sequence[str], teacher: Teacher,
            tx: optax.GradientTransformation, *, gamma: float = 0.8,
            temperature: float = 1.0) -> TrainStep:
  """The derived student `AdaBert(config, genotype)` distilled from a fresh init with
  the search's (1 - gamma) CE + gamma T^2 KD at `temperature` (no efficiency term).

  Returns:
    A `distill` TrainStep over DistillState; params['student'] holds exactly the
    kept ops' parameters (`student_param_count`).
  """
  check_genotype(genotype, config)
  return distill(AdaBert(config, tuple(genotype)), teacher, tx, losses=hinton(gamma),
                 temperature=temperature)


def deferred_retrain(config: AdaBertConfig, genotype_fn, teacher: Teacher,
                     tx: optax.GradientTransformation, **kwargs) -> TrainStep:
  """`retrain` of the cells `genotype_fn()` names, built when the step is first
  traced or called, not when this is called: a recipe builds its stages before the
  search that chooses the cells has run.

  Args:
    genotype_fn: () -> one op name per edge (e.g. derived from the finished search's
      alpha); called once.
    **kwargs: `retrain`'s gamma and temperature.

  Returns:
    A TrainStep whose every function delegates to that one `retrain` step.
  """
  built: list[TrainStep] = []

  def step() -> TrainStep:
    if not built:
      built.append(retrain(config, genotype_fn(), teacher, tx, **kwargs))
    return built[0]
  return TrainStep(init=lambda rng, batch: step().init(rng, batch),
                   update=lambda state, batch: step().update(state, batch),
                   predict=lambda state, batch: step().predict(state, batch),
                   grad=lambda state, batch, rng: step().grad(state, batch, rng),
                   apply=lambda state, grads, rng: step().apply(state, grads, rng))


def architecture_weights(state: DistillState, config: AdaBertConfig,
                         cost: str = "params") -> tuple[np.ndarray, float]:
  """(softmax(alpha) [edges, ops], its expected cost in [0, 1]) of a search state."""
  alpha = np.asarray(nn.meta.unbox(state.params["student"]["alpha"]), np.float64)
  weights = np.exp(alpha - alpha.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  c = cost_vector(config.width, cost).astype(np.float64)
  return weights, float((weights * c).sum() / (config.num_edges * c.max()))


def derive_genotype(alpha_eo: Any, config: AdaBertConfig,
                    inputs_per_node: int = 2) -> tuple[str, ...]:
  """The discrete cell: per edge its strongest non-zero op, per node its
  `inputs_per_node` strongest edges (the rest 'zero').

  Returns:
    one op name per edge, in `config.edges()` order.
  """
  alpha = np.asarray(alpha_eo, np.float64)
  if alpha.shape != (config.num_edges, len(OP_NAMES)):
    raise ValueError(f"alpha must be [edges, ops]=({config.num_edges}, "
                     f"{len(OP_NAMES)}), got {alpha.shape}")
  probs = np.exp(alpha - alpha.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  nonzero = [k for k, op in enumerate(OP_NAMES) if op != "zero"]
  best = [nonzero[int(np.argmax(probs[e, nonzero]))] for e in range(config.num_edges)]
  genotype = ["zero"] * config.num_edges
  edges = config.edges()
  for j in range(config.num_nodes):
    incoming = [e for e, (node, _) in enumerate(edges) if node == j]
    strongest = sorted(incoming, key=lambda e: -probs[e, best[e]])[:inputs_per_node]
    for e in strongest:
      genotype[e] = OP_NAMES[best[e]]
  return tuple(genotype)


def check_genotype(genotype: Sequence[str], config: AdaBertConfig) -> None:
  """Raises ValueError unless every op is known and every node has an input."""
  if len(genotype) != config.num_edges:
    raise ValueError(f"genotype has {len(genotype)} ops, the cell has "
                     f"{config.num_edges} edges")
  unknown = sorted(set(genotype) - set(OP_NAMES))
  if unknown:
    raise ValueError(f"genotype has unknown ops {unknown}; known: {list(OP_NAMES)}")
  for j in range(config.num_nodes):
    if all(genotype[e] == "zero" for e, (node, _) in enumerate(config.edges())
           if node == j):
      raise ValueError(f"genotype leaves node {j} without inputs")


def param_count(params: Any) -> int:
  """Number of parameter scalars of a (boxed or plain) tree."""
  return int(sum(np.size(x) for x in jax.tree.leaves(nn.meta.unbox(params))))


def student_param_count(genotype: Sequence[str], config: AdaBertConfig) -> int:
  """Parameters of the discrete student, counted from its ops: embeddings, norms,
  every kept op's `op_cost`, and the classifier."""
  w = config.width
  per_cell = config.num_nodes * 2 * w + sum(op_cost(op, w) for op in genotype)
  return int((config.vocab_size + config.max_length) * w + 2 * w
             + config.num_cells * per_cell + w * config.num_labels + config.num_labels)
