"""Knowledge distillation as a train-step transform.

    step = distill(student, (teacher_module, teacher_params), tx,
                   losses={"kd": 0.5, "ce": 0.5, "hidden_mse": 1.0},
                   temperature=4.0, layer_map="skip")

returns a TrainStep whose state is a `DistillState`: the student's trainable
parameters (and the learnable projections of the feature losses) under
`params = {"student": ..., "projections": ...}`, and the teacher's parameters in the
frozen field `teacher_params`. The teacher's forward runs in the same jitted step,
deterministically (no dropout), behind `stop_gradient`; the optimizer is built on
`params` only, so the teacher has no optimizer slots and is never updated.

The loss is a weighted sum of named terms (`losses` maps name -> weight):

  ce            the student's own loss (cross-entropy of a classifier module, or the
                loss of a student LossFn);
  kd            Hinton's T^2 KL(softmax(t/T) || softmax(s/T)) (`kd_loss`, alpha=1); the
                Hinton mix of alpha is {"kd": alpha, "ce": 1 - alpha} (`hinton`);
  soft_ce       DistilBERT's soft-target cross-entropy (`soft_cross_entropy`);
  hidden_mse    TinyBERT's MSE(H_s W_h + b, H_t), summed over the mapped layer pairs
                (student layer m -> teacher layer `layer_map(...)[m - 1]`);
  embedding_mse TinyBERT's MSE(E_s W_e + b, E_t) on the embedding outputs;
  attention_mse TinyBERT's attention MSE, summed over the mapped layer pairs. etjax
                encoders return attention probabilities, so probabilities are matched
                (TinyBERT matched pre-softmax scores; the loss accepts either);
  pkd           BERT-PKD's patient loss on the normalized [CLS] states of the mapped
                pairs except the last (the last layer is distilled through the logits);
  cosine        DistilBERT's cosine loss between the last student and last teacher
                hidden states.

Where the student's width d differs from the teacher's D, each feature loss gets its
own learnable projection [d, D] (hidden and embedding ones with a bias, as in TinyBERT),
created at init and trained with the student. Every term is weighted per example by
the batch's 'weight' and masked by its 'attention_mask'.

A student is either a Linen module (a classifier returning `.logits`, with
`.encoder.hidden_states / .attentions` when asked, or an encoder returning hidden
states only) or a LossFn `(params, batch, rng, deterministic) -> (loss, aux)` with
'logits' (and 'hidden_states' [M + 1, B, L, d] / 'attentions' [M, B, h, L, L] in aux
where intermediate losses are asked for); a LossFn needs `student_init`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Union

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from etjax.algorithms import distill_losses as dl
from etjax.algorithms import layer_map as lm
from etjax.algorithms.finetune import (LossFn, init_params, model_inputs,
                                       weighted_accuracy, weighted_cross_entropy,
                                       with_pretrained, _with_dummy_labels)
from etjax.algorithms.step import (Batch, TrainState, TrainStep, apply_gradients,
                                   gradient_step, next_rng, unbox)

PyTree = Any
Teacher = tuple[nn.Module, PyTree]

LOSSES = ("ce", "kd", "soft_ce", "hidden_mse", "embedding_mse", "attention_mse", "pkd",
          "cosine")
LOGIT_LOSSES = ("kd", "soft_ce")
# Feature losses and the projection each uses when widths differ.
PROJECTIONS = {"hidden_mse": "hidden", "embedding_mse": "embedding", "pkd": "pkd",
               "cosine": "cosine"}
_BIASED = ("hidden", "embedding")


@flax.struct.dataclass
class DistillState(TrainState):
  """A TrainState with a frozen teacher.

  Attributes:
    teacher_params: the teacher's parameters (boxes kept, so the trainer shards them
      like the student's). Never differentiated, never given optimizer slots.
  """
  teacher_params: PyTree


def hinton(alpha: float) -> dict[str, float]:
  """Hinton et al.'s mix alpha * soft KD + (1 - alpha) * hard CE as `losses` weights."""
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"hinton: alpha must be in [0, 1], got {alpha}")
  return {"kd": alpha, "ce": 1.0 - alpha}


