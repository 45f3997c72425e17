"""Two local processes x 4 fake CPU devices train exactly like one process x 8."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from etjax.sharding import distributed
from sharding_testlib import dp_train

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def test_two_processes_equal_one(tmp_path):
  cmd = [sys.executable, os.path.join(REPO, "launch", "local.py"), "-n", "2", "-d", "4",
         "--timeout", "150", "--", sys.executable,
         os.path.join(HERE, "multihost_worker.py"), str(tmp_path)]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=200, cwd=REPO)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
  assert "[p0] process 0 of 2 done" in proc.stdout
  assert "[p1] process 1 of 2 done" in proc.stdout
  want = dp_train()
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(want)[0]}
  for index in range(2):
    got = np.load(tmp_path / f"params_{index}_of_2.npz")
    assert sorted(got.files) == sorted(flat)
    for name, value in flat.items():
      np.testing.assert_allclose(got[name], value, rtol=1e-6, atol=1e-7, err_msg=name)


def test_launcher_propagates_failure():
  cmd = [sys.executable, os.path.join(REPO, "launch", "local.py"), "-n", "2", "--",
         sys.executable, "-c",
         "import os, sys, time\n"
         "if os.environ['JAX_PROCESS_ID'] == '1': sys.exit(3)\n"
         "time.sleep(60)"]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO)
  assert proc.returncode == 3
  assert "process 1 exited with 3; stopping the others" in proc.stdout


def test_initialize_single_process_and_partial_spec():
  assert distributed.initialize(environ={}) is False
  assert distributed.process_shard() == (0, 1)
  with pytest.raises(ValueError, match="needs num_processes, process_id as well"):
    distributed.initialize(environ={"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234"})
  with pytest.raises(ValueError, match=r"process_id=2 is outside \[0, num_processes=2\)"):
    distributed.initialize("127.0.0.1:1234", 2, 2)
