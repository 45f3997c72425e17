"""Every transfer method of `etjax train` on real text with a pretrained backbone.

all-MiniLM-L6-v2 on the Debian package descriptions (../shared/data/debian-descriptions),
task `use` (what a program is used for, 8 classes). Target: archive section `text`
(229 training, 28 dev, 83 test rows); sources: `net`, `utils` and `admin` (385 rows).
MetaDTL's cross-task source is the `network` task's training split (client/server).
Distillation students are all-MiniLM-L6-v2 cut to its first 3 layers; their teacher is
the `mixed` run of the same seed.

    python benchmarks/transfer_debian.py tune     # learning rate on dev (mixed, target_only)
    python benchmarks/transfer_debian.py run --seeds 0 1 2
    python benchmarks/transfer_debian.py report   # the markdown table of RESULTS.md

Each run is one `etjax train` command (printed before it starts, so any cell can be
re-run by hand); results are appended to benchmarks/transfer_debian.jsonl as they
finish, and runs already there are skipped, so the script resumes after a stop.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import math
import os
import pathlib
import shlex
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "debian-descriptions"
RESULTS = pathlib.Path(os.environ.get("ETJAX_TRANSFER_RESULTS",
                                      ROOT / "benchmarks" / "transfer_debian.jsonl"))
TARGET, SOURCES = "text", ("net", "utils", "admin")
LEARNING_RATES = (5e-5, 1e-4, 2e-4)
BASELINES = ("mixed", "finetune")

# Cheapest first, so a stopped run has the most cells. The settings below change a
# method's gin/algorithms defaults only where those assume a paper-scale run (hundreds
# of steps) that this one (3 epochs, 24-60 updates) never reaches.
METHODS = ("target_only", "source_only", "mixed", "finetune", "fs", "kd", "distilbert",
           "pkd", "tinybert", "metakd", "adabert", "sp", "sp_adv", "drss", "drss_adv",
           "metaft", "metadtl", "ruder_plank", "rtl", "mgtl")
METHOD_ARGS = {
    "sp_adv": {"grl_warmup_steps": 20},
    "drss_adv": {"grl_warmup_steps": 20},
    "ruder_plank": {"num_selected": 200, "num_trials": 4, "train_steps": 24},
}
DISTILLATION = ("kd", "pkd", "distilbert", "tinybert", "metakd", "adabert")


def write_files(directory: pathlib.Path) -> dict:
  """The TSV files of the split above (a user's own files); their paths by role."""
  directory.mkdir(parents=True, exist_ok=True)

  def read(task):
    with gzip.open(DATA / f"{task}.tsv.gz", "rt") as f:
      return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))

  def write(name, rows):
    path = directory / name
    with open(path, "w") as f:
      f.write("domain\tlabel\ttext\n")
      f.writelines(f"{r['domain']}\t{r['label']}\t{r['text']}\n" for r in rows)
    return str(path)

  use = read("use")
  return {
      "train": write("train.tsv", [r for r in use if r["split"] == "train"
                                   and r["domain"] in (TARGET, *SOURCES)]),
      "dev": write("dev.tsv", [r for r in use if r["split"] == "dev"
                               and r["domain"] == TARGET]),
      "test": write("test.tsv", [r for r in use if r["split"] == "test"
                                 and r["domain"] == TARGET]),
      "network": write("network_train.tsv",
                       [r for r in read("network") if r["split"] == "train"]),
  }


def _gin(name: str, value) -> str:
  return f"--gin.{name}={value!r}"


def command(method: str, seed: int, lr: float, files: dict, workdir: pathlib.Path,
            teacher: pathlib.Path) -> list[str]:
  """The `etjax train` command of one cell."""
  argv = [str(pathlib.Path(sys.executable).parent / "etjax"), "train",
          "--gin_file=gin/runs/transfer.gin",
          _gin("data.train_path", files["train"]), _gin("data.dev_path", files["dev"]),
          _gin("data.eval_path", files["test"]), _gin("data.target_domains", [TARGET]),
          _gin("transfer.method", method), _gin("train.workdir", str(workdir)),
          _gin("train.seed", seed), _gin("optimizer.learning_rate", lr),
          _gin("train.max_length", 64), "--gin.train.progress=False"]
  if method in METHOD_ARGS:
    argv.append(_gin("transfer.method_args", METHOD_ARGS[method]))
  if method in DISTILLATION:
    argv += [_gin("transfer.teacher", str(teacher)),
             _gin("classifier.overrides", {"num_layers": 3})]
  if method == "metadtl":
    argv.append(_gin("data.source_task_path", files["network"]))
  return argv


def _test_metrics(stdout: str) -> dict:
  line = [l for l in stdout.splitlines() if "accuracy=" in l][-1]
  return {k: float(v) for k, v in (kv.split("=") for kv in
                                   line.split(": ", 1)[1].replace(",", "").split())
          if k in ("accuracy", "macro_f1", "auc")}


def _dev_accuracy(workdir: pathlib.Path) -> float:
  """The dev accuracy of the run's last stage (its newest metrics file)."""
  newest = max(workdir.rglob("metrics.jsonl"), key=lambda p: p.stat().st_mtime)
  evals = [json.loads(l) for l in newest.read_text().splitlines()
           if '"split": "eval"' in l]
  return evals[-1]["accuracy"]


