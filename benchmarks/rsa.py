"""RSA on CPU: compiled temporary memory and time of the XLA path versus dense.

Run:  python benchmarks/rsa.py            (both parts)
      python benchmarks/rsa.py --part memory|time

memory: the compiled function's temporary bytes (`memory_analysis()`; nothing is
  executed) for dense attention (`jax.nn.dot_product_attention`, XLA) and RSA's
  'xla' backend at n in {1024, 4096, 16384}, k = 4, forward and forward+backward.
time: median wall time of jitted forward and forward+backward at n = 4096, k = 4,
  dense and RSA measured alternately in the same run.
Ratios are RSA / dense; the target for time is <= 0.35 and for memory about 1/k.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from etjax.pallas.rsa import make_layout, rsa_attention  # noqa: E402

HEADS, HEAD_DIM, BLOCK = 4, 64, 64


def attention_fns(n: int, k: int, dtype=jnp.float32):
  """Returns (dense, rsa) functions of (q, k, v, mask) -> out [1, n, H, D]."""
  layout = make_layout(HEADS, n, BLOCK, k, seed=0)

  def dense(q, kk, v, mask):
    return jax.nn.dot_product_attention(q, kk, v, mask=mask[:, None, None, :],
                                        implementation="xla")

  def rsa(q, kk, v, mask):
    return rsa_attention(q, kk, v, layout, block_size=BLOCK, mask=mask,
                         backend="xla")

  return dense, rsa


def with_grad(fn):
  def loss(q, kk, v, mask):
    return jnp.sum(fn(q, kk, v, mask).astype(jnp.float32) ** 2)
  return jax.grad(loss, argnums=(0, 1, 2))


def inputs(n: int, dtype=jnp.float32, concrete=True):
  shape = (1, n, HEADS, HEAD_DIM)
  if not concrete:
    return (jax.ShapeDtypeStruct(shape, dtype),) * 3 + (
        jax.ShapeDtypeStruct((1, n), jnp.bool_),)
  rng = np.random.default_rng(0)
  q, kk, v = (jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(3))
  return q, kk, v, jnp.ones((1, n), bool)


def temp_bytes(fn, args) -> int:
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def memory(k: int = 4):
  print(f"## Compiled temporary memory, heads={HEADS}, head_dim={HEAD_DIM}, "
        f"block={BLOCK}, k={k}, float32, batch 1")
  print("| n | pass | dense MiB | RSA (xla) MiB | RSA / dense |")
  print("|---|---|---|---|---|")
  for n in (1024, 4096, 16384):
    dense, rsa = attention_fns(n, k)
    args = inputs(n, concrete=False)
    for name, wrap in (("fwd", lambda f: f), ("fwd+bwd", with_grad)):
      d, r = temp_bytes(wrap(dense), args), temp_bytes(wrap(rsa), args)
      print(f"| {n} | {name} | {d / 2**20:.1f} | {r / 2**20:.1f} | {r / d:.3f} |",
            flush=True)


def median_time(fn, args, reps: int) -> float:
  out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def timing(n: int = 4096, k: int = 4, reps: int = 7):
  print(f"## CPU time, n={n}, k={k}, heads={HEADS}, head_dim={HEAD_DIM}, "
        f"block={BLOCK}, float32, batch 1, median of {reps} (alternating)")
  print("| pass | dense ms | RSA (xla) ms | RSA / dense |")
  print("|---|---|---|---|")
  dense, rsa = attention_fns(n, k)
  args = inputs(n)
  for name, wrap in (("fwd", lambda f: f), ("fwd+bwd", with_grad)):
    fd, fr = jax.jit(wrap(dense)), jax.jit(wrap(rsa))
    td, tr = [], []
    for _ in range(reps):                  # alternate so load drifts hit both
      td.append(median_time(fd, args, 1))
      tr.append(median_time(fr, args, 1))
    d, r = float(np.median(td)), float(np.median(tr))
    print(f"| {name} | {d * 1e3:.1f} | {r * 1e3:.1f} | {r / d:.3f} |", flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--part", choices=("memory", "time", "all"), default="all")
  parser.add_argument("--k", type=int, default=4)
  parser.add_argument("--reps", type=int, default=7)
  args = parser.parse_args()
  print(f"jax {jax.__version__} on {jax.default_backend()}, "
        f"{os.cpu_count()} CPUs visible")
  if args.part in ("memory", "all"):
    memory(args.k)
  if args.part in ("time", "all"):
    timing(k=args.k, reps=args.reps)


if __name__ == "__main__":
  main()
