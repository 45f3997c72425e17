"""jax's persistent compilation cache, on by default for etjax jobs.

A job run twice (or two jobs with the same step, such as the demo's pretrained and
random-init runs) compiles the same XLA programs; with the cache on, the second run
loads the executables from disk instead of compiling them. What is computed does not
change: the cache key covers the program, the compile options, jax/XLA versions and
the devices.

    enable('auto')           # $ETJAX_COMPILATION_CACHE, else ~/.cache/etjax/jax-cache
    enable('/some/dir')      # that directory
    enable(None)             # leave jax's setting alone (off unless the user set it)

The cache is a process-wide jax setting; `enable` switches it when asked for another
directory. Only programs that took at least `min_compile_s` to compile are stored
(jax's own default is 1 s), so small helper jits do not fill the directory; the
directory is capped at `max_bytes` (least recently used entries go first).
"""

from __future__ import annotations

import os
from typing import Optional

import jax
from jax.experimental.compilation_cache import compilation_cache as _cc

ENV = "ETJAX_COMPILATION_CACHE"
MAX_BYTES = 4 << 30


def default_dir() -> Optional[str]:
  """$ETJAX_COMPILATION_CACHE ('' or 'none' disables), else the user cache dir."""
  if ENV in os.environ:
    value = os.environ[ENV].strip()
    return None if value.lower() in ("", "none", "off") else os.path.abspath(
        os.path.expanduser(value))
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"),
                                                          ".cache")
  return os.path.join(base, "etjax", "jax-cache")


def enable(directory: Optional[str] = "auto", *, min_compile_s: float = 1.0,
           max_bytes: int = MAX_BYTES) -> Optional[str]:
  """Points jax's persistent compilation cache at `directory` ('auto': `default_dir()`,
  None: leave as is). Returns the directory in use (None when off)."""
  if directory is None:
    return jax.config.jax_compilation_cache_dir
  if directory == "auto":
    directory = default_dir()
    if directory is None:
      return jax.config.jax_compilation_cache_dir
  directory = os.path.abspath(os.path.expanduser(directory))
  if jax.config.jax_compilation_cache_dir == directory:
    return directory
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:
    raise ValueError(f"compilation cache directory {directory!r}: {e}") from e
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_s))
  jax.config.update("jax_compilation_cache_max_size", int(max_bytes))
  _cc.set_cache_dir(directory)
  # jax opens its cache once per process: a new directory needs a reset to take effect.
  _cc.reset_cache()
  return directory