def _done() -> dict:
  if not RESULTS.exists():
    return {}
  rows = [json.loads(l) for l in RESULTS.read_text().splitlines() if l.strip()]
  return {(r["method"], r["seed"], r["learning_rate"]): r for r in rows}


def run_cell(method, seed, lr, files, root: pathlib.Path) -> dict:
  """Trains one cell (or returns its recorded result) and appends it to RESULTS."""
  done = _done()
  if (method, seed, lr) in done:
    return done[(method, seed, lr)]
  workdir = root / f"lr{lr:g}" / f"{method}_s{seed}"
  teacher = root / f"lr{lr:g}" / f"mixed_s{seed}"
  if method in DISTILLATION:
    run_cell("mixed", seed, lr, files, root)
  argv = command(method, seed, lr, files, workdir, teacher)
  print("$", " ".join(shlex.quote(a) for a in argv), flush=True)
  start = time.time()
  # This checkout's etjax, ahead of the virtualenv's editable install (so the script
  # can run from a fixed worktree while the main tree changes).
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                        check=False)
  wall = time.time() - start
  if proc.returncode != 0:
    print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
    raise SystemExit(f"{method} seed {seed} failed (exit {proc.returncode})")
  row = {"method": method, "seed": seed, "learning_rate": lr, "wall_s": round(wall, 1),
         "dev_accuracy": _dev_accuracy(workdir), **_test_metrics(proc.stdout)}
  with open(RESULTS, "a") as f:
    f.write(json.dumps(row) + "\n")
  print(json.dumps(row), flush=True)
  return row


def chosen_learning_rate() -> float:
  """The rate of the best mean dev accuracy of mixed and target_only (seed 0)."""
  done = _done()
  scores = {lr: statistics.mean(done[(m, 0, lr)]["dev_accuracy"]
                                for m in ("mixed", "target_only"))
            for lr in LEARNING_RATES
            if all((m, 0, lr) in done for m in ("mixed", "target_only"))}
  if len(scores) < len(LEARNING_RATES):
    raise SystemExit("run `tune` first: the learning rate is chosen on dev")
  return max(scores, key=scores.get)


def paired(gains: list[float]) -> tuple[float, float]:
  """Mean and standard error of paired differences."""
  mean = statistics.mean(gains)
  se = statistics.stdev(gains) / math.sqrt(len(gains)) if len(gains) > 1 else math.nan
  return mean, se


def report() -> str:
  """The RESULTS.md table: test accuracy / macro-F1 over seeds, the paired accuracy
  difference against the better of mixed and finetune (better by mean test accuracy,
  the harder baseline), and wall time per run."""
  lr = chosen_learning_rate()
  done = {(m, s): r for (m, s, l), r in _done().items() if l == lr}
  seeds = sorted({s for _, s in done})

  def mean_of(method, key):
    values = [done[(method, s)][key] for s in seeds if (method, s) in done]
    return statistics.mean(values) if values else math.nan

  base = max(BASELINES, key=lambda m: mean_of(m, "accuracy"))
  lines = [f"Learning rate {lr:g} (chosen on dev); baseline: `{base}`, the better of "
           f"{' and '.join(BASELINES)} by mean test accuracy.", "",
           "| method | seeds | dev accuracy | test accuracy | macro-F1 | vs `" + base +
           "` (paired, mean ± SE) | beats it (> 2 SE) | wall s / run |",
           "|---|---|---|---|---|---|---|---|"]
  for method in METHODS:
    have = [s for s in seeds if (method, s) in done]
    if not have:
      lines.append(f"| {method} | 0 | not run | | | | | |")
      continue
    accs = [done[(method, s)]["accuracy"] for s in have]
    gains = [done[(method, s)]["accuracy"] - done[(base, s)]["accuracy"]
             for s in have if (base, s) in done]
    gain, se = paired(gains) if gains else (math.nan, math.nan)
    if method == base:
      versus, beats = "(baseline)", "—"
    elif len(gains) < 2:
      versus, beats = f"{gain:+.3f} (1 seed)", "needs seeds"
    else:
      versus, beats = f"{gain:+.3f} ± {se:.3f}", "yes" if gain > 2 * se else "no"
    spread = f" ± {statistics.stdev(accs):.3f}" if len(accs) > 1 else ""
    lines.append(
        f"| {method} | {len(have)} | {mean_of(method, 'dev_accuracy'):.3f} | "
        f"{statistics.mean(accs):.3f}{spread} | {mean_of(method, 'macro_f1'):.3f} | "
        f"{versus} | {beats} | "
        f"{statistics.mean(done[(method, s)]['wall_s'] for s in have):.0f} |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("phase", choices=("tune", "run", "report"))
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--methods", nargs="+", default=list(METHODS))
  parser.add_argument("--workroot", default="/tmp/etjax-transfer-debian")
  args = parser.parse_args()
  root = pathlib.Path(args.workroot)
  if args.phase == "report":
    print(report())
    return
  files = write_files(root / "data")
  if args.phase == "tune":
    for lr in LEARNING_RATES:
      for method in ("target_only", "mixed"):
        run_cell(method, 0, lr, files, root)
    print("chosen learning rate:", chosen_learning_rate())
    return
  lr = chosen_learning_rate()
  for seed in args.seeds:
    for method in args.methods:
      run_cell(method, seed, lr, files, root)


if __name__ == "__main__":
  main()
