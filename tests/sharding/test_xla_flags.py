"""XLA flag presets: merge logic, and that XLA accepts the GPU preset's flag names."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from etjax.sharding import xla_flags


def test_merge_keeps_user_values_and_order():
  got = xla_flags.merge_flags(
      "--xla_force_host_platform_device_count=8 --xla_gpu_enable_latency_hiding_scheduler=false",
      ["--xla_gpu_enable_latency_hiding_scheduler=true", "--xla_b=1"])
  assert got == ("--xla_force_host_platform_device_count=8 "
                 "--xla_gpu_enable_latency_hiding_scheduler=false --xla_b=1")


def test_merge_override_replaces_in_place_and_collapses_repeats():
  got = xla_flags.merge_flags("--a=1 --b=2 --a=3", ["--a=9", "--c"], override=True)
  assert got == "--a=9 --b=2 --c"
  assert xla_flags.merge_flags("--a=1 --a=3", []) == "--a=3"
  with pytest.raises(ValueError, match="'xla_a=1' must start with '--'"):
    xla_flags.merge_flags("", ["xla_a=1"])


def test_apply_writes_the_platform_variable():
  env = {"XLA_FLAGS": "--xla_gpu_all_reduce_combine_threshold_bytes=1"}
  assert xla_flags.apply_xla_flags("gpu", environ=env, extra=["--xla_x=2"]) == "XLA_FLAGS"
  flags = env["XLA_FLAGS"].split()
  assert flags[0] == "--xla_gpu_all_reduce_combine_threshold_bytes=1"
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags
  assert flags[-1] == "--xla_x=2"
  assert len(flags) == len(xla_flags.PRESETS["gpu"]) + 1
  env = {}
  assert xla_flags.apply_xla_flags("tpu", environ=env) == "LIBTPU_INIT_ARGS"
  assert env["LIBTPU_INIT_ARGS"] == " ".join(xla_flags.PRESETS["tpu"])
  with pytest.raises(ValueError, match="unknown platform 'npu'"):
    xla_flags.apply_xla_flags("npu", environ={})


def test_detect_platform_from_jax_platforms():
  assert xla_flags.detect_platform({"JAX_PLATFORMS": "cuda,cpu"}) == "gpu"
  assert xla_flags.detect_platform({"JAX_PLATFORMS": "tpu"}) == "tpu"
  assert xla_flags.detect_platform({"JAX_PLATFORMS": "cpu"}) == "cpu"


def test_xla_accepts_gpu_preset_names():
  # XLA aborts at start-up on an unknown name in XLA_FLAGS; the GPU options are
  # registered in every build, so a CPU process checks the spelling of each one.
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  xla_flags.apply_xla_flags("gpu", environ=env)
  proc = subprocess.run([sys.executable, "-c", "import jax; print(jax.devices())"],
                        env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  env["XLA_FLAGS"] += " --xla_gpu_no_such_flag=true"
  proc = subprocess.run([sys.executable, "-c", "import jax; print(jax.devices())"],
                        env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