def check_losses(losses: Mapping[str, float]) -> dict[str, float]:
  """Returns `losses` as a dict after checking names and weights (>= 0, some > 0)."""
  unknown = sorted(set(losses) - set(LOSSES))
  if unknown:
    raise ValueError(f"distill: unknown loss(es) {unknown}; known: {list(LOSSES)}")
  for name, weight in losses.items():
    if not weight >= 0:
      raise ValueError(f"distill: weight of loss {name!r} must be >= 0, got {weight}")
  if not any(w > 0 for w in losses.values()):
    raise ValueError(f"distill: every loss weight is 0 in {dict(losses)}")
  return dict(losses)


def needs(losses: Mapping[str, float]) -> tuple[bool, bool]:
  """(needs hidden states, needs attentions) for the positively weighted losses."""
  active = {k for k, w in losses.items() if w > 0}
  return bool(active & set(PROJECTIONS)), "attention_mse" in active


def forward(model: nn.Module, params: PyTree, batch: Batch, rng: Optional[jax.Array],
            deterministic: bool, *, hidden_states: bool = False,
            attentions: bool = False) -> dict:
  """Runs a classifier or an encoder module.

  Returns:
    dict with 'logits' [B, C] (classifiers only), 'hidden_states' [L + 1, B, T, H]
    and 'attentions' [L, B, h, T, T] when asked for.
  """
  rngs = {} if rng is None else {"dropout": rng}
  out = model.apply({"params": params}, *model_inputs(batch), deterministic=deterministic,
                    output_hidden_states=hidden_states, output_attentions=attentions,
                    rngs=rngs)
  result = {}
  if getattr(out, "logits", None) is not None:
    result["logits"] = out.logits
  encoder = getattr(out, "encoder", out)
  if hidden_states:
    result["hidden_states"] = encoder.hidden_states
  if attentions:
    result["attentions"] = encoder.attentions
  return result


def module_loss(model: nn.Module, hidden_states: bool = False,
                attentions: bool = False) -> LossFn:
  """The LossFn of a module student: cross-entropy when it has logits (else 0), with
  its logits and the requested states in aux."""
  def loss_fn(params, batch, rng, deterministic=False):
    out = forward(model, params, batch, rng, deterministic, hidden_states=hidden_states,
                  attentions=attentions)
    aux = dict(out)
    loss = jnp.zeros((), jnp.float32)
    if "logits" in out:
      weights = batch.get("weight")
      loss = weighted_cross_entropy(out["logits"], batch["labels"], weights)
      aux["accuracy"] = weighted_accuracy(out["logits"], batch["labels"], weights)
    return loss, aux
  return loss_fn


def box_like(model: nn.Module, params: PyTree, batch: Batch) -> PyTree:
  """`params` with the logical-partitioning boxes of `model` (kept if already boxed)."""
  if any(isinstance(x, nn.LogicallyPartitioned) for x in
         jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))):
    return params
  abstract = jax.eval_shape(
      lambda: model.init({"params": jax.random.PRNGKey(0)}, *model_inputs(batch))["params"])
  return with_pretrained(abstract, params)


def _check_states(who: str, aux: Mapping, key: str, loss: str):
  if aux.get(key) is None:
    raise ValueError(f"distill: loss {loss!r} needs the {who}'s {key!r}; a LossFn "
                     f"{who} must return it in aux, a module must support "
                     f"output_{key}=True")
  return aux[key]


