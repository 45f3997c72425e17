"""The Trainer on in-memory data: what experiments, selection loops and tests call.

`fit_arrays` trains a TrainStep on encoded data (a dict of arrays [N, ...], or
{stream: dict of arrays} for a method that reads several named streams) with the one
`Trainer`, so every run of etjax, from `etjax train` to a table cell of a paper
experiment or one trial of Ruder & Plank's search, goes through the same loop:

    trainer, result = fit_arrays(step, encoded_train, num_steps=300, batch_size=32,
                                 seed=0)
    accuracy = trainer.evaluate(result.state, eval_batches_of(encoded_test))['accuracy']

Without a workdir the run lives in a temporary directory that is removed afterwards
(the final state is returned in memory). The default mesh is one local device: these
runs are small, and a mesh over 8 fake CPU devices would only add collectives.
"""

from __future__ import annotations

import contextlib
import tempfile
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np

from etjax.algorithms.step import TrainState, TrainStep
from etjax.data import pipeline as data_lib
from etjax.data import streams as streams_lib
from etjax.sharding import mesh as mesh_lib
from etjax.train.trainer import FitResult, Trainer

Arrays = Mapping[str, np.ndarray]


def one_device_mesh():
  """A mesh of the first local device (every axis 1)."""
  return mesh_lib.make_mesh({"data": 1}, devices=jax.local_devices()[:1])


def _is_streams(data: Mapping) -> bool:
  return bool(data) and all(isinstance(v, Mapping) for v in data.values())


def train_batches(data: Mapping, batch_size: int | Mapping[str, int], seed: int):
  """The shuffled, endless, resumable batches of `data`.

  Args:
    data: encoded data (dict of arrays [N, ...]) or {stream: encoded data}.
    batch_size: rows per batch, or {stream: rows} for streams (an int serves all).
    seed: the shuffling seed.
  """
  if _is_streams(data):
    sizes = (dict(batch_size) if isinstance(batch_size, Mapping)
             else {name: batch_size for name in data})
    return streams_lib.named_streams(data, sizes, seed=seed, process_index=0,
                                     process_count=1)
  if isinstance(batch_size, Mapping):
    raise ValueError("a dict of batch sizes needs data of named streams")
  return data_lib.train_iterator(data, batch_size, seed=seed, process_count=1,
                                 process_index=0)


def eval_batches(data: Arrays, batch_size: int = 200):
  """A re-iterable of one ordered pass over `data` (the last batch padded, weight 0)."""
  return lambda: data_lib.eval_batches(data, batch_size, process_count=1,
                                       process_index=0)


def fit_arrays(step: TrainStep, data: Mapping, *, num_steps: int,
               batch_size: int | Mapping[str, int], seed: int,
               workdir: Optional[str] = None, eval_data: Any = None,
               start_from: Optional[Callable[[TrainState], TrainState]] = None,
               **trainer_kwargs) -> tuple[Trainer, FitResult]:
  """Trains `step` on in-memory data with the Trainer.

  Args:
    step: the TrainStep.
    data: encoded data, or {stream: encoded data} for a multi-stream method.
    num_steps: updates.
    batch_size: rows per update (per stream: an int or {stream: rows}).
    seed: the init rng's and the shuffling's seed.
    workdir: where checkpoints and metrics go; None: a temporary directory, removed
      when the run ends.
    eval_data: evaluation batches (see `Trainer.fit`), e.g. `eval_batches(test)`.
    start_from: fresh state -> the state to start from (see `Trainer.fit`).
    **trainer_kwargs: other Trainer options (mesh defaults to one device; progress
      bar and TensorBoard off).

  Returns:
    (the Trainer, for `evaluate` / `predict` with the same compiled functions;
     its FitResult).
  """
  trainer_kwargs.setdefault("progress", False)
  trainer_kwargs.setdefault("tensorboard", False)
  if trainer_kwargs.get("mesh") is None:
    trainer_kwargs["mesh"] = one_device_mesh()
  with contextlib.ExitStack() as stack:
    if workdir is None:
      workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="etjax-fit-"))
    trainer = Trainer(step, workdir=workdir, num_steps=num_steps, seed=seed,
                      **trainer_kwargs)
    result = trainer.fit(train_batches(data, batch_size, seed), eval_data,
                         start_from=start_from)
  return trainer, result


def accuracy(trainer: Trainer, state: TrainState, data: Arrays) -> float:
  """Weighted accuracy of `state` on encoded data, in [0, 1]."""
  return float(trainer.evaluate(state, eval_batches(data))["accuracy"])


def logits(trainer: Trainer, state: TrainState, data: Arrays) -> np.ndarray:
  """float64 [N, C] logits of `state` on encoded data's rows (in order)."""
  return np.asarray(trainer.predict(state, eval_batches(data))["logits"], np.float64)
