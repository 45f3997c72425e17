"""One process of the 2-process test job (started by launch/local.py); see test_multihost."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# pylint: disable=g-import-not-at-top
from etjax.sharding import distributed

assert distributed.initialize(), "expected JAX_COORDINATOR_ADDRESS etc. from the launcher"

import jax
import numpy as np

import sharding_testlib

assert jax.process_count() == 2 and jax.device_count() == 8, jax.devices()
# Across processes, dcn_data groups the devices by process (the slow-network granule).
from etjax.sharding.mesh import make_mesh
hybrid = make_mesh({"dcn_data": 2, "data": 4})
for granule in range(2):
  owners = {d.process_index for d in hybrid.devices[granule].flat}
  assert owners == {granule}, (granule, owners)
try:
  make_mesh({"dcn_data": 4, "data": 2})
  raise AssertionError("dcn_data=4 over 2 processes should fail")
except ValueError as e:
  assert "dcn_data=4 but the devices span 2 processes" in str(e), e
params = sharding_testlib.dp_train()
index, count = distributed.process_shard()
flat = {"/".join(str(getattr(k, "key", k)) for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
np.savez(os.path.join(sys.argv[1], f"params_{index}_of_{count}.npz"), **flat)
print(f"process {index} of {count} done")