def distillation_terms(student: Mapping[str, jax.Array], teacher: Mapping[str, jax.Array],
                       batch: Batch, losses: Mapping[str, float], *,
                       temperature: float = 1.0, layer_map: lm.Strategy = "skip",
                       projections: Optional[Mapping[str, Any]] = None
                       ) -> dict[str, jax.Array]:
  """The unweighted distillation terms (every positively weighted loss but 'ce').

  Args:
    student: 'logits' [B, C], 'hidden_states' [M + 1, B, T, d], 'attentions'
      [M, B, h, T, T] as the losses need.
    teacher: the same for the teacher (N layers, width D).
    batch: gives 'attention_mask' [B, T] and 'weight' [B] (both optional).
    losses: name -> weight.
    temperature: T of 'kd' and 'soft_ce'.
    layer_map: 'skip', 'last' or an explicit sequence of M teacher layers.
    projections: name in PROJECTIONS' values -> {'kernel' [d, D], 'bias' [D]} (plain
      arrays); required for a feature loss whose widths differ.

  Returns:
    name -> [] loss.
  """
  weight_b, mask_bl = batch.get("weight"), batch.get("attention_mask")
  projections = projections or {}
  terms = {}

  def proj(loss):
    p = projections.get(PROJECTIONS[loss], {})
    return p.get("kernel"), p.get("bias")

  def pairs(loss, **kw):
    hs = _check_states("student", student, "hidden_states", loss)
    ht = _check_states("teacher", teacher, "hidden_states", loss)
    mapping = lm.layer_map(layer_map, hs.shape[0] - 1, ht.shape[0] - 1)
    return hs, ht, lm.mapped_pairs(mapping, **kw)

  for name, weight in losses.items():
    if weight <= 0 or name == "ce":
      continue
    if name in LOGIT_LOSSES:
      s = _check_states("student", student, "logits", name)
      t = _check_states("teacher", teacher, "logits", name)
      if name == "kd":
        terms[name] = dl.kd_loss(s, t, temperature=temperature, alpha=1.0,
                                 weight_b=weight_b)
      else:
        terms[name] = dl.soft_cross_entropy(s, t, temperature=temperature,
                                            weight_b=weight_b)
    elif name == "hidden_mse":
      hs, ht, layer_pairs = pairs(name)
      kernel, bias = proj(name)
      terms[name] = sum(dl.hidden_mse(hs[i], ht[j], projection_dD=kernel, bias_D=bias,
                                      mask_bl=mask_bl, weight_b=weight_b)
                        for i, j in layer_pairs)
    elif name == "embedding_mse":
      hs = _check_states("student", student, "hidden_states", name)
      ht = _check_states("teacher", teacher, "hidden_states", name)
      kernel, bias = proj(name)
      terms[name] = dl.embedding_mse(hs[0], ht[0], projection_dD=kernel, bias_D=bias,
                                     mask_bl=mask_bl, weight_b=weight_b)
    elif name == "attention_mse":
      a_s = _check_states("student", student, "attentions", name)
      a_t = _check_states("teacher", teacher, "attentions", name)
      mapping = lm.layer_map(layer_map, a_s.shape[0], a_t.shape[0])
      terms[name] = sum(dl.attention_mse(a_s[i - 1], a_t[j - 1],
                                         attention_mask_bk=mask_bl, weight_b=weight_b)
                        for i, j in lm.mapped_pairs(mapping))
    elif name == "pkd":
      hs, ht, layer_pairs = pairs(name, include_last=False)
      if not layer_pairs:
        raise ValueError("distill: 'pkd' needs a student with at least 2 layers (the "
                         "last layer is distilled through the logits)")
      s_nbd, t_nbd = lm.stack_pairs(hs[:, :, 0], ht[:, :, 0], layer_pairs)
      terms[name] = dl.pkd_patient_loss(s_nbd, t_nbd, projection_dD=proj(name)[0],
                                        weight_b=weight_b)
    elif name == "cosine":
      hs = _check_states("student", student, "hidden_states", name)
      ht = _check_states("teacher", teacher, "hidden_states", name)
      terms[name] = dl.cosine_hidden_loss(hs[-1], ht[-1], projection_dD=proj(name)[0],
                                          mask_bl=mask_bl, weight_b=weight_b)
  return terms


def _widths(fn: Callable[[], Mapping[str, jax.Array]]) -> Optional[int]:
  states = jax.eval_shape(fn).get("hidden_states")
  return None if states is None else states.shape[-1]


