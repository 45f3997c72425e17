"""How a training step's CPU work spreads over threads: XLA:CPU (with flag variants)
against PyTorch, on the MiniLM-sized BERT of train_throughput.py (batch 16 x 128).

    python benchmarks/cpu_threads.py [--steps 3] [--variants default,no_eigen,...]

For each variant a fresh process compiles and warms the step, then runs `steps` steps
while the CPU seconds of every thread of the process are read from /proc/self/task.
Printed per variant: CPU seconds per step, the busiest thread's share of them, and
"parallelism" = all threads' CPU seconds / the busiest thread's. A program that keeps
both cores busy shows parallelism near 2 on this 2-core machine; 1 means one thread
did all the work. These are shares of CPU time, so other jobs loading the machine
slow every variant without changing much how each spreads its work.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

VARIANTS = {
    "default": "",
    "no_eigen": "--xla_cpu_multi_thread_eigen=false",
    "concurrency_scheduler": "--xla_cpu_enable_concurrency_optimized_scheduler=true",
    "split_codegen_8": "--xla_cpu_parallel_codegen_split_count=8",
}


def thread_cpu() -> dict[int, float]:
  ticks = os.sysconf("SC_CLK_TCK")
  out = {}
  for tid in os.listdir("/proc/self/task"):
    try:
      with open(f"/proc/self/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
      out[int(tid)] = (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
    except (FileNotFoundError, ProcessLookupError):
      pass
  return out


def spread(before: dict, after: dict, steps: int) -> dict:
  used = {t: after[t] - before.get(t, 0.0) for t in after}
  total = sum(used.values())
  top = max(used.values()) if used else 0.0
  return {"cpu_s_per_step": total / steps, "busiest_share": top / total if total else 0,
          "parallelism": total / top if top else 0,
          "threads_used": sum(1 for v in used.values() if v > 0.01 * total)}


def child(framework: str, steps: int) -> None:
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import train_throughput as tt  # pylint: disable=g-import-not-at-top
  if framework == "etjax":
    import jax  # pylint: disable=g-import-not-at-top
    from etjax import algorithms, models  # pylint: disable=g-import-not-at-top
    size = tt.SIZES["minilm"]
    config = models.get_config("bert-base", **size, scan_unroll=size["num_layers"])
    model = models.SequenceClassifier(models.module_for(config), num_labels=2)
    step = algorithms.finetune(model, algorithms.make_optimizer(
        "adamw", learning_rate=1e-5, total_steps=1000))
    batch = jax.device_put(tt._batch())  # pylint: disable=protected-access
    state = jax.jit(step.init)(jax.random.PRNGKey(0), batch)
    update = jax.jit(step.update, donate_argnums=0)
    holder = [state]

    def once():
      holder[0], m = update(holder[0], batch)
      jax.block_until_ready(m)
  else:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    size = tt.SIZES["minilm"]
    model = transformers.BertForSequenceClassification(transformers.BertConfig(
        hidden_size=size["hidden_size"], num_hidden_layers=size["num_layers"],
        num_attention_heads=size["num_heads"], intermediate_size=size["intermediate_size"],
        num_labels=2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batch = {k: torch.tensor(v, dtype=torch.long)
             for k, v in tt._batch().items() if k != "weight"}  # pylint: disable=protected-access

    def once():
      model(**batch).loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
      opt.step()
      opt.zero_grad()
  once()
  once()
  before, start = thread_cpu(), time.perf_counter()
  for _ in range(steps):
    once()
  wall = time.perf_counter() - start
  result = spread(before, thread_cpu(), steps)
  result["wall_s_per_step"] = wall / steps
  print(json.dumps(result))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--variants", default=",".join(["torch", *VARIANTS]))
  parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args._child:  # pylint: disable=protected-access
    child(args._child, args.steps)  # pylint: disable=protected-access
    return
  print(f"{'variant':24s} {'cpu s/step':>10s} {'wall s/step':>11s} {'busiest':>8s} "
        f"{'parallelism':>11s} {'threads':>7s}   (load {os.getloadavg()[0]:.1f})")
  for name in args.variants.split(","):
    env = dict(os.environ)
    framework = "torch" if name == "torch" else "etjax"
    if framework == "etjax":
      env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + VARIANTS[name]).strip()
    out = subprocess.run([sys.executable, "-P", os.path.abspath(__file__), "--_child",
                          framework, "--steps", str(args.steps)], env=env,
                         capture_output=True, text=True)
    if out.returncode:
      print(f"{name:24s} failed: {out.stderr.strip().splitlines()[-1:]}")
      continue
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{name:24s} {r['cpu_s_per_step']:10.2f} {r['wall_s_per_step']:11.2f} "
          f"{r['busiest_share']:8.2f} {r['parallelism']:11.2f} {r['threads_used']:7d}",
          flush=True)


if __name__ == "__main__":
  main()
