"""Running on N fake CPU devices (plans and tests of meshes bigger than this machine).

XLA fixes the number of host devices when its CPU backend starts, from
`--xla_force_host_platform_device_count` in XLA_FLAGS, so a process that needs N
devices and lacks them must start again with that flag. `ensure_fake_devices`
re-executes the current command line in place (same interpreter, same arguments, same
stdin/stdout), marking the environment so that it happens at most once;
`fake_device_environ` gives the environment for launching a subprocess instead.
"""

from __future__ import annotations

import os
import sys
from typing import Mapping, Optional, Sequence

from etjax.sharding.xla_flags import merge_flags

ENV_MARK = "ETJAX_FAKE_DEVICES"


def fake_device_environ(num_devices: int,
                        environ: Optional[Mapping[str, str]] = None) -> dict[str, str]:
  """A copy of `environ` (default os.environ) set up for `num_devices` CPU devices.

  Returns:
    The environment with JAX_PLATFORMS=cpu, the device-count flag set (replacing any
    other count) in XLA_FLAGS, and ETJAX_FAKE_DEVICES=num_devices.
  """
  if num_devices < 1:
    raise ValueError(f"num_devices must be >= 1, got {num_devices}")
  env = dict(os.environ if environ is None else environ)
  env["XLA_FLAGS"] = merge_flags(
      env.get("XLA_FLAGS", ""),
      [f"--xla_force_host_platform_device_count={num_devices}"], override=True)
  env["JAX_PLATFORMS"] = "cpu"
  env[ENV_MARK] = str(num_devices)
  return env


def ensure_fake_devices(num_devices: int, argv: Optional[Sequence[str]] = None) -> None:
  """Makes sure this process has `num_devices` CPU devices, re-executing if needed.

  Call it before anything initialises jax's backends. If this process was already
  started with the right environment it returns (after checking the count); otherwise
  it replaces the process with `argv` (default: the original command line,
  `sys.orig_argv`, which keeps `python -m module` and `-c` forms) in that environment,
  and does not return.

  Raises:
    RuntimeError: if the environment is marked but jax sees another device count
      (jax was initialised before the flag took effect).
  """
  if os.environ.get(ENV_MARK) == str(num_devices):
    import jax  # pylint: disable=g-import-not-at-top
    if jax.device_count() != num_devices:
      raise RuntimeError(f"{ENV_MARK}={num_devices} but jax has {jax.device_count()} "
                         "devices: jax was initialised before XLA_FLAGS was read")
    return
  argv = list(sys.orig_argv[1:] if argv is None else argv)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable] + argv, fake_device_environ(num_devices))