def init_projections(rng: jax.Array, losses: Mapping[str, float], student_width: int,
                     teacher_width: int) -> dict:
  """Boxed projection params for the feature losses, {} when the widths agree.

  Returns:
    {name: {'kernel' [d, D] (, 'bias' [D])}} for every needed projection name.
  """
  if student_width == teacher_width:
    return {}
  names = sorted({PROJECTIONS[k] for k, w in losses.items() if w > 0 and k in PROJECTIONS})
  out = {}
  for name, key in zip(names, jax.random.split(rng, max(len(names), 1))):
    module = dl.HiddenProjection(teacher_width, use_bias=name in _BIASED)
    out[name] = module.init(key, jnp.zeros((1, student_width), jnp.float32))["params"]
  return out


class DistillLoss:
  """The distillation objective of a student and a frozen teacher, shared by `distill`
  and the staged algorithms (TinyBERT) built on it.

  Attributes:
    init: (rng, batch) -> (boxed params {'student', 'projections'}, boxed teacher params).
    loss: (params, teacher_params, batch, rng, deterministic) -> (loss, aux); aux has
      the student's logits, accuracy, and every term under 'distill/<name>'.
    student_loss: the student's own LossFn (its predictions).
  """

  def __init__(self, student: Union[nn.Module, LossFn], teacher: Teacher,
               losses: Mapping[str, float], *, temperature: float = 1.0,
               layer_map: lm.Strategy = "skip",
               student_init: Optional[Callable[[jax.Array, Batch], PyTree]] = None,
               pretrained: Optional[Mapping[str, Any]] = None):
    self.losses = check_losses(losses)
    if not temperature > 0:
      raise ValueError(f"distill: temperature must be > 0, got {temperature}")
    if not (isinstance(teacher, tuple) and len(teacher) == 2):
      raise ValueError("distill: teacher must be a (module, params) pair")
    self.teacher_model, self.teacher_params = teacher
    self.temperature, self.layer_map = temperature, layer_map
    want_hidden, want_attn = needs(self.losses)
    if isinstance(student, nn.Module):
      self.student_loss = module_loss(student, want_hidden, want_attn)
      self.student_init = student_init or (
          lambda rng, batch: init_params(student, rng, batch, pretrained))
    elif callable(student):
      if student_init is None:
        raise ValueError("distill: a LossFn student needs student_init(rng, batch)")
      self.student_loss, self.student_init = student, student_init
    else:
      raise ValueError(f"distill: student must be a Linen module or a LossFn, got "
                       f"{type(student).__name__}")
    self._want_hidden, self._want_attn = want_hidden, want_attn

  def teacher_forward(self, teacher_params: PyTree, batch: Batch) -> dict:
    """The frozen teacher's outputs (deterministic, no gradient)."""
    return forward(self.teacher_model, jax.lax.stop_gradient(teacher_params), batch,
                   None, True, hidden_states=self._want_hidden,
                   attentions=self._want_attn)

  def init(self, rng: jax.Array, batch: Batch) -> tuple[PyTree, PyTree]:
    student_rng, proj_rng = jax.random.split(rng)
    student = self.student_init(student_rng, batch)
    teacher = box_like(self.teacher_model, self.teacher_params, batch)
    projections = {}
    if self._want_hidden:
      batch = _with_dummy_labels(batch)
      d = _widths(lambda: self.student_loss(unbox(student), batch, student_rng, True)[1])
      big_d = _widths(lambda: self.teacher_forward(unbox(teacher), batch))
      if d is None:
        raise ValueError("distill: the student gives no 'hidden_states' for "
                         f"{sorted(k for k in self.losses if k in PROJECTIONS)}")
      projections = init_projections(proj_rng, self.losses, d, big_d)
    return {"student": student, "projections": projections}, teacher

  def loss(self, params: PyTree, teacher_params: PyTree, batch: Batch, rng: jax.Array,
           deterministic: bool = False) -> tuple[jax.Array, dict]:
    own, aux = self.student_loss(params["student"], batch, rng, deterministic)
    terms = distillation_terms(aux, self.teacher_forward(teacher_params, batch), batch,
                               self.losses, temperature=self.temperature,
                               layer_map=self.layer_map,
                               projections=unbox(params["projections"]))
    if self.losses.get("ce", 0) > 0:
      terms["ce"] = own
    total = sum(self.losses[k] * v for k, v in terms.items())
    out = {k: v for k, v in aux.items() if k not in ("hidden_states", "attentions")}
    out.update({f"distill/{k}": v for k, v in terms.items()})
    return total, out


