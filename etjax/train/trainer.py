"""The trainer: runs any TrainStep on a mesh, evaluates, checkpoints and resumes.

It knows nothing about algorithms. From `jax.eval_shape(train_step.init, ...)` it
derives the state's shardings through a rules preset, jits `init`, `update` (donating
the state) and `predict` once each with explicit shardings, and traces them under
`jax.set_mesh(mesh)` and `flax.linen.logical_axis_rules(rules)` so the models'
activation constraints resolve.

    trainer = Trainer(step, workdir='/tmp/run', num_steps=1000, mesh='data=8',
                      rules='dp', eval_every=200, checkpoint_every=200,
                      keep_best_metric='accuracy')
    result = trainer.fit(train_iter, eval_data)    # resumes if workdir has checkpoints

Workdir layout: checkpoints/<step>/ (orbax), metrics.jsonl, tb/ (TensorBoard events),
config.gin (when the caller gives one through `write_config`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import warnings
import weakref
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from etjax.algorithms import accumulate as accumulate_lib
from etjax.algorithms.step import TrainState, TrainStep
from etjax.data import prefetch as prefetch_lib
from etjax.models.pipeline import bubble_fraction
from etjax.sharding import mesh as mesh_lib
from etjax.sharding import partitioning, rules as rules_lib
from etjax.train import checkpoints as ckpt_lib
from etjax.train import compile_cache
from etjax.train import logging as log_lib
from etjax.train import metrics as metrics_lib

Batch = Mapping[str, np.ndarray]


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or infinite loss; `step` says where."""

  def __init__(self, step: int, loss: Optional[float], last_checkpoint: Optional[int]):
    # loss None: the loss was finite but the state about to be saved was not.
    self.step, self.loss, self.last_checkpoint = step, loss, last_checkpoint
    kept = ("no checkpoint was saved before it" if last_checkpoint is None else
            f"the last good checkpoint, step {last_checkpoint}, is kept")
    what = (f"non-finite loss {loss}" if loss is not None else
            "non-finite parameters or optimizer state")
    super().__init__(f"{what} at step {step}; training stopped (the learning rate may "
                     f"be too high) and {kept}")


class FitResult(NamedTuple):
  """What `Trainer.fit` returns.

  Attributes:
    state: the final TrainState (on the mesh).
    step: the number of updates applied.
    train_metrics: the means of the update metrics over the last logging window.
    eval_metrics: the last evaluation's metrics ({} if none ran).
  """
  state: TrainState
  step: int
  train_metrics: dict
  eval_metrics: dict


def _as_mesh(mesh: Mesh | str | Mapping[str, int] | None) -> Mesh:
  if isinstance(mesh, Mesh):
    return mesh
  if isinstance(mesh, str):
    mesh = mesh_lib.parse_mesh_spec(mesh)
  return mesh_lib.make_mesh(mesh)


def _is_array_field(x) -> bool:
  return np.asarray(x).dtype.kind not in "OUSV"


