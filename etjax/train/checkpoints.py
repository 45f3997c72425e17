"""Orbax checkpoints of a TrainState, the data position and metrics, verified on restore.

Layout: `directory/<step>/` as orbax writes it (items `state`, `data`, `meta`), plus
`etjax_integrity.json`: the size and CRC-32 of every file, written once orbax has
finalized the step. That file is etjax's commit marker: a step without it, or whose
files differ from it (truncated, deleted, flipped bytes: orbax alone restores some of
these silently), is corrupt. `restore` then warns naming the step, moves it aside to
`<directory>.corrupt/<step>` (never deleted) and falls back to the previous step.

Retention: the latest `keep_last` steps, plus the best `keep_best` by `best_metric`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import warnings
import zlib
from typing import Any, Optional

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as ocm

PyTree = Any
INTEGRITY_FILE = "etjax_integrity.json"


class CorruptCheckpointError(RuntimeError):
  """A checkpoint step whose files do not match its integrity record."""


def _is_key(x) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_savable(state: PyTree) -> PyTree:
  """Unboxed state with typed PRNG keys as their raw uint32 data.

  In one process the arrays are fetched to the host first: orbax otherwise slices
  every replicated array per device, compiling a slice per shape and device.
  """
  plain = jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x,
                       nn.meta.unbox(state))
  return jax.device_get(plain) if jax.process_count() == 1 else plain


def _restore_target(abstract_state: PyTree, shardings: Optional[PyTree]) -> PyTree:
  """ShapeDtypeStructs (with shardings) of `_to_savable(abstract_state)`."""
  plain = nn.meta.unbox(abstract_state)
  if shardings is None:
    shardings = jax.tree.map(lambda _: None, plain)

  def target(x, sharding):
    if _is_key(x):
      data = jax.eval_shape(jax.random.key_data, x)
      return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  return jax.tree.map(target, plain, shardings)


def _arrays_by_name(tree: PyTree) -> dict[str, tuple[tuple, str]]:
  """{'a/b/c': (shape, dtype name)} of a tree's array leaves (attribute, key and index
  paths spelt alike, so a dataclass and the dict orbax saves it as compare equal)."""
  def part(k):
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        return str(getattr(k, attr))
    return str(k)
  return {"/".join(part(k) for k in path): (tuple(leaf.shape), np.dtype(leaf.dtype).name)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _from_restored(abstract_state: PyTree, restored: PyTree) -> PyTree:
  """Puts restored leaves back into the boxed structure, re-wrapping PRNG keys."""
  abstract_leaves, treedef = jax.tree.flatten(abstract_state)
  # An abstract key exposes its implementation only through its dtype.
  leaves = [jax.random.wrap_key_data(r, impl=a.dtype._impl) if _is_key(a) else r
            for a, r in zip(abstract_leaves, jax.tree.leaves(restored))]
  return jax.tree.unflatten(treedef, leaves)


def _gather_data_states(data_state: dict) -> dict:
  """{process index (str): its data iterator state} for every process.

  Each process reads its own shard of the data, so each has its own position; orbax
  writes JSON items from the primary process only, so the states are gathered first.
  """
  if jax.process_count() == 1:
    return {"0": data_state}
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  mine = np.frombuffer(json.dumps(data_state).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.array([mine.size], np.int64)).reshape(-1)
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:mine.size] = mine
  everyone = multihost_utils.process_allgather(padded)
  return {str(i): json.loads(bytes(everyone[i, :lengths[i]]))
          for i in range(jax.process_count())}


def _crc32(path: str) -> int:
  crc = 0
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      crc = zlib.crc32(chunk, crc)
  return crc


def _list_files(step_dir: str) -> list[str]:
  files = []
  for root, _, names in os.walk(step_dir):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), step_dir)
      if rel != INTEGRITY_FILE:
        files.append(rel)
  return sorted(files)


def write_integrity(step_dir: str) -> None:
  """Records size and CRC-32 of every file in `step_dir` (atomically)."""
  record = {rel: {"size": os.path.getsize(os.path.join(step_dir, rel)),
                  "crc32": _crc32(os.path.join(step_dir, rel))}
            for rel in _list_files(step_dir)}
  tmp = os.path.join(step_dir, INTEGRITY_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump(record, f, indent=0, sort_keys=True)
  os.replace(tmp, os.path.join(step_dir, INTEGRITY_FILE))


def verify_integrity(step_dir: str) -> None:
  """Raises CorruptCheckpointError naming the first problem found in `step_dir`."""
  path = os.path.join(step_dir, INTEGRITY_FILE)
  if not os.path.exists(path):
    raise CorruptCheckpointError(f"{step_dir}: no {INTEGRITY_FILE} (the save never "
                                 "completed)")
  with open(path) as f:
    record = json.load(f)
  for rel, expected in record.items():
    full = os.path.join(step_dir, rel)
    if not os.path.exists(full):
      raise CorruptCheckpointError(f"{step_dir}: file {rel} is missing")
    if os.path.getsize(full) != expected["size"]:
      raise CorruptCheckpointError(f"{step_dir}: file {rel} has "
                                   f"{os.path.getsize(full)} bytes, expected "
                                   f"{expected['size']}")
    if _crc32(full) != expected["crc32"]:
      raise CorruptCheckpointError(f"{step_dir}: file {rel} fails its CRC-32 check")


class Checkpointer:
  """Saves and restores (state, data position, metrics) with orbax under `directory`.

  Args:
    directory: where step directories go (created if missing).
    keep_last: how many most recent steps to keep (>= 1; 2 leaves a fallback when the
      newest turns out corrupt).
    best_metric: metric name whose best `keep_best` steps are kept as well (None: no
      best tracking).
    best_mode: 'max' or 'min' for `best_metric`.
    keep_best: how many best steps to keep.
  """

  def __init__(self, directory: str, *, keep_last: int = 2,
               best_metric: Optional[str] = None, best_mode: str = "max",
               keep_best: int = 1):
    if keep_last < 1:
      raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    self.directory = os.path.abspath(directory)
    self.best_metric, self.best_mode = best_metric, best_mode
    policies = [ocm.LatestN(n=keep_last)]
    if best_metric:
      policies.append(ocm.BestN(get_metric_fn=self._score, reverse=best_mode == "min",
                                n=keep_best, keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        best_fn=self._score if best_metric else None, best_mode=best_mode,
        preservation_policy=ocm.AnyPreservationPolicy(policies),
        enable_async_checkpointing=False, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def _score(self, metrics: Optional[dict]) -> float:
    # Steps saved without an evaluation carry {} and rank last.
    worst = -math.inf if self.best_mode == "max" else math.inf
    value = (metrics or {}).get(self.best_metric)
    return worst if value is None or math.isnan(value) else float(value)

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def all_steps(self) -> list[int]:
    """Steps on disk (finalized by orbax; not yet verified), ascending."""
    self._manager.reload()
    return sorted(self._manager.all_steps())

  def best_step(self) -> Optional[int]:
    """The kept step with the best `best_metric`, or None."""
    if not self.best_metric:
      return None
    scored = [(self._score(self._manager.metrics(s)), s) for s in self.all_steps()]
    scored = [(v, s) for v, s in scored if math.isfinite(v)]
    if not scored:
      return None
    pick = max if self.best_mode == "max" else min
    return pick(scored)[1]

  def check_compatible(self, abstract_state: PyTree) -> None:
    """Raises ValueError, naming the first differing array, when the latest step's
    saved state does not have `abstract_state`'s arrays (names, shapes, dtypes): a
    job with another model or optimizer pointed at this directory. Reads only the
    step's metadata; nothing is restored or changed."""
    steps = self.all_steps()
    if not steps:
      return
    try:
      saved = ocp.StandardCheckpointHandler().metadata(
          epath.Path(os.path.join(self.step_dir(steps[-1]), "state"))).tree
    except (OSError, ValueError, KeyError):
      return  # unreadable metadata: `restore` verifies the step and sets it aside
    want = _arrays_by_name(_restore_target(abstract_state, None))
    have = _arrays_by_name(saved)
    if want == have:
      return
    problems = ([f"{n} is saved but this job has no such array"
                 for n in sorted(set(have) - set(want))] +
                [f"{n} is not in the checkpoint" for n in sorted(set(want) - set(have))] +
                [f"{n} is {have[n][1]}{list(have[n][0])} saved, {want[n][1]}"
                 f"{list(want[n][0])} in this job"
                 for n in sorted(set(want) & set(have)) if want[n] != have[n]])
    raise ValueError(f"the checkpoints in {self.directory} (step {steps[-1]}) belong to "
                     f"another model or optimizer: {problems[0]} ({len(problems)} "
                     "difference(s)); use a new workdir or the settings it was trained "
                     "with")

  def save(self, step: int, state: PyTree, data_state: Optional[dict] = None,
           metrics: Optional[dict] = None) -> None:
    """Writes `state` (boxes stripped), the data iterator state and metrics at `step`."""
    metrics = {k: float(v) for k, v in (metrics or {}).items()}
    meta = {"step": int(step), "metrics": metrics, "time": time.time()}
    self._manager.save(
        int(step), metrics=metrics if self.best_metric else None, force=True,
        args=ocp.args.Composite(state=ocp.args.StandardSave(_to_savable(state)),
                                data=ocp.args.JsonSave(
                                    _gather_data_states(data_state or {})),
                                meta=ocp.args.JsonSave(meta)))
    self._manager.wait_until_finished()
    if jax.process_index() == 0:
      write_integrity(self.step_dir(step))

  def restore(self, abstract_state: PyTree, shardings: Optional[PyTree] = None,
              step: Optional[int] = None) -> tuple[PyTree, dict, int]:
    """Restores a step onto `shardings`.

    Args:
      abstract_state: the boxed state's shapes (`jax.eval_shape(step.init, ...)`).
      shardings: a tree of shardings for the unboxed state (`state_shardings`), or
        None for default placement.
      step: which step; None means the latest good one, falling back over corrupt
        steps with a warning (each moved aside to `<directory>.corrupt/`).

    Returns:
      (state with boxes, this process's data iterator state dict, step).

    Raises:
      FileNotFoundError: no step (or no good step) to restore.
      CorruptCheckpointError: an explicitly requested `step` is corrupt.
    """
    target = _restore_target(abstract_state, shardings)
    if step is not None:
      return self._restore_step(abstract_state, target, step)
    for candidate in reversed(self.all_steps()):
      try:
        return self._restore_step(abstract_state, target, candidate)
      except CorruptCheckpointError as e:
        moved = self._move_aside(candidate)
        warnings.warn(f"checkpoint step {candidate} is corrupt or incomplete ({e}); "
                      f"moved it to {moved} and trying the previous step",
                      RuntimeWarning, stacklevel=2)
    raise FileNotFoundError(f"no checkpoint to restore under {self.directory}")

  def _restore_step(self, abstract_state, target, step):
    if step not in self.all_steps():
      raise FileNotFoundError(f"no checkpoint step {step} under {self.directory}; "
                              f"steps: {self.all_steps()}")
    verify_integrity(self.step_dir(step))
    # Files are intact past this point, so a failure here (say a model whose shapes
    # changed) is the caller's to see, not a reason to set the step aside.
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    data_state = dict(restored["data"]).get(str(jax.process_index()), {})
    return _from_restored(abstract_state, restored["state"]), dict(data_state), step

  def _move_aside(self, step: int) -> str:
    dest_root = self.directory + ".corrupt"
    os.makedirs(dest_root, exist_ok=True)
    dest = os.path.join(dest_root, f"{step}-{int(time.time())}")
    if jax.process_index() == 0:
      shutil.move(self.step_dir(step), dest)
    self._manager.reload()
    logging.warning("moved corrupt checkpoint step %d to %s", step, dest)
    return dest

  def metrics(self, step: int) -> dict:
    """The metrics saved with `step` ({} when saved without an evaluation)."""
    meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(meta["meta"]["metrics"])

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

