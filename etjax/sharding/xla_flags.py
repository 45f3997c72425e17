"""XLA flag presets per platform, merged into the environment before jax starts.

XLA reads its flags once, when the first backend initialises, so `apply_xla_flags` must
run before anything touches a device (the launchers and `etjax/main.py` call it first
thing). GPU flags go to XLA_FLAGS; TPU flags go to LIBTPU_INIT_ARGS, which libtpu reads.
Flags the user already set win over the preset, so an experiment can override any one.

GPU preset (as in the JAX GPU performance guide and MaxText): the latency-hiding
scheduler overlaps collectives with compute; collectives are combined up to 128 MiB
(fewer, larger transfers) and pipelined across scan iterations; while-loop double
buffering lets the next layer's all-gather run during the current layer.
TPU preset (MaxText's libtpu flags): async collective fusion so all-gathers and
reduce-scatters overlap compute, the data-parallel all-reduce optimisation, and async
collective permutes (pipeline parallelism).
"""

from __future__ import annotations

import os
from typing import Mapping, MutableMapping, Optional, Sequence

_COMBINE = 128 * 1024 * 1024

PRESETS: dict[str, tuple[str, ...]] = {
    "gpu": (
        "--xla_gpu_enable_latency_hiding_scheduler=true",
        "--xla_gpu_enable_highest_priority_async_stream=true",
        f"--xla_gpu_all_reduce_combine_threshold_bytes={_COMBINE}",
        f"--xla_gpu_all_gather_combine_threshold_bytes={_COMBINE}",
        f"--xla_gpu_reduce_scatter_combine_threshold_bytes={_COMBINE}",
        f"--xla_gpu_collective_permute_combine_threshold_bytes={_COMBINE}",
        "--xla_gpu_enable_pipelined_all_gather=true",
        "--xla_gpu_enable_pipelined_reduce_scatter=true",
        "--xla_gpu_enable_pipelined_all_reduce=true",
        "--xla_gpu_enable_pipelined_p2p=true",
        "--xla_gpu_enable_while_loop_double_buffering=true",
        "--xla_gpu_enable_all_gather_combine_by_dim=false",
        "--xla_gpu_enable_reduce_scatter_combine_by_dim=false",
    ),
    "tpu": (
        "--xla_tpu_enable_async_collective_fusion=true",
        "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true",
        "--xla_tpu_enable_async_collective_fusion_multiple_steps=true",
        "--xla_tpu_overlap_compute_collective_tc=true",
        "--xla_enable_async_all_gather=true",
        "--xla_enable_async_collective_permute=true",
        "--xla_tpu_enable_data_parallel_all_reduce_opt=true",
        "--xla_tpu_data_parallel_opt_different_sized_ops=true",
    ),
    "cpu": (),
}

ENV_VAR = {"gpu": "XLA_FLAGS", "cpu": "XLA_FLAGS", "tpu": "LIBTPU_INIT_ARGS"}


def _name(flag: str) -> str:
  return flag.split("=", 1)[0]


def merge_flags(existing: str, preset: Sequence[str], *, override: bool = False) -> str:
  """Merges `preset` flags into the flag string `existing`.

  Args:
    existing: a space-separated flag string, e.g. the current XLA_FLAGS.
    preset: flags '--name=value' (or '--name') to add.
    override: when False (default) a flag already in `existing` keeps its value; when
      True the preset's value replaces it.

  Returns:
    The merged flag string: the existing flags in their order (values replaced in
    place when overriding), then the new ones in preset order. Repeated names in
    `existing` collapse to their last value, as XLA itself would read them.

  Raises:
    ValueError: for a preset entry that does not start with '--'.
  """
  merged: dict[str, str] = {}
  for flag in existing.split():
    merged[_name(flag)] = flag
  for flag in preset:
    if not flag.startswith("--"):
      raise ValueError(f"XLA flag {flag!r} must start with '--'")
    if override or _name(flag) not in merged:
      merged[_name(flag)] = flag
  return " ".join(merged.values())


def detect_platform(environ: Optional[Mapping[str, str]] = None) -> str:
  """'tpu', 'gpu' or 'cpu', decided without initialising jax.

  JAX_PLATFORMS (its first entry) wins; otherwise a TPU or NVIDIA device node decides.
  """
  environ = os.environ if environ is None else environ
  requested = environ.get("JAX_PLATFORMS", "").split(",")[0].strip().lower()
  if requested in ("cuda", "rocm", "gpu"):
    return "gpu"
  if requested in ("tpu", "cpu"):
    return requested
  if os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0"):
    return "tpu"
  if os.path.exists("/dev/nvidia0"):
    return "gpu"
  return "cpu"


def apply_xla_flags(platform: Optional[str] = None, *,
                    environ: Optional[MutableMapping[str, str]] = None,
                    extra: Sequence[str] = (), override: bool = False) -> str:
  """Writes the platform's preset (plus `extra` flags) into the environment.

  Args:
    platform: 'gpu', 'tpu' or 'cpu'; default `detect_platform()`.
    environ: the mapping to update; default `os.environ`.
    extra: further flags for the same variable (e.g. a job's own settings).
    override: let preset and extra values replace ones already set.

  Returns:
    The name of the variable that was written (XLA_FLAGS or LIBTPU_INIT_ARGS).
  """
  environ = os.environ if environ is None else environ
  platform = detect_platform(environ) if platform is None else platform
  if platform not in PRESETS:
    raise ValueError(f"unknown platform {platform!r}; known: {sorted(PRESETS)}")
  var = ENV_VAR[platform]
  merged = merge_flags(environ.get(var, ""), PRESETS[platform] + tuple(extra),
                       override=override)
  environ[var] = merged
  return var