class Trainer:
  """Fits, evaluates and predicts with one TrainStep under one mesh and rules table.

  Args:
    train_step: the TrainStep (init, update, predict).
    workdir: directory for checkpoints, metrics.jsonl, tb/ and config.gin.
    num_steps: the total number of updates of the run (a resumed run counts the
      restored steps).
    mesh: a Mesh, a spec such as 'data=2,model=4', axis sizes, or None (every device on
      'data').
    rules: a rules preset name ('dp', 'fsdp', 'tp', '2d', '3d') or a rules table.
    seed: seeds the rng given to `train_step.init`.
    eval_every: evaluate every this many steps (0: only at the end, when eval data is
      given).
    checkpoint_every: save every this many steps (0: only at the end).
    keep_last: how many recent checkpoints to keep.
    keep_best_metric: an eval metric ('accuracy', 'macro_f1', 'auc') whose best
      checkpoint is kept as well; every evaluation then saves a checkpoint.
    best_mode: 'max' or 'min' for `keep_best_metric`.
    log_every: write train metrics every this many steps.
    progress: show a tqdm progress bar.
    tensorboard: write TensorBoard event files besides metrics.jsonl.
    pipeline: (stages, microbatches) of the model's pipeline over the `stage` axis;
      with stages > 1 the run reports the GPipe bubble fraction (S-1)/(M+S-1) (the
      trainer cannot see inside the model, so the caller says).
    grad_accum_steps: accumulate each update's gradient over this many microbatches
      of the batch (exact for weighted-mean losses; etjax.algorithms.accumulate).
    grad_comm_dtype: all-reduce the gradient over the batch axes in this dtype (e.g.
      'bfloat16'; etjax.sharding.grad_comm), None for the partitioner's own reduction.
      Both need a TrainStep made by `gradient_step` (grad and apply).
    compilation_cache: jax's persistent compilation cache directory ('auto':
      $ETJAX_COMPILATION_CACHE, else ~/.cache/etjax/jax-cache; None: leave jax's
      setting alone); a second run of the same job loads its executables instead of
      compiling them (etjax.train.compile_cache).
    prefetch: batches prepared and put on the devices ahead on a background thread
      (0: none); the saved data position stays that of the last batch trained on.
  """

  def __init__(self, train_step: TrainStep, *, workdir: str, num_steps: int,
               mesh: Mesh | str | Mapping[str, int] | None = None,
               rules: str | Sequence = "dp", seed: int = 0, eval_every: int = 0,
               checkpoint_every: int = 0, keep_last: int = 2,
               keep_best_metric: Optional[str] = None, best_mode: str = "max",
               log_every: int = 50, progress: bool = True, tensorboard: bool = True,
               pipeline: tuple[int, int] = (1, 1), grad_accum_steps: int = 1,
               grad_comm_dtype: Optional[str] = None,
               compilation_cache: Optional[str] = "auto", prefetch: int = 2):
    for name, value in (("num_steps", num_steps), ("eval_every", eval_every),
                        ("checkpoint_every", checkpoint_every), ("log_every", log_every)):
      if value < 0 or (name in ("num_steps", "log_every") and value == 0):
        raise ValueError(f"Trainer: {name} must be positive, got {value}")
    if prefetch < 0:
      raise ValueError(f"Trainer: prefetch must be >= 0, got {prefetch}")
    self.compilation_cache = compile_cache.enable(compilation_cache)
    self.prefetch = prefetch
    self.train_step = train_step
    self.workdir = os.path.abspath(workdir)
    self.num_steps, self.seed = num_steps, seed
    self.eval_every, self.checkpoint_every, self.log_every = (eval_every,
                                                              checkpoint_every, log_every)
    self.keep_best_metric, self.progress, self.tensorboard = (keep_best_metric, progress,
                                                              tensorboard)
    self.mesh = _as_mesh(mesh)
    self.train_step = accumulate_lib.with_gradient_options(
        train_step, accum_steps=grad_accum_steps, comm_dtype=grad_comm_dtype,
        mesh=self.mesh)
    self.pipeline = tuple(pipeline)
    self.rules = rules_lib.get_rules(rules)
    self.checkpointer = ckpt_lib.Checkpointer(
        os.path.join(self.workdir, "checkpoints"), keep_last=keep_last,
        best_metric=keep_best_metric, best_mode=best_mode)
    self._abstract = None

  # --- set-up -------------------------------------------------------------------------

  def _context(self) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(nn.logical_axis_rules(self.rules))
    return stack

  def _setup(self, example_batch: Batch) -> None:
    """Derives shardings from the abstract state and jits init/update/predict once."""
    if self._abstract is not None:
      return
    batch = self._host_batch(example_batch)
    rng = jax.random.key(self.seed)
    with self._context():
      self._abstract = jax.eval_shape(self.train_step.init, rng, batch)
      self.state_sharding = partitioning.state_shardings(self._abstract, self.mesh,
                                                         self.rules)
    self.batch_sharding = partitioning.batch_sharding(self.mesh, self.rules)
    # Each process feeds its share of the batch shards (the batch axes span processes).
    shards = math.prod(self.mesh.shape[a] for a in _axes(self.batch_sharding.spec[0]))
    self._batch_multiple = max(1, shards // jax.process_count())
    replicated = NamedSharding(self.mesh, PartitionSpec())
    self._init = jax.jit(self.train_step.init, out_shardings=self.state_sharding)
    self._update = jax.jit(self.train_step.update,
                           in_shardings=(self.state_sharding, self.batch_sharding),
                           out_shardings=(self.state_sharding, replicated),
                           donate_argnums=0)
    self._predict = None
    if self.train_step.predict is not None:
      self._predict = jax.jit(_with_targets(self.train_step.predict),
                              in_shardings=(self.state_sharding, self.batch_sharding),
                              out_shardings=replicated)

  def _host_batch(self, batch: Batch) -> dict:
    # Text columns (kept by some pipelines for `predict` output) stay on the host. A
    # batch may nest named streams ({'source': {...}, 'target': {...}}), each sharded
    # over 'batch' like a flat one.
    return {k: self._host_batch(v) if isinstance(v, Mapping) else np.asarray(v)
            for k, v in batch.items() if isinstance(v, Mapping) or _is_array_field(v)}

  def _device_batch(self, batch: Batch) -> dict:
    batch = self._host_batch(batch)
    for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]:
      size = leaf.shape[0]
      if size % self._batch_multiple:
        stream = f" of batch{jax.tree_util.keystr(path[:-1])}" if len(path) > 1 else ""
        raise ValueError(f"batch size {size}{stream} (per process) is not divisible by "
                         f"the {self._batch_multiple} batch shards of mesh "
                         f"{dict(self.mesh.shape)} under the 'batch' rule")
    return jax.tree.map(
        lambda v: jax.make_array_from_process_local_data(self.batch_sharding, v), batch)

  def init_state(self, example_batch: Batch) -> TrainState:
    """A fresh TrainState from `train_step.init`, laid out on the mesh."""
    self._setup(example_batch)
    with self._context():
      return self._init(jax.random.key(self.seed), self._host_batch(example_batch))

  def restore(self, example_batch: Batch, step: Optional[int] = None,
              best: bool = False) -> TrainState:
    """The state of a saved step (default: the latest good one; `best`: the best by
    `keep_best_metric`), on the mesh. Raises FileNotFoundError without checkpoints."""
    self._setup(example_batch)
    if best:
      step = self.checkpointer.best_step()
      if step is None:
        raise FileNotFoundError(f"no checkpoint with metric {self.keep_best_metric!r} "
                                f"under {self.checkpointer.directory}")
    state, _, _ = self.checkpointer.restore(self._abstract, self.state_sharding, step)
    return state

  def check_resumable(self, example_batch: Batch) -> None:
    """Raises ValueError naming the first difference when the workdir's latest
    checkpoint does not fit this TrainStep's state (reads metadata only)."""
    self._setup(example_batch)
    self.checkpointer.check_compatible(self._abstract)

  def _check_finite(self, state: TrainState, step: int, last_saved: Optional[int]):
    """Only a state whose parameters and optimizer state are finite is saved: the loss
    check sees the weights before an update, a save stores them after it."""
    with self._context():
      finite = bool(_all_finite(state))
    if not finite:
      raise NonFiniteLossError(step, None, last_saved)

  def write_config(self, text: str, name: str = "config.gin") -> str:
    """Writes the run's resolved config beside the checkpoints (`write_config`)."""
    return write_config(self.workdir, text, name)

  # --- training -----------------------------------------------------------------------

  def _start(self, train_iter, first_batch: Batch, start_from=None
             ) -> tuple[TrainState, int, bool]:
    """(state, step, resumed): the latest good checkpoint, or a fresh state (passed
    through `start_from` when given)."""
    if self.checkpointer.all_steps():
      try:
        state, data_state, step = self.checkpointer.restore(self._abstract,
                                                            self.state_sharding)
      except FileNotFoundError:
        warnings.warn(f"no usable checkpoint under {self.checkpointer.directory}; "
                      "starting from step 0", RuntimeWarning, stacklevel=3)
      else:
        if hasattr(train_iter, "set_state") and data_state:
          train_iter.set_state(data_state)
        else:
          warnings.warn(f"resuming at step {step} without a data position: the train "
                        "iterator has no set_state or none was saved", RuntimeWarning,
                        stacklevel=3)
        logging.info("resumed from step %d (%s)", step, self.checkpointer.directory)
        self.resumed_from = step
        return state, step, True
    state = self.init_state(first_batch)
    if start_from is not None:
      # e.g. a recipe's next stage starts from the previous stage's parameters.
      state = jax.device_put(start_from(state), self.state_sharding)
    return state, 0, False

  def fit(self, train_iter: Iterable[Batch], eval_data: Any = None,
          start_from: Optional[Callable[[TrainState], TrainState]] = None) -> FitResult:
    """Trains to `num_steps`, resuming from the workdir's latest good checkpoint.

    Args:
      train_iter: an iterator of batch dicts; with `get_state`/`set_state` its position
        is checkpointed and restored (exact resumption).
      eval_data: batches for `evaluate` (re-iterable, or a callable returning an
        iterator), or None.
      start_from: fresh state -> the state to start from, when the workdir has no
        checkpoint (a recipe stage's parameters from the stage before); its structure
        must be the fresh state's.

    Returns:
      A FitResult.

    Raises:
      NonFiniteLossError: a NaN/inf loss; the last good checkpoint stays on disk.
    """
    train_iter = iter(train_iter)
    first = next(train_iter)
    self._setup(first)
    state, step, resumed = self._start(train_iter, first, start_from)
    writer = log_lib.MetricsWriter(self.workdir, tensorboard=self.tensorboard)
    if self.pipeline[0] > 1:
      bubble = bubble_fraction(*self.pipeline)
      writer.write(step, "pipeline", {"stages": self.pipeline[0],
                                      "microbatches": self.pipeline[1],
                                      "bubble_fraction": bubble})
      logging.info("pipeline %d stages x %d microbatches: bubble fraction %.3f",
                   *self.pipeline, bubble)
    bar = log_lib.Progress(self.num_steps, step, enabled=self.progress)
    window = log_lib.ThroughputWindow()
    eval_metrics: dict = {}
    train_metrics: dict = {}
    # (step, metrics, examples) of updates not yet fetched: the host waits for the
    # devices only at logging, evaluation and saving, so updates queue up back to back.
    pending: list = []
    last_saved = step if resumed else None
    # Batches go to the devices `prefetch` steps ahead; `batches.get_state()` is the
    # position after the last batch trained on (not the thread's, which runs ahead).
    batches = prefetch_lib.Prefetcher(train_iter, self._device_batch, self.prefetch)
    position = lambda: batches.get_state() or {}
    try:
      while step < self.num_steps:
        if not resumed and step == 0:
          device_batch = self._device_batch(first)
        else:
          try:
            device_batch = next(batches)
          except StopIteration:
            warnings.warn(f"train data ended at step {step} before num_steps="
                          f"{self.num_steps}", RuntimeWarning, stacklevel=2)
            break
        with self._context():
          state, metrics = self._update(state, device_batch)
        step += 1
        pending.append((step, metrics, _global_size(device_batch)))
        evaluate_now = eval_data is not None and (
            step == self.num_steps or (self.eval_every and step % self.eval_every == 0))
        save_now = (step == self.num_steps or evaluate_now and self.keep_best_metric or
                    (self.checkpoint_every and step % self.checkpoint_every == 0))
        # Sync on the first update (compile time stays out of the throughput) and
        # wherever the state itself is needed.
        if not (window.started is None or step % self.log_every == 0 or evaluate_now or
                save_now):
          continue
        for update in pending:
          window.add(*update, bar)
        pending = []
        if step % self.log_every == 0 or step == self.num_steps:
          train_metrics = window.flush(writer, step, bar)
        paused = time.perf_counter()
        if evaluate_now:
          eval_metrics = self.evaluate(state, eval_data)
          writer.write(step, "eval", eval_metrics)
        if save_now:
          self._check_finite(state, step, last_saved)
          self.checkpointer.save(step, state, position(),
                                 eval_metrics if evaluate_now else None)
          last_saved = step
        window.excluded += time.perf_counter() - paused
      for update in pending:
        window.add(*update, bar)
      if last_saved != step:
        self._check_finite(state, step, last_saved)
        self.checkpointer.save(step, state, position())
    except log_lib.NonFiniteValue as e:
      raise NonFiniteLossError(e.step, e.loss, last_saved) from None
    finally:
      batches.close()
      bar.close()
      writer.close()
    return FitResult(state, step, train_metrics or window.means(), eval_metrics)

  # --- evaluation and prediction ------------------------------------------------------

  def _run_predict(self, state: TrainState, data: Any) -> dict[str, np.ndarray]:
    """Runs `predict` over every batch. Returns its outputs plus the batches' 'weight'
    (and 'labels' when present), each [N, ...] over ALL processes' rows, in global
    batch order; padding rows (the trainer's, and any of the data) have weight 0."""
    if self._predict is None:
      raise ValueError("this TrainStep has no predict function")
    outputs: dict[str, list] = {}
    padded_size = None
    for batch in (data() if callable(data) else data):
      host = self._host_batch(batch)
      size = next(iter(host.values())).shape[0]
      if "weight" not in host:
        host["weight"] = np.ones(size, np.float32)
      if padded_size is None or size > padded_size:
        padded_size = -(-size // self._batch_multiple) * self._batch_multiple
      # Pad with copies of the first row (weight 0): real inputs keep every model's
      # arithmetic finite, and one shape means one compilation.
      padded = {k: np.concatenate([v, np.repeat(v[:1], padded_size - size, 0)])
                for k, v in host.items()}
      padded["weight"][size:] = 0
      with self._context():
        out = jax.device_get(self._predict(state, self._device_batch(padded)))
      for k, v in out.items():
        outputs.setdefault(k, []).append(np.asarray(v))
    if not outputs:
      raise ValueError("the evaluation/prediction data yielded no batches (an exhausted "
                       "iterator? pass a re-iterable or a callable returning one)")
    return {k: np.concatenate(v) for k, v in outputs.items()}

  def evaluate(self, state: TrainState, eval_data: Any) -> dict[str, float]:
    """{'accuracy', 'macro_f1', 'auc', 'num_examples'} of `state` over `eval_data`
    (rows of weight 0 ignored; all processes' rows count)."""
    outputs = self._run_predict(state, eval_data)
    if "logits" not in outputs or _LABELS not in outputs:
      raise ValueError("evaluate needs 'logits' from predict and 'labels' in the batches")
    return metrics_lib.classification_metrics(outputs["logits"], outputs[_LABELS],
                                              outputs[_WEIGHT])

  def predict(self, state: TrainState, data: Any) -> dict[str, np.ndarray]:
    """Every output of `predict` as [N, ...] numpy arrays over the rows of `data` with
    weight > 0 (a pipeline's padding dropped), plus 'predictions' [N] (argmax of
    'logits') and 'probabilities' [N, C] (softmax) when logits are present."""
    outputs = self._run_predict(state, data)
    keep = outputs.pop(_WEIGHT) > 0
    outputs.pop(_LABELS, None)
    result = {k: v[keep] for k, v in outputs.items()}
    if "logits" in result:
      logits = result["logits"].astype(np.float64)
      result["predictions"] = np.argmax(logits, axis=-1)
      exp = np.exp(logits - logits.max(-1, keepdims=True))
      result["probabilities"] = (exp / exp.sum(-1, keepdims=True)).astype(np.float32)
    return result


def write_config(workdir: str, text: str, name: str = "config.gin") -> str:
  """Writes a run's resolved config into `workdir`; an existing different one is
  renamed to '<name>.<n>' (with a warning), never overwritten. Returns the path."""
  path = os.path.join(workdir, name)
  if jax.process_index() != 0:
    return path
  os.makedirs(workdir, exist_ok=True)
  if os.path.exists(path):
    with open(path) as f:
      if f.read() == text:
        return path
    n = 1
    while os.path.exists(f"{path}.{n}"):
      n += 1
    os.rename(path, f"{path}.{n}")
    warnings.warn(f"{path} differed from this run's config; the old one is now "
                  f"{path}.{n}", RuntimeWarning, stacklevel=3)
  with open(path, "w") as f:
    f.write(text)
  return path


# Batch columns returned beside the predictions, gathered like them across processes.
_WEIGHT, _LABELS = "_batch_weight", "_batch_labels"


# predict -> its `_predict_with_targets` wrapper, one per function: jax caches compiled
# programs by the function jitted, so every Trainer of one TrainStep (a paper table's
# runs, a search's trials) reuses one compilation. The wrapper refers to `predict`
# weakly, so the entry goes with the function.
_WITH_TARGETS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _with_targets(predict: Callable) -> Callable:
  wrapper = _WITH_TARGETS.get(predict)
  if wrapper is None:
    ref = weakref.ref(predict)

    def predict_with_targets(state, batch):  # its name names the compiled program
      return _predict_with_targets(ref(), state, batch)
    wrapper = _WITH_TARGETS[predict] = predict_with_targets
  return wrapper


def _predict_with_targets(predict, state, batch):
  out = dict(predict(state, batch))
  out[_WEIGHT] = batch["weight"]
  if "labels" in batch:
    out[_LABELS] = batch["labels"]
  return out


@jax.jit
def _all_finite(state) -> jax.Array:
  leaves = [x for x in jax.tree.leaves(nn.meta.unbox(state))
            if jax.numpy.issubdtype(x.dtype, jax.numpy.inexact)]
  return jax.numpy.all(jax.numpy.stack([jax.numpy.isfinite(x).all() for x in leaves]))


def _global_size(batch: Mapping[str, Any]) -> int:
  # Of the first stream for a batch of named streams.
  return int(jax.tree.leaves(batch)[0].shape[0])


def _axes(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, tuple) else (entry,)
