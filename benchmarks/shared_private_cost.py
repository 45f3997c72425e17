"""Step time of SharedPrivate training: every private encoder on every row (the old
path) vs domain-blocked batches (each row through its own domain's private encoder).

    python benchmarks/shared_private_cost.py                 # K = 4 and 8, CPU
    python benchmarks/shared_private_cost.py --domains 4 --steps 10

Encoders are BERT-tiny-like (hidden 128, 2 layers, 2 heads, intermediate 512, random
init, dropout 0.1); the batch is 32 rows of 64 tokens, domain-blocked, so both paths
train on the same batches. The two paths' updates are timed in turns (old, blocked,
old, ...) so that they share the machine's load alike; the figure is the ratio of the
median update times of the same run. Expected from the pass counts: (1 + K) / 2
(shared + K private passes per row vs shared + 1), less the per-step overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import numpy as np

from etjax import algorithms
from etjax.algorithms import feature_based
from etjax.models.bert import Encoder
from etjax.models.config import EncoderConfig

CONFIG = EncoderConfig(vocab_size=1000, hidden_size=128, num_layers=2, num_heads=2,
                       intermediate_size=512, max_position_embeddings=128)


def _batch(num_domains: int, batch_size: int, length: int, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  return {"input_ids": rng.integers(1, CONFIG.vocab_size, (batch_size, length),
                                    dtype=np.int32),
          "attention_mask": np.ones((batch_size, length), np.int32),
          "token_type_ids": np.zeros((batch_size, length), np.int32),
          "labels": rng.integers(0, 2, batch_size, dtype=np.int32),
          "domain": np.repeat(np.arange(num_domains, dtype=np.int32),
                              batch_size // num_domains)}


def measure(num_domains: int, *, steps: int, batch_size: int, length: int) -> dict:
  """Median update seconds of both paths and their ratio (old / blocked)."""
  batch = _batch(num_domains, batch_size, length, seed=num_domains)
  updates, states = {}, {}
  for name, blocked in (("old", False), ("blocked", True)):
    tx = algorithms.make_optimizer("adamw", learning_rate=1e-4, total_steps=1000)
    step = feature_based.shared_private(lambda: Encoder(CONFIG), tx,
                                        num_domains=num_domains, domain_blocked=blocked)
    updates[name] = jax.jit(step.update)
    states[name] = step.init(jax.random.PRNGKey(0), batch)
    states[name], metrics = updates[name](states[name], batch)  # compile
    jax.block_until_ready(metrics)
  times = {name: [] for name in updates}
  for _ in range(steps):
    for name, update in updates.items():
      start = time.perf_counter()
      states[name], metrics = update(states[name], batch)
      jax.block_until_ready(metrics)
      times[name].append(time.perf_counter() - start)
  old, blocked = (statistics.median(times[n]) for n in ("old", "blocked"))
  return {"domains": num_domains, "batch_size": batch_size, "length": length,
          "steps": steps, "old_s": round(old, 4), "blocked_s": round(blocked, 4),
          "ratio_old_over_blocked": round(old / blocked, 2),
          "expected_pass_ratio": (1 + num_domains) / 2}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--domains", type=int, nargs="+", default=[4, 8])
  parser.add_argument("--steps", type=int, default=15)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--length", type=int, default=64)
  args = parser.parse_args()
  print(json.dumps({"loadavg_start": os.getloadavg(), "cpus": os.cpu_count()}))
  for k in args.domains:
    print(json.dumps(measure(k, steps=args.steps, batch_size=args.batch_size,
                             length=args.length)), flush=True)
  print(json.dumps({"loadavg_end": os.getloadavg()}))


if __name__ == "__main__":
  main()