def distill_update(objective: DistillLoss, tx: optax.GradientTransformation, state,
                   batch: Batch, **changes):
  """One optimizer step of `objective` on state.params (the teacher stays as is).

  Returns:
    (new state, metrics: loss, grad_norm and the scalars of the aux).
  """
  step_rng, rng = next_rng(state)
  (loss, aux), grads = jax.value_and_grad(objective.loss, has_aux=True)(
      state.params, state.teacher_params, batch, step_rng, False)
  metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
  metrics.update({k: v for k, v in aux.items() if jnp.ndim(v) == 0})
  return apply_gradients(state, grads, tx, rng=rng, **changes), metrics


def student_predict(objective: DistillLoss):
  """(state, batch) -> the student's non-scalar outputs ('logits' [B, C], ...)."""
  def predict(state, batch):
    _, aux = objective.student_loss(state.params["student"], _with_dummy_labels(batch),
                                    state.rng, True)
    return {k: v for k, v in aux.items()
            if jnp.ndim(v) > 0 and k not in ("hidden_states", "attentions")}
  return predict


def distill(student: Union[nn.Module, LossFn], teacher: Teacher,
            tx: optax.GradientTransformation, *,
            losses: Mapping[str, float] = (("kd", 1.0),), temperature: float = 1.0,
            layer_map: lm.Strategy = "skip",
            student_init: Optional[Callable[[jax.Array, Batch], PyTree]] = None,
            pretrained: Optional[Mapping[str, Any]] = None) -> TrainStep:
  """Distils a frozen teacher into a student (see the module docstring).

  Args:
    student: a Linen module (classifier or encoder) or a LossFn.
    teacher: (module, params); params plain or boxed.
    tx: the student's optimizer (sees params {'student', 'projections'} only).
    losses: name -> weight, names from LOSSES (a mapping or (name, weight) pairs).
    temperature: T of 'kd' and 'soft_ce'.
    layer_map: 'skip' (m -> m N / M), 'last' (m -> N - M + m) or M teacher layers.
    student_init: (rng, batch) -> boxed student params; default `init_params` of the
      module with `pretrained` merged in.
    pretrained: plain arrays for a sub-tree of a module student's params.

  Returns:
    A TrainStep over `DistillState`; `predict` gives the student's logits.
  """
  objective = DistillLoss(student, teacher, dict(losses), temperature=temperature,
                          layer_map=layer_map, student_init=student_init,
                          pretrained=pretrained)
  return distill_train_step(objective, tx, objective.init)


def distill_train_step(objective, tx, init_fn) -> TrainStep:
  """The TrainStep of a distillation objective (a DistillLoss, or a wrapper of one that
  `distill_update` and `student_predict` accept).

  Args:
    objective: what `distill_update` minimises.
    tx: the student's optimizer.
    init_fn: (rng, batch) -> (student params, frozen teacher params).
  """
  def init(rng, batch):
    params_rng, state_rng = jax.random.split(rng)
    params, teacher_params = init_fn(params_rng, batch)
    return DistillState(step=jnp.zeros((), jnp.int32), params=params,
                        opt_state=tx.init(params), rng=state_rng,
                        teacher_params=teacher_params)

  def grad(state, batch, rng):
    (loss, aux), grads = jax.value_and_grad(objective.loss, has_aux=True)(
        state.params, state.teacher_params, batch, rng, False)
    return grads, {"loss": loss, **{k: v for k, v in aux.items() if jnp.ndim(v) == 0}}

  def apply(state, grads, rng):
    return apply_gradients(state, grads, tx, rng=rng), {}

  # grad + apply (not distill_update) so that the Trainer's gradient accumulation and
  # communication options apply; the numbers are distill_update's.
  return gradient_step(init, grad, apply, student_predict(objective))
