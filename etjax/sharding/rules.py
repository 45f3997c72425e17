"""Logical-axis rule presets: one table per job maps model axis names to mesh axes.

Models name logical axes only (see DESIGN.md); a preset decides where each goes.
Each rule is (logical name, mesh axis or tuple of mesh axes or None).
"""

from __future__ import annotations

from typing import Sequence

Rules = tuple[tuple[str, object], ...]

_BATCH = ("dcn_data", "data", "fsdp")

PRESETS: dict[str, Rules] = {
    # Pure data parallelism: parameters replicated, examples split.
    "dp": (("batch", _BATCH), ("length", None), ("vocab", None), ("embed", None),
           ("mlp", None), ("heads", None), ("kv", None), ("layers", None),
           ("stage", None), ("relpos_buckets", None), ("classes", None)),
    # ZeRO-3 style: parameters, gradients and optimizer state sharded over fsdp.
    "fsdp": (("batch", _BATCH), ("length", None), ("vocab", None), ("embed", "fsdp"),
             ("mlp", None), ("heads", None), ("kv", None), ("layers", None),
             ("stage", None), ("relpos_buckets", None), ("classes", None)),
    # Megatron tensor parallelism: heads, mlp and vocab on `model`.
    "tp": (("batch", _BATCH), ("length", None), ("vocab", "model"), ("embed", None),
           ("mlp", "model"), ("heads", "model"), ("kv", None), ("layers", None),
           ("stage", None), ("relpos_buckets", None), ("classes", None)),
    # fsdp + tp.
    "2d": (("batch", _BATCH), ("length", None), ("vocab", "model"), ("embed", "fsdp"),
           ("mlp", "model"), ("heads", "model"), ("kv", None), ("layers", None),
           ("stage", None), ("relpos_buckets", None), ("classes", None)),
    # fsdp + tp + pipeline stages. A scanned stack's [layers, ...] parameters are split
    # into contiguous blocks over `stage`, which is exactly the [stage, layers/stage, ...]
    # grouping the pipeline computes with, so no parameter moves between stages.
    "3d": (("batch", _BATCH), ("length", None), ("vocab", "model"), ("embed", "fsdp"),
           ("mlp", "model"), ("heads", "model"), ("kv", None), ("layers", "stage"),
           ("stage", "stage"), ("relpos_buckets", None), ("classes", None)),
}


def get_rules(preset: str | Sequence) -> Rules:
  """Returns the rules of a named preset, or `preset` itself when it is a rules table."""
  if isinstance(preset, str):
    if preset not in PRESETS:
      raise ValueError(f"unknown rules preset {preset!r}; known presets: "
                       f"{', '.join(sorted(PRESETS))}")
    return PRESETS[preset]
  return tuple((name, axes) for name, axes in preset)
