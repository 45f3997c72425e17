"""Knowledge-distillation losses: pure functions of student and teacher outputs.

Every loss here reduces its per-element values with `masked_weighted_mean`: the mean
over the valid elements, example b counted with weight w_b,

    L = sum_b w_b sum_e m_be l_be / sum_b w_b sum_e m_be,

so a padding mask removes positions and per-example weights (instance selection,
typicality, domain expertise) rescale examples without changing the loss's scale.
None of the losses stops gradients into the teacher's outputs: the caller freezes the
teacher (a meta-teacher may need them). Losses are computed in float32 or wider.

Shapes are in the argument names: b batch, l length, d student width, D teacher width,
h heads, q queries, k keys, c classes, n mapped layers.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def masked_weighted_mean(values: Array, mask: Optional[Array] = None,
                         weight_b: Optional[Array] = None) -> Array:
  """Weighted mean of `values` over its valid elements.

  Args:
    values: [b, ...] per-element values (batch first).
    mask: optional, broadcastable to `values`; nonzero marks valid elements. Masked
      elements never contribute, even if they hold inf or nan.
    weight_b: optional [b] per-example weights (>= 0).

  Returns:
    [] sum(w * m * values) / sum(w * m); 0 when nothing is valid.
  """
  values = jnp.asarray(values)
  if values.ndim == 0:
    raise ValueError("masked_weighted_mean: values must have a batch axis, got a scalar")
  values = values.astype(jnp.promote_types(values.dtype, jnp.float32))
  batch = values.shape[0]
  if mask is None:
    m = jnp.ones(values.shape, values.dtype)
  else:
    mask = jnp.asarray(mask)
    try:
      m = jnp.broadcast_to(mask, values.shape).astype(values.dtype)
    except ValueError as e:
      raise ValueError(f"mask of shape {mask.shape} does not broadcast to the loss "
                       f"elements of shape {values.shape}") from e
  if weight_b is not None:
    weight_b = jnp.asarray(weight_b)
    if weight_b.shape != (batch,):
      raise ValueError(f"weight_b must have shape [batch]=({batch},), got {weight_b.shape}")
    m = m * weight_b.astype(values.dtype).reshape((batch,) + (1,) * (values.ndim - 1))
  valid = m != 0
  total = jnp.sum(jnp.where(valid, values, 0) * m)
  denom = jnp.sum(m)
  return jnp.where(denom > 0, total / jnp.where(denom > 0, denom, 1), 0.0)


def project(x_bld: Array, kernel_dD: Optional[Array] = None,
            bias_D: Optional[Array] = None) -> Array:
  """Maps student features to the teacher's width: x W (+ b).

  Returns:
    [b, ..., D] the projected features, or `x_bld` unchanged when `kernel_dD` is None.
  """
  if kernel_dD is None:
    return x_bld
  if kernel_dD.ndim != 2 or kernel_dD.shape[0] != x_bld.shape[-1]:
    raise ValueError(f"projection kernel must have shape [student width "
                     f"{x_bld.shape[-1]}, teacher width], got {kernel_dD.shape}")
  y = jnp.einsum("...d,dD->...D", x_bld, kernel_dD)
  return y if bias_D is None else y + bias_D


class HiddenProjection(nn.Module):
  """The learnable W_h of TinyBERT: a dense map from student to teacher width.

  Attributes:
    features: the teacher width D.
    use_bias: whether to add a bias.
  """
  features: int
  use_bias: bool = True

  @nn.compact
  def __call__(self, x_bld: Array) -> Array:
    """Returns [b, ..., D] projected features."""
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                               (None, "embed")),
        (x_bld.shape[-1], self.features), jnp.float32)
    bias = None
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                             ("embed",)),
                        (self.features,), jnp.float32)
    return project(x_bld, kernel, bias)


def _check_temperature(temperature: float) -> None:
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")


def _check_same_shape(what: str, a: Array, b: Array) -> None:
  if a.shape != b.shape:
    raise ValueError(f"{what}: student shape {a.shape} != teacher shape {b.shape}")


def _f32(x: Array) -> Array:
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def kl_with_temperature(student_logits: Array, teacher_logits: Array,
                        temperature: float = 1.0) -> Array:
  """Per-element T^2 * KL(softmax(t / T) || softmax(s / T)).

  Args:
    student_logits: [b, ..., c].
    teacher_logits: [b, ..., c].

  Returns:
    [b, ...] the scaled KL divergence of each element.
  """
  _check_temperature(temperature)
  _check_same_shape("kl_with_temperature", student_logits, teacher_logits)
  log_ps = jax.nn.log_softmax(_f32(student_logits) / temperature, axis=-1)
  log_pt = jax.nn.log_softmax(_f32(teacher_logits) / temperature, axis=-1)
  pt = jnp.exp(log_pt)
  # 0 * log 0 = 0: a teacher class with probability 0 contributes nothing.
  kl = jnp.sum(jnp.where(pt > 0, pt * (jnp.where(pt > 0, log_pt, 0) - log_ps), 0),
               axis=-1)
  return temperature ** 2 * kl


def hard_cross_entropy(logits: Array, labels: Array) -> Array:
  """Per-element -log softmax(logits)[label].

  Args:
    logits: [b, ..., c].
    labels: [b, ...] int class ids.

  Returns:
    [b, ...] cross-entropies.
  """
  if labels.shape != logits.shape[:-1]:
    raise ValueError(f"labels shape {labels.shape} must equal logits shape without "
                     f"classes {logits.shape[:-1]}")
  log_p = jax.nn.log_softmax(_f32(logits), axis=-1)
  return -jnp.take_along_axis(log_p, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]


def kd_loss(student_logits: Array, teacher_logits: Array,
            labels: Optional[Array] = None, *, temperature: float = 1.0,
            alpha: float = 1.0, mask: Optional[Array] = None,
            weight_b: Optional[Array] = None) -> Array:
  """Hinton logits distillation mixed with the hard-label loss.

      l = alpha * T^2 * KL(softmax(t / T) || softmax(s / T))
          + (1 - alpha) * CE(y, softmax(s))

  The T^2 keeps the soft term's gradient scale independent of T (Hinton et al. 2015).

  Args:
    student_logits: [b, ..., c].
    teacher_logits: [b, ..., c].
    labels: [b, ...] int; required when alpha < 1.
    temperature: T > 0.
    alpha: weight of the soft term, in [0, 1].
    mask: optional [b, ...] valid elements (e.g. token positions).
    weight_b: optional [b] per-example weights.

  Returns:
    [] the weighted mean of l over valid elements.
  """
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"kd_loss: alpha must be in [0, 1], got {alpha}")
  per = alpha * kl_with_temperature(student_logits, teacher_logits, temperature)
  if alpha < 1.0:
    if labels is None:
      raise ValueError(f"kd_loss: labels are required when alpha={alpha} < 1")
    per = per + (1.0 - alpha) * hard_cross_entropy(student_logits, labels)
  return masked_weighted_mean(per, mask, weight_b)


def soft_cross_entropy(student_logits: Array, teacher_logits: Array, *,
                       temperature: float = 1.0, mask: Optional[Array] = None,
                       weight_b: Optional[Array] = None) -> Array:
  """DistilBERT's soft-target cross-entropy.

      l = -T^2 * sum_c softmax(t / T)_c * log softmax(s / T)_c

  It differs from the KL of `kd_loss` by T^2 times the teacher's entropy, a constant
  for the student, so both give the same student gradients.

  Args:
    student_logits: [b, ..., c].
    teacher_logits: [b, ..., c].
    temperature: T > 0.
    mask: optional [b, ...] valid elements.
    weight_b: optional [b] per-example weights.

  Returns:
    [] the weighted mean of l over valid elements.
  """
  _check_temperature(temperature)
  _check_same_shape("soft_cross_entropy", student_logits, teacher_logits)
  log_ps = jax.nn.log_softmax(_f32(student_logits) / temperature, axis=-1)
  pt = jax.nn.softmax(_f32(teacher_logits) / temperature, axis=-1)
  per = -temperature ** 2 * jnp.sum(pt * log_ps, axis=-1)
  return masked_weighted_mean(per, mask, weight_b)


def hidden_mse(student_bld: Array, teacher_blD: Array, *,
               projection_dD: Optional[Array] = None, bias_D: Optional[Array] = None,
               mask_bl: Optional[Array] = None,
               weight_b: Optional[Array] = None) -> Array:
  """TinyBERT's hidden-state loss, MSE(H_s W + b, H_t).

      L = mean over valid (b, l) and all D of ((H_s W + b) - H_t)^2

  Args:
    student_bld: [b, l, d] student hidden states (any [b, ..., d] works).
    teacher_blD: [b, l, D] teacher hidden states.
    projection_dD: [d, D] the learnable W; required when d != D.
    bias_D: optional [D] bias of the projection.
    mask_bl: optional [b, l] padding mask (1 = token).
    weight_b: optional [b] per-example weights.

  Returns:
    [] the loss.
  """
  s = project(_f32(student_bld), projection_dD, bias_D)
  t = _f32(teacher_blD)
  if s.shape != t.shape:
    raise ValueError(f"hidden_mse: student states {student_bld.shape} (projected "
                     f"{s.shape}) do not match teacher states {t.shape}; pass "
                     f"projection_dD of shape [{student_bld.shape[-1]}, {t.shape[-1]}]")
  mask = None if mask_bl is None else jnp.asarray(mask_bl)[..., None]
  return masked_weighted_mean((s - t) ** 2, mask, weight_b)


def embedding_mse(student_bld: Array, teacher_blD: Array, *,
                  projection_dD: Optional[Array] = None, bias_D: Optional[Array] = None,
                  mask_bl: Optional[Array] = None,
                  weight_b: Optional[Array] = None) -> Array:
  """TinyBERT's embedding-layer loss, MSE(E_s W_e + b, E_t); see `hidden_mse`.

  Returns:
    [] the loss, computed by `hidden_mse` on the embedding outputs.
  """
  return hidden_mse(student_bld, teacher_blD, projection_dD=projection_dD,
                    bias_D=bias_D, mask_bl=mask_bl, weight_b=weight_b)


def attention_mse(student_bhqk: Array, teacher_bhqk: Array, *,
                  attention_mask_bk: Optional[Array] = None,
                  weight_b: Optional[Array] = None) -> Array:
  """TinyBERT's attention loss: MSE between student and teacher attention matrices.

      L = mean over b, h and valid (q, k) of (A_s - A_t)^2

  TinyBERT matches the unnormalized attention SCORES (q.k / sqrt(d_k) before softmax;
  its paper argues they carry more linguistic signal than probabilities). This
  function accepts either, provided both sides pass the same kind. Padding positions
  (query or key with mask 0) do not contribute; their scores may hold -inf or a large
  negative fill and still give finite losses and gradients. Student and teacher must
  have the same number of heads, as in TinyBERT.

  Args:
    student_bhqk: [b, h, q, k] student attention scores or probabilities.
    teacher_bhqk: [b, h, q, k] teacher attention of the same kind.
    attention_mask_bk: optional [b, k] padding mask (1 = token), used for both
      queries and keys (self-attention, q == k).
    weight_b: optional [b] per-example weights.

  Returns:
    [] the loss.
  """
  _check_same_shape("attention_mse (heads and lengths must match)", student_bhqk,
                    teacher_bhqk)
  s, t = _f32(student_bhqk), _f32(teacher_bhqk)
  if attention_mask_bk is None:
    return masked_weighted_mean((s - t) ** 2, None, weight_b)
  m = jnp.asarray(attention_mask_bk)
  b, _, q, k = s.shape
  if m.shape != (b, k) or q != k:
    raise ValueError(f"attention_mse: attention_mask_bk must be [batch, length]="
                     f"({b}, {k}) for self-attention [b, h, q, k]={s.shape}, "
                     f"got {m.shape}")
  pair_b1qk = (m[:, None, :, None] * m[:, None, None, :]) != 0
  # Zero the padded scores before subtracting: -inf - -inf would be nan, and nan
  # times a zero cotangent is still nan.
  s = jnp.where(pair_b1qk, s, 0)
  t = jnp.where(pair_b1qk, t, 0)
  return masked_weighted_mean((s - t) ** 2, pair_b1qk, weight_b)


def _safe_norm(x: Array, eps: float) -> Array:
  # max inside the sqrt keeps the gradient finite at x = 0.
  return jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def pkd_patient_loss(student_cls_nbd: Array, teacher_cls_nbD: Array, *,
                     projection_dD: Optional[Array] = None,
                     weight_b: Optional[Array] = None, eps: float = 1e-12) -> Array:
  """BERT-PKD's patient loss on the [CLS] states of the mapped layers.

      L = mean over n, b and D of (h_s / ||h_s||_2 - h_t / ||h_t||_2)^2

  The PKD paper writes the sum over layers of squared L2 distances per example; its
  released code takes the mean over layers, examples and features (MSE), which is
  the paper's value divided by n * D. This follows the code.

  Args:
    student_cls_nbd: [n, b, d] student [CLS] states for the n mapped layers (a
      sequence of [b, d] arrays is stacked).
    teacher_cls_nbD: [n, b, D] teacher [CLS] states of the layers they map to.
    projection_dD: optional [d, D] applied to the student before normalizing.
    weight_b: optional [b] per-example weights.
    eps: floor of the norms.

  Returns:
    [] the loss.
  """
  s = project(_f32(jnp.stack(student_cls_nbd) if isinstance(student_cls_nbd, (list, tuple))
                   else student_cls_nbd), projection_dD)
  t = _f32(jnp.stack(teacher_cls_nbD) if isinstance(teacher_cls_nbD, (list, tuple))
           else teacher_cls_nbD)
  if s.ndim != 3:
    raise ValueError(f"pkd_patient_loss: expected [layers, batch, width] states, got "
                     f"{s.shape}")
  _check_same_shape("pkd_patient_loss", s, t)
  diff = s / _safe_norm(s, eps) - t / _safe_norm(t, eps)
  return masked_weighted_mean(jnp.swapaxes(diff ** 2, 0, 1), None, weight_b)


def cosine_hidden_loss(student_bld: Array, teacher_blD: Array, *,
                       projection_dD: Optional[Array] = None,
                       mask_bl: Optional[Array] = None,
                       weight_b: Optional[Array] = None, eps: float = 1e-8) -> Array:
  """DistilBERT's cosine embedding loss between hidden states (target +1).

      l_bl = 1 - <s, t> / (max(||s||, eps) * max(||t||, eps))

  Args:
    student_bld: [b, l, d] student hidden states (any [b, ..., d]).
    teacher_blD: [b, l, D] teacher hidden states.
    projection_dD: [d, D]; required when d != D.
    mask_bl: optional [b, l] padding mask.
    weight_b: optional [b] per-example weights.
    eps: floor of the norms.

  Returns:
    [] the mean of l over valid positions.
  """
  s = project(_f32(student_bld), projection_dD)
  t = _f32(teacher_blD)
  if s.shape != t.shape:
    raise ValueError(f"cosine_hidden_loss: student states {student_bld.shape} "
                     f"(projected {s.shape}) do not match teacher states {t.shape}")
  cos = jnp.sum(s * t, axis=-1) / (_safe_norm(s, eps)[..., 0] * _safe_norm(t, eps)[..., 0])
  return masked_weighted_mean(1.0 - cos, mask_bl, weight_b)
