"""Where `etjax demo`'s time goes: wall and CPU seconds per phase, compiles by function.

    python benchmarks/demo_profile.py [--gin_file gin/runs/demo.gin] [--workdir DIR]
                                      [--binding train.num_steps=60 ...]

Runs the demo (both training runs and the predictions) in a fresh workdir with timers
wrapped around its phases: building the job (synthetic data, tokenizer, pretrained
weights), encoding, the jitted init, each update (the first apart: it compiles),
evaluation, checkpoint saves, and prediction. XLA compilations are counted per jitted
function through jax.monitoring (tracing, lowering and backend compile apart). Process
CPU seconds are printed beside wall seconds because the CPU may be shared: the CPU
share of each phase is a fair ratio even when other jobs slow the wall clock.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import sys
import tempfile
import time

import jax

from etjax import main as etjax_main
from etjax.cli import job_commands
from etjax.data import pipeline
from etjax.train import checkpoints, trainer as trainer_lib

WALL, CPU, CALLS = collections.Counter(), collections.Counter(), collections.Counter()
COMPILES: dict = collections.defaultdict(lambda: collections.Counter())


def _timed(name, fn):
  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    w, c = time.perf_counter(), time.process_time()
    try:
      return fn(*args, **kwargs)
    finally:
      WALL[name] += time.perf_counter() - w
      CPU[name] += time.process_time() - c
      CALLS[name] += 1
  return wrapper


def _on_duration(event, duration, **kwargs):
  kind = {"/jax/core/compile/backend_compile_duration": "backend_compile",
          "/jax/core/compile/jaxpr_trace_duration": "trace",
          "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower"}.get(event)
  if kind:
    COMPILES[kwargs.get("fun_name", "?")][kind] += duration
    COMPILES[kwargs.get("fun_name", "?")][kind + "_n"] += 1


def _instrument():
  jax.monitoring.register_event_duration_secs_listener(_on_duration)
  job_commands._job = _timed("job assembly (data, tokenizer, weights)", job_commands._job)
  pipeline.encode_examples = _timed("encode_examples", pipeline.encode_examples)
  T = trainer_lib.Trainer
  T.init_state = _timed("init_state (jit init)", T.init_state)
  T.evaluate = _timed("evaluate", T.evaluate)
  T.predict = _timed("predict", T.predict)
  T.restore = _timed("restore", T.restore)
  checkpoints.Checkpointer.save = _timed("checkpoint save", checkpoints.Checkpointer.save)
  original_setup = T._setup

  def setup(self, example_batch):
    first = self._abstract is None
    original_setup(self, example_batch)
    if first:
      update = self._update
      state = {"n": 0}

      def timed_update(*args):
        # Blocks so each update's time is its own (the demo's real loop overlaps one).
        name = "update #1 (compile)" if state["n"] == 0 else "updates #2.."
        state["n"] += 1
        return _timed(name, lambda *a: jax.block_until_ready(update(*a)))(*args)
      self._update = timed_update
  T._setup = setup


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--gin_file", default="gin/runs/demo.gin")
  parser.add_argument("--workdir", default=None, help="default: a fresh temp dir")
  parser.add_argument("--binding", action="append", default=[],
                      help="extra gin binding, e.g. train.num_steps=60")
  args = parser.parse_args(argv)
  workdir = args.workdir or tempfile.mkdtemp(prefix="demo_profile_")
  _instrument()
  etjax_main.bind_gin([args.gin_file], [f"train.workdir = '{workdir}'",
                                       "train.progress = False", *args.binding])
  w, c = time.perf_counter(), time.process_time()
  _timed("demo total", job_commands.cmd_demo)()
  total_wall, total_cpu = time.perf_counter() - w, time.process_time() - c
  print(f"\nworkdir {workdir}; {os.cpu_count()} CPUs; load average "
        f"{os.getloadavg()[0]:.1f}")
  print(f"{'phase':44s} {'calls':>5s} {'wall s':>8s} {'cpu s':>8s} {'cpu %':>6s}")
  for name in sorted(WALL, key=lambda k: -CPU[k]):
    print(f"{name:44s} {CALLS[name]:5d} {WALL[name]:8.1f} {CPU[name]:8.1f} "
          f"{100 * CPU[name] / total_cpu:6.1f}")
  print(f"\n{'jitted function':44s} {'n':>3s} {'trace s':>8s} {'lower s':>8s} "
        f"{'compile s':>9s}")
  tot = collections.Counter()
  for fun, c in sorted(COMPILES.items(), key=lambda kv: -kv[1]["backend_compile"]):
    if c["backend_compile"] < 0.05:
      tot.update(c)
      continue
    print(f"{fun[:44]:44s} {c['backend_compile_n']:3d} {c['trace']:8.2f} "
          f"{c['lower']:8.2f} {c['backend_compile']:9.2f}")
  print(f"{'(others, < 0.05 s each)':44s} {tot['backend_compile_n']:3d} "
        f"{tot['trace']:8.2f} {tot['lower']:8.2f} {tot['backend_compile']:9.2f}")
  compile_s = sum(c["backend_compile"] + c["lower"] + c["trace"] for c in COMPILES.values())
  print(f"\ntotal wall {total_wall:.1f} s, cpu {total_cpu:.1f} s; tracing+lowering+"
        f"compiling {compile_s:.1f} s wall ({100 * compile_s / total_wall:.0f}% of wall)")


if __name__ == "__main__":
  sys.exit(main())
