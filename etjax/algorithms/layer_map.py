"""Which teacher layer each student layer learns from.

Layers are numbered from 1 (layer 0 is the embedding output), as in Hugging Face's
`hidden_states` tuple: `hidden_states[0]` is the embeddings, `hidden_states[m]` the
output of layer m. Attention tuples have no embedding entry: `attentions[m - 1]` is
layer m.

Strategies for M student and N teacher layers (M <= N):
  "skip": student layer m -> teacher layer floor(m * N / M) (TinyBERT's m -> m N / M
          and PKD-Skip; for M=6, N=12: 2, 4, 6, 8, 10, 12);
  "last": student layer m -> teacher layer N - M + m (PKD-Last: 7, 8, ..., 12);
  an explicit sequence of M teacher layers.
PKD distils the last student layer through the logits, so it uses all pairs but the
last (`mapped_pairs(..., include_last=False)`).
"""

from __future__ import annotations

from typing import Sequence, Union

import jax
import jax.numpy as jnp

Strategy = Union[str, Sequence[int]]
STRATEGIES = ("skip", "last")


def layer_map(strategy: Strategy, num_student_layers: int,
              num_teacher_layers: int) -> tuple[int, ...]:
  """Returns the teacher layer (1..N) for each student layer 1..M, a tuple of M ints."""
  m, n = num_student_layers, num_teacher_layers
  for name, value in (("num_student_layers", m), ("num_teacher_layers", n)):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"layer_map: {name} must be a positive int, got {value!r}")
  if isinstance(strategy, str):
    if strategy not in STRATEGIES:
      raise ValueError(f"layer_map: unknown strategy {strategy!r}; expected one of "
                       f"{STRATEGIES} or a sequence of {m} teacher layers")
    if m > n:
      raise ValueError(f"layer_map: strategy {strategy!r} needs at most as many student "
                       f"layers as teacher layers, got {m} student > {n} teacher")
    if strategy == "skip":
      return tuple(i * n // m for i in range(1, m + 1))
    return tuple(n - m + i for i in range(1, m + 1))
  mapping = tuple(strategy)
  if len(mapping) != m:
    raise ValueError(f"layer_map: explicit map has {len(mapping)} entries, expected one "
                     f"per student layer ({m})")
  for i, t in enumerate(mapping):
    if not isinstance(t, int) or isinstance(t, bool) or not 1 <= t <= n:
      raise ValueError(f"layer_map: entry {i} (student layer {i + 1}) is {t!r}; "
                       f"expected a teacher layer in 1..{n}")
  return mapping


def mapped_pairs(mapping: Sequence[int], *, include_embeddings: bool = False,
                 include_last: bool = True) -> tuple[tuple[int, int], ...]:
  """Returns (student layer, teacher layer) pairs from a `layer_map` result.

  Args:
    mapping: teacher layer for each student layer 1..M.
    include_embeddings: prepend the pair (0, 0), the embedding outputs (TinyBERT).
    include_last: keep the pair of the last student layer (PKD drops it).
  """
  pairs = [(i + 1, t) for i, t in enumerate(mapping)]
  if not include_last:
    pairs = pairs[:-1]
  if include_embeddings:
    pairs = [(0, 0)] + pairs
  return tuple(pairs)


def stack_pairs(student_states, teacher_states, pairs: Sequence[tuple[int, int]], *,
                embeddings_first: bool = True) -> tuple[jax.Array, jax.Array]:
  """Gathers the mapped layers' states into two stacks.

  Args:
    student_states: sequence (or array with a leading layer axis) of student states.
    teacher_states: the same for the teacher.
    pairs: (student layer, teacher layer) pairs, 0 meaning embeddings.
    embeddings_first: True when index 0 holds the embeddings (hidden states); False
      when index m - 1 holds layer m (attentions).

  Returns:
    (student [n, ...], teacher [n, ...]) for the n pairs.
  """
  offset = 0 if embeddings_first else 1

  def gather(states, layer, who):
    index = layer - offset
    if not 0 <= index < len(states):
      raise ValueError(f"stack_pairs: {who} layer {layer} is not in the {len(states)} "
                       f"given states (embeddings_first={embeddings_first})")
    return states[index]

  if not pairs:
    raise ValueError("stack_pairs: no layer pairs given")
  s = jnp.stack([gather(student_states, i, "student") for i, _ in pairs])
  t = jnp.stack([gather(teacher_states, j, "teacher") for _, j in pairs])
  return s, t
