"""RSA Pallas kernel versus dense attention on a GPU: correctness first, then time.

Run on a machine with a GPU (it refuses to time on CPU unless asked):
  python benchmarks/rsa_gpu.py                      # n in {4096, 8192, 16384}, k in {2, 4, 8}
  python benchmarks/rsa_gpu.py --lengths 8192 --ks 4 --reps 20
Dry run of the same code on CPU (interpret mode, tiny sizes):
  python benchmarks/rsa_gpu.py --backend interpret --lengths 256 --ks 2 --heads 2 \
      --check-length 128 --allow-cpu

1. Self-check: the kernel's output and dq/dk/dv/dbias against `reference_rsa` on
   fresh random inputs (float32 rel err <= 1e-5, bfloat16 <= 1e-2; causal and not, with
   and without padding mask and bias), and the bfloat16 output at the first timed
   length. Any failure stops the script (exit status 1) before timing.
2. Timing (bfloat16, jitted, median of --reps after a warm-up): forward and
   forward+backward of the kernel and of `jax.nn.dot_product_attention` (cuDNN where
   it accepts the shapes, else XLA; the table says which).
FLOPs: forward 4 * B * H * n * m * D with m keys per query (m = n dense, n / k RSA);
forward+backward 3.5x that (the usual flash-attention count; the recomputation in the
backward pass is not counted). Speedup = dense time / RSA time; target >= 0.8 k at
n = 8192.
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

from etjax.pallas.rsa import make_layout, reference_rsa, rsa_attention  # noqa: E402


def rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def random_inputs(seed, b, n, h, d, dtype, mask=False, bias=False):
  rng = np.random.default_rng(seed)
  q, k, v, g = (jnp.asarray(rng.standard_normal((b, n, h, d)), dtype)
                for _ in range(4))
  m = jnp.asarray(np.arange(n)[None] < rng.integers(n // 2, n + 1, (b, 1))) if mask \
      else None
  bi = jnp.asarray(rng.standard_normal((1, h, n, n)), dtype) if bias else None
  return q, k, v, g, m, bi


def value_and_grads(fn, q, k, v, g, bias):
  def loss(q, k, v, bias):
    out = fn(q, k, v, bias)
    return jnp.sum(out.astype(jnp.float32) * g.astype(jnp.float32)), out
  argnums = (0, 1, 2) + ((3,) if bias is not None else ())
  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums, has_aux=True))(
      q, k, v, bias)
  return (out,) + tuple(grads)


def self_check(args) -> bool:
  """Kernel vs reference_rsa; prints one line per case, returns True if all pass."""
  print("## Self-check against reference_rsa")
  ok = True
  n, h, d, bs = args.check_length, args.heads, args.head_dim, args.block_size
  for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)):
    for causal, mask, bias in ((False, False, False), (True, True, True),
                               (False, True, True)):
      q, k, v, g, m, bi = random_inputs(1, 2, n, h, d, dtype, mask, bias)
      layout = make_layout(h, n, bs, 4, seed=0, causal=causal)
      up = lambda x: None if x is None else x.astype(jnp.float32)
      want = value_and_grads(lambda q, k, v, b: reference_rsa(
          q, k, v, layout, block_size=bs, mask=m, bias=b, causal=causal),
          up(q), up(k), up(v), g, up(bi))
      got = value_and_grads(lambda q, k, v, b: rsa_attention(
          q, k, v, layout, block_size=bs, mask=m, bias=b, causal=causal,
          backend=args.backend), q, k, v, g, bi)
      errs = [rel_err(x, y) for x, y in zip(got, want)]
      good = all(e <= tol for e in errs) and all(
          np.isfinite(np.asarray(x, np.float32)).all() for x in got)
      ok &= good
      names = ("out", "dq", "dk", "dv", "dbias")
      print(f"{'ok  ' if good else 'FAIL'} {jnp.dtype(dtype).name:8s} causal={causal!s:5} "
            f"mask={mask!s:5} bias={bias!s:5} " +
            " ".join(f"{nm}={e:.1e}" for nm, e in zip(names, errs)) + f" (tol {tol})")
  n = args.lengths[0]
  q, k, v, _, _, _ = random_inputs(2, 1, n, h, d, jnp.bfloat16)
  layout = make_layout(h, n, bs, 4, seed=0)
  got = jax.jit(lambda q, k, v: rsa_attention(q, k, v, layout, block_size=bs,
                                              backend=args.backend))(q, k, v)
  want = jax.jit(lambda q, k, v: reference_rsa(q, k, v, layout, block_size=bs))(
      q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
  e = rel_err(got, want)
  ok &= e <= 1e-2
  print(f"{'ok  ' if e <= 1e-2 else 'FAIL'} bfloat16 n={n} k=4 out={e:.1e} (tol 1e-2)")
  return ok


def timed(fn, *xs, reps):
  jax.block_until_ready(fn(*xs))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*xs))
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def dense_fn(impl):
  """jax.nn.dot_product_attention with implementation `impl` ('cudnn' or 'xla')."""
  return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=impl)


def with_grad(fn):
  return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32)),
                  argnums=(0, 1, 2))


def benchmark(args):
  b, h, d, bs = args.batch, args.heads, args.head_dim, args.block_size
  print(f"\n## Time, bfloat16, batch={b}, heads={h}, head_dim={d}, block={bs}, "
        f"median of {args.reps}, device {jax.devices()[0].device_kind}")
  print("| n | k | pass | dense impl | dense ms | RSA ms | speedup | speedup / k | "
        "dense TFLOP/s | RSA TFLOP/s |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for n in args.lengths:
    q, k, v, _, _, _ = random_inputs(3, b, n, h, d, jnp.bfloat16)
    dense_times, dense_impl = {}, None
    for impl in (("cudnn", "xla") if args.backend == "pallas" else ("xla",)):
      try:
        fn = dense_fn(impl)
        dense_times = {"fwd": timed(jax.jit(fn), q, k, v, reps=args.reps),
                       "fwd+bwd": timed(jax.jit(with_grad(fn)), q, k, v,
                                        reps=args.reps)}
        dense_impl = impl
        break
      except Exception as e:  # cuDNN refuses some shapes and versions; fall back.
        print(f"(dense {impl} unavailable at n={n}: {type(e).__name__})")
    if dense_impl is None:
      print(f"(no dense baseline ran at n={n}; skipping this length)")
      continue
    for kk in args.ks:
      layout = make_layout(h, n, bs, kk, seed=0)
      rsa = lambda q, k, v, layout=layout: rsa_attention(
          q, k, v, layout, block_size=bs, backend=args.backend)
      rsa_times = {"fwd": timed(jax.jit(rsa), q, k, v, reps=args.reps),
                   "fwd+bwd": timed(jax.jit(with_grad(rsa)), q, k, v, reps=args.reps)}
      for name in ("fwd", "fwd+bwd"):
        mult = 1.0 if name == "fwd" else 3.5
        dense_flops = mult * 4 * b * h * n * n * d
        rsa_flops = mult * 4 * b * h * n * layout.shape[-1] * bs * d
        td, tr = dense_times[name], rsa_times[name]
        print(f"| {n} | {kk} | {name} | {dense_impl} | {td * 1e3:.2f} | {tr * 1e3:.2f} "
              f"| {td / tr:.2f} | {td / tr / kk:.2f} | {dense_flops / td / 1e12:.1f} | "
              f"{rsa_flops / tr / 1e12:.1f} |", flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
  parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8])
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--head-dim", type=int, default=64)
  parser.add_argument("--block-size", type=int, default=64)
  parser.add_argument("--reps", type=int, default=10)
  parser.add_argument("--check-length", type=int, default=512)
  parser.add_argument("--backend", default="pallas",
                      choices=("pallas", "interpret", "interpret_tpu", "xla"))
  parser.add_argument("--allow-cpu", action="store_true",
                      help="run on CPU anyway (a dry run of the script itself)")
  args = parser.parse_args()
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, "
        f"devices {[dev.device_kind for dev in jax.devices()][:1]}")
  if jax.default_backend() == "cpu" and not args.allow_cpu:
    sys.exit("no GPU visible: this script times the GPU kernel (use --allow-cpu "
             "with --backend interpret for a dry run)")
  if not self_check(args):
    sys.exit(1)
  benchmark(args)


if __name__ == "__main__":
  main()
