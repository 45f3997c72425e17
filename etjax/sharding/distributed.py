"""Multi-process start-up: `jax.distributed.initialize` from arguments or the environment.

Every process of a multi-host job runs the same program. Before anything touches a
device, each calls `initialize`, which connects it to the coordinator (process 0) and
makes `jax.devices()` list every process's devices, so one mesh spans them all. Where
the arguments come from, first match wins:

1. explicit arguments (from flags);
2. the environment: JAX_COORDINATOR_ADDRESS ('host:port'), JAX_NUM_PROCESSES,
   JAX_PROCESS_ID (set by launch/local.py and launch/slurm_gpu.sbatch);
3. a cluster jax recognises by itself (SLURM, Open MPI, Cloud TPU pods, GKE), for
   which `jax.distributed.initialize()` needs no arguments (launch/tpu_pod.sh).

With none of these the job is a single process and nothing is initialised. On CPU the
cross-process collectives use gloo (`jax_cpu_collectives_implementation`).

Data is sharded by process: each process loads only the rows of the global batch that
its own devices hold (`process_rows`), and `global_batch` assembles the global arrays.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Sharding

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def _env_int(environ: Mapping[str, str], name: str) -> Optional[int]:
  value = environ.get(name)
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _cluster_detected() -> bool:
  # jax's own cluster detection (SLURM, Open MPI, Cloud TPU, GKE); not public API.
  from jax._src import clusters  # pylint: disable=g-import-not-at-top
  return any(not env.opt_in_only_method and env.is_env_present()
             for env in clusters.ClusterEnv._cluster_types)  # pylint: disable=protected-access


def initialize(coordinator_address: Optional[str] = None,
               num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *,
               local_device_ids: Optional[Sequence[int]] = None,
               cpu_collectives: str = "gloo",
               environ: Optional[Mapping[str, str]] = None) -> bool:
  """Joins this process to a multi-process job, if it is part of one.

  Args:
    coordinator_address: 'host:port' of process 0's coordinator service.
    num_processes: the number of processes in the job.
    process_id: this process's index, 0 <= process_id < num_processes.
    local_device_ids: restrict this process to these local devices (e.g. one GPU per
      process); default all.
    cpu_collectives: cross-process collectives on CPU ('gloo' or 'mpi').
    environ: where to read JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
      JAX_PROCESS_ID; default os.environ.

  Returns:
    True if the distributed system is (now) initialised, False for a single process.

  Raises:
    ValueError: on a partial or inconsistent specification, naming what is missing.
  """
  if jax.distributed.is_initialized():
    return True
  environ = os.environ if environ is None else environ
  address = coordinator_address or environ.get(ENV_COORDINATOR) or None
  count = num_processes if num_processes is not None else _env_int(
      environ, ENV_NUM_PROCESSES)
  index = process_id if process_id is not None else _env_int(environ, ENV_PROCESS_ID)
  given = {"coordinator_address": address, "num_processes": count, "process_id": index}
  if all(v is None for v in given.values()):
    if not _cluster_detected():
      return False
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(local_device_ids=local_device_ids)
    return True
  if count == 1 and address is None:
    return False
  missing = [k for k, v in given.items() if v is None]
  if missing:
    raise ValueError(f"multi-process start-up needs {', '.join(missing)} as well "
                     f"(arguments or {ENV_COORDINATOR}/{ENV_NUM_PROCESSES}/"
                     f"{ENV_PROCESS_ID}); got {given}")
  if not 0 <= index < count:
    raise ValueError(f"process_id={index} is outside [0, num_processes={count})")
  jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  # Everything is given: no cluster auto-detection, which under SLURM would otherwise
  # restrict a one-process-per-node job to GPU SLURM_LOCALID. jax itself still reads
  # JAX_LOCAL_DEVICE_IDS for one-process-per-GPU jobs.
  jax.distributed.initialize(coordinator_address=address, num_processes=count,
                             process_id=index, local_device_ids=local_device_ids,
                             cluster_detection_method="deactivate")
  return True


def process_shard() -> tuple[int, int]:
  """(this process's index, number of processes), for sharding input files by process."""
  return jax.process_index(), jax.process_count()


def process_rows(sharding: Sharding, global_batch_size: int) -> slice:
  """The rows of a [global_batch_size, ...] batch that this process's devices hold.

  Raises:
    ValueError: if they are not one contiguous range (a mesh that interleaves the
      processes along the batch axes).
  """
  index_map = sharding.addressable_devices_indices_map((global_batch_size,))
  rows = sorted({i for idx in index_map.values()
                 for i in range(*idx[0].indices(global_batch_size))})
  if rows != list(range(rows[0], rows[-1] + 1)):
    raise ValueError(f"process {jax.process_index()} holds rows {rows}, not one "
                     "contiguous range; order the mesh so each process's devices are "
                     "contiguous along the batch axes")
  return slice(rows[0], rows[-1] + 1)


def global_batch(local_batch: Mapping[str, Any], sharding: Sharding,
                 global_batch_size: int) -> dict[str, jax.Array]:
  """Global arrays [global_batch_size, ...] from this process's rows of each array.

  `local_batch` holds the rows `process_rows(sharding, global_batch_size)` of every
  batch array (as numpy); every process calls this with its own rows.
  """
  def make(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(
        sharding, x, (global_batch_size,) + x.shape[1:])
  return {k: make(v) for k, v in local_batch.items()}
