"""Training and inference throughput: etjax against transformers (PyTorch), same run.

    python benchmarks/train_throughput.py [--models bert-base,minilm] [--steps 6]

For each model (bert-base; a MiniLM-sized BERT: 384 hidden, 6 layers, 12 heads) at
sequence length 128 and batch 16, on the CPU: training samples/s (AdamW step with
gradient clipping, dropout on) and inference samples/s (forward, no gradients),
compile time reported apart, in two precisions on both sides:
  - float32: etjax with float32 compute; transformers as it runs by default.
  - bfloat16: etjax with bfloat16 compute (float32 parameters, optimizer state and
    accumulation); transformers under torch.autocast(bfloat16).
etjax unrolls its layer scan (scan_unroll = num_layers). Both frameworks start from
the same kind of random weights. The last line is machine-readable:
`train_ratio=R1 infer_ratio=R2`, etjax samples/s over transformers' for bert-base in
float32 on both sides (the precision the issue's reference figures were taken in);
the line before it gives the bfloat16 ratios and etjax-bfloat16 over
transformers-float32.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

import etjax.algorithms as algorithms
import etjax.models as models

BATCH, LENGTH = 16, 128
DTYPES = ("float32", "bfloat16")
SIZES = {"bert-base": dict(hidden_size=768, num_layers=12, num_heads=12,
                           intermediate_size=3072),
         "minilm": dict(hidden_size=384, num_layers=6, num_heads=12,
                        intermediate_size=1536)}


def _batch(seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {"input_ids": rng.integers(1000, 30000, (BATCH, LENGTH)).astype(np.int32),
          "attention_mask": np.ones((BATCH, LENGTH), np.int32),
          "token_type_ids": np.zeros((BATCH, LENGTH), np.int32),
          "labels": rng.integers(0, 2, BATCH).astype(np.int32),
          "weight": np.ones(BATCH, np.float32)}


def _timed(fn, steps: int) -> float:
  """Seconds per call of fn() over `steps` calls (after the caller's warm-up)."""
  start = time.perf_counter()
  for _ in range(steps):
    fn()
  return (time.perf_counter() - start) / steps


def bench_etjax(name: str, steps: int, dtype: str) -> dict:
  size = SIZES[name]
  config = models.get_config("bert-base", **size, dtype=dtype,
                             scan_unroll=size["num_layers"])
  model = models.SequenceClassifier(models.module_for(config), num_labels=2)
  tx = algorithms.make_optimizer("adamw", learning_rate=1e-5, total_steps=1000)
  step = algorithms.finetune(model, tx)
  batch = jax.device_put(_batch())
  state = jax.jit(step.init)(jax.random.PRNGKey(0), batch)
  update = jax.jit(step.update, donate_argnums=0)
  predict = jax.jit(lambda s, b: step.predict(s, b)["logits"])

  t0 = time.perf_counter()
  state, metrics = update(state, batch)
  jax.block_until_ready(metrics)
  compile_train = time.perf_counter() - t0
  t0 = time.perf_counter()
  jax.block_until_ready(predict(state, batch))
  compile_infer = time.perf_counter() - t0

  holder = [state]
  def train_once():
    holder[0], m = update(holder[0], batch)
    jax.block_until_ready(m)
  train_once()
  train_s = _timed(train_once, steps)
  infer_s = _timed(lambda: jax.block_until_ready(predict(holder[0], batch)), steps)
  return {"train": BATCH / train_s, "infer": BATCH / infer_s,
          "compile_train_s": compile_train, "compile_infer_s": compile_infer}


def bench_transformers(name: str, steps: int, dtype: str) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  size = SIZES[name]
  config = transformers.BertConfig(
      hidden_size=size["hidden_size"], num_hidden_layers=size["num_layers"],
      num_attention_heads=size["num_heads"], intermediate_size=size["intermediate_size"],
      num_labels=2)
  model = transformers.BertForSequenceClassification(config)
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
  batch = {k: torch.tensor(v, dtype=torch.long) for k, v in _batch().items()
           if k != "weight"}

  autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16,
                                    enabled=dtype == "bfloat16")

  def train_once():
    model.train()
    with autocast():
      out = model(**batch)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad()

  def infer_once():
    model.eval()
    with torch.no_grad(), autocast():
      model(**{k: v for k, v in batch.items() if k != "labels"})

  train_once()
  infer_once()
  return {"train": BATCH / _timed(train_once, steps),
          "infer": BATCH / _timed(infer_once, steps)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="bert-base,minilm")
  parser.add_argument("--steps", type=int, default=6)
  args = parser.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs; "
        f"batch {BATCH}, length {LENGTH}")
  print("| model | precision | framework | train samples/s | infer samples/s | "
        "compile (train/infer) |")
  print("|---|---|---|---|---|---|")
  results = {}
  for name in args.models.split(","):
    for dtype in DTYPES:
      ours = bench_etjax(name, args.steps, dtype)
      theirs = bench_transformers(name, args.steps, dtype)
      results[name, dtype] = ours, theirs
      print(f"| {name} | {dtype} | etjax | {ours['train']:.2f} | {ours['infer']:.2f} | "
            f"{ours['compile_train_s']:.1f} s / {ours['compile_infer_s']:.1f} s |")
      print(f"| {name} | {dtype} | transformers | {theirs['train']:.2f} | "
            f"{theirs['infer']:.2f} | - |")
      print(f"| {name} | {dtype} | ratio | {ours['train'] / theirs['train']:.2f}x | "
            f"{ours['infer'] / theirs['infer']:.2f}x | |", flush=True)
  key = "bert-base" if ("bert-base", "float32") in results else name
  ratio = lambda a, b, kind: a[kind] / b[kind]
  (ours32, theirs32), (ours16, theirs16) = results[key, "float32"], results[key, "bfloat16"]
  print(f"bf16_train_ratio={ratio(ours16, theirs16, 'train'):.3f} "
        f"bf16_infer_ratio={ratio(ours16, theirs16, 'infer'):.3f} "
        f"bf16_vs_fp32_train_ratio={ratio(ours16, theirs32, 'train'):.3f} "
        f"bf16_vs_fp32_infer_ratio={ratio(ours16, theirs32, 'infer'):.3f}")
  print(f"train_ratio={ratio(ours32, theirs32, 'train'):.3f} "
        f"infer_ratio={ratio(ours32, theirs32, 'infer'):.3f}")


if __name__ == "__main__":
  main()
