#!/usr/bin/env python3
"""Starts N processes of one command on this machine, as one multi-process jax job.

    python launch/local.py --num_processes 2 --devices_per_process 4 -- \
        python -m etjax.main train --gin_file gin/runs/....gin

Each process gets JAX_COORDINATOR_ADDRESS (a free local port; process 0 serves it),
JAX_NUM_PROCESSES and JAX_PROCESS_ID, which etjax.sharding.distributed.initialize
reads. With --devices_per_process each process runs on that many fake CPU devices
(CPU collectives over gloo), which is how multi-host code is tested on one machine;
with --gpus_per_process each process sees its own GPUs via CUDA_VISIBLE_DEVICES.
Output lines are prefixed with [pI]. If any process fails, the others are stopped and
its exit status is returned; a timeout stops all of them and returns 124.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Mapping, Optional, Sequence

from etjax.sharding.distributed import ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID
from etjax.sharding.fake_devices import fake_device_environ


def free_port() -> int:
  """A TCP port that is free on this machine now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def process_environ(index: int, num_processes: int, address: str, *,
                    devices_per_process: Optional[int] = None,
                    gpus_per_process: Optional[int] = None,
                    base: Optional[Mapping[str, str]] = None) -> dict[str, str]:
  """The environment of process `index` of a local job."""
  env = dict(os.environ if base is None else base)
  if devices_per_process:
    env = fake_device_environ(devices_per_process, env)
  if gpus_per_process:
    first = index * gpus_per_process
    env["CUDA_VISIBLE_DEVICES"] = ",".join(
        str(g) for g in range(first, first + gpus_per_process))
  env[ENV_COORDINATOR] = address
  env[ENV_NUM_PROCESSES] = str(num_processes)
  env[ENV_PROCESS_ID] = str(index)
  return env


def _pump(index: int, stream, out) -> None:
  for line in iter(stream.readline, ""):
    out.write(f"[p{index}] {line}")
    out.flush()
  stream.close()


def _stop(procs: Sequence[subprocess.Popen], grace: float = 5.0) -> None:
  for proc in procs:
    if proc.poll() is None:
      proc.send_signal(signal.SIGTERM)
  deadline = time.monotonic() + grace
  for proc in procs:
    try:
      proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


def launch(command: Sequence[str], num_processes: int, *,
           devices_per_process: Optional[int] = None,
           gpus_per_process: Optional[int] = None,
           timeout: Optional[float] = None, out=None) -> int:
  """Runs `command` as `num_processes` processes of one job; returns the job's status.

  Returns:
    0 when every process exits 0; otherwise the status of the first process to fail
    (the others are stopped), or 124 if `timeout` seconds pass first.
  """
  if num_processes < 1:
    raise ValueError(f"--num_processes must be >= 1, got {num_processes}")
  if not command:
    raise ValueError("no command given (put it after --)")
  out = sys.stdout if out is None else out
  address = f"127.0.0.1:{free_port()}"
  procs, pumps = [], []
  for index in range(num_processes):
    env = process_environ(index, num_processes, address,
                          devices_per_process=devices_per_process,
                          gpus_per_process=gpus_per_process)
    proc = subprocess.Popen(list(command), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    procs.append(proc)
    pump = threading.Thread(target=_pump, args=(index, proc.stdout, out), daemon=True)
    pump.start()
    pumps.append(pump)
  deadline = None if timeout is None else time.monotonic() + timeout
  status = 0
  try:
    while any(p.poll() is None for p in procs):
      failed = [p for p in procs if p.poll() not in (None, 0)]
      if failed:
        status = failed[0].returncode
        out.write(f"[launch] process {procs.index(failed[0])} exited with {status}; "
                  "stopping the others\n")
        break
      if deadline is not None and time.monotonic() > deadline:
        out.write(f"[launch] timeout after {timeout} s; stopping all processes\n")
        status = 124
        break
      time.sleep(0.1)
  finally:
    _stop(procs)
    for pump in pumps:
      pump.join(timeout=5)
  if status == 0:
    status = next((p.returncode for p in procs if p.returncode != 0), 0)
  return status


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  command = []
  if "--" in argv:
    split = argv.index("--")
    argv, command = argv[:split], argv[split + 1:]
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--num_processes", "-n", type=int, required=True)
  parser.add_argument("--devices_per_process", "-d", type=int, default=None,
                      help="fake CPU devices per process")
  parser.add_argument("--gpus_per_process", type=int, default=None)
  parser.add_argument("--timeout", type=float, default=None, help="seconds")
  args = parser.parse_args(argv)
  return launch(command, args.num_processes, devices_per_process=args.devices_per_process,
                gpus_per_process=args.gpus_per_process, timeout=args.timeout)


if __name__ == "__main__":
  sys.exit(main())
