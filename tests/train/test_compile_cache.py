"""The persistent compilation cache: a second process running the same job compiles
none of the trainer's programs (they load from disk) and computes identical results;
so does a run with the cache off."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from etjax.train import compile_cache

HERE = os.path.dirname(os.path.abspath(__file__))

# One training job in a fresh process: 3 updates and an evaluation of the toy task on
# one device; prints the final parameters, the eval metrics and what was compiled.
JOB = r"""
import collections, json, sys
import jax
sys.path.insert(0, HERE)
import toy_task
from etjax.algorithms.step import unbox
from etjax.data import pipeline
from etjax.sharding.mesh import make_mesh
from etjax.train import compile_cache
from etjax.train.trainer import Trainer

from jax._src import compiler
from jax._src.lib.mlir import ir

# Counts real XLA compilations by module name (a cache hit does not reach XLA).
compiled, events = collections.Counter(), collections.Counter()
xla_compile = compiler.backend_compile_and_load
def counting_compile(backend, module, *args, **kwargs):
  compiled.update([ir.StringAttr(module.operation.attributes["sym_name"]).value])
  return xla_compile(backend, module, *args, **kwargs)
compiler.backend_compile_and_load = counting_compile
jax.monitoring.register_event_listener(lambda e, **kw: events.update([e]))
if CACHE:
  compile_cache.enable(CACHE, min_compile_s=0)  # the toy programs compile fast
trainer = Trainer(toy_task.make_train_step(total_steps=10), workdir=WORKDIR,
                  num_steps=3, progress=False, log_every=1,
                  compilation_cache=CACHE or None,
                  mesh=make_mesh({"data": 1}, devices=jax.devices()[:1]))
data = toy_task.make_examples(24, seed=0)
result = trainer.fit(pipeline.train_iterator(data, 8, seed=1),
                     pipeline.eval_batches(data, 8))
print(json.dumps({
    "params": [jax.device_get(x).tolist() for x in jax.tree.leaves(unbox(result.state.params))],
    "eval": result.eval_metrics, "compiled": dict(compiled),
    "hits": events["/jax/compilation_cache/cache_hits"],
    "cache_dir": jax.config.jax_compilation_cache_dir}))
"""


def _run(tmp_path, name, cache):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop(compile_cache.ENV, None)
  code = (f"HERE = {HERE!r}; WORKDIR = {str(tmp_path / name)!r}; "
          f"CACHE = {cache!r}\n" + JOB)
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_warm_cache_compiles_nothing_and_changes_nothing(tmp_path):
  cache = str(tmp_path / "cache")
  cold = _run(tmp_path, "cold", cache)
  assert cold["cache_dir"] == cache
  assert cold["compiled"].get("jit_update") and cold["compiled"].get("jit_init")
  assert os.listdir(cache)  # the executables were written
  warm = _run(tmp_path, "warm", cache)
  # The trainer's programs (init, update, predict) all came from the cache.
  trainer_programs = [f for f in cold["compiled"] if f in ("jit_init", "jit_update")
                      or "predict" in f]
  assert len(trainer_programs) >= 3
  assert not any(warm["compiled"].get(f) for f in trainer_programs), warm["compiled"]
  assert warm["hits"] >= cold["hits"] + len(trainer_programs)
  off = _run(tmp_path, "off", None)
  assert off["cache_dir"] is None and off["hits"] == 0
  for other in (warm, off):
    for a, b in zip(cold["params"], other["params"]):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert other["eval"] == cold["eval"]


def test_enable_resolves_directories(tmp_path, monkeypatch):
  monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "from_env"))
  assert compile_cache.default_dir() == str(tmp_path / "from_env")
  monkeypatch.setenv(compile_cache.ENV, "none")
  assert compile_cache.default_dir() is None
  monkeypatch.delenv(compile_cache.ENV)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert compile_cache.default_dir() == str(tmp_path / "xdg" / "etjax" / "jax-cache")
  blocker = tmp_path / "file"
  blocker.write_text("")
  with pytest.raises(ValueError, match="compilation cache directory"):
    compile_cache.enable(str(blocker / "sub"))
