"""T5 on 8 fake devices under the tp and fsdp rule presets equals one device."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest

from etjax.models.t5 import T5Model
from etjax.sharding import mesh as mesh_lib
from etjax.sharding import partitioning, rules as rules_lib
from t5_testlib import assert_close, rng_key, tiny_config

rng = np.random.default_rng(0)
IDS = rng.integers(2, 64, size=(8, 12)).astype(np.int32)
MASK = (np.arange(12)[None] < rng.integers(6, 13, size=(8, 1))).astype(np.int32)
DEC = rng.integers(2, 64, size=(8, 5)).astype(np.int32)


def _forward(module, variables, ids, mask, dec):
  out = module.apply(variables, ids, mask, dec)
  return out.encoder_last_hidden_state, out.logits


@pytest.fixture(scope="module")
def reference():
  """(config, variables, one-device outputs) shared by the sharded runs."""
  cfg = tiny_config(num_layers=4, num_decoder_layers=2)
  module = T5Model(cfg)
  variables = jax.jit(module.init)(rng_key(0), IDS)
  return cfg, variables, jax.jit(lambda v: _forward(module, v, IDS, MASK, DEC))(variables)


def _sharded_forward(module, variables, sizes, preset):
  mesh = mesh_lib.make_mesh(sizes)
  rules = rules_lib.get_rules(preset)
  shardings = partitioning.state_shardings(variables, mesh, rules)
  batch = partitioning.batch_sharding(mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    fn = jax.jit(lambda *args: _forward(module, *args),
                 in_shardings=(shardings, batch, batch, batch))
    return shardings, fn(variables, IDS, MASK, DEC)


@pytest.mark.parametrize("preset,sizes,sharded_axis", [
    ("tp", {"data": 2, "model": 4}, "model"),
    ("fsdp", {"data": 2, "fsdp": 4}, "fsdp"),
])
def test_sharded_forward_matches_one_device(reference, preset, sizes, sharded_axis):
  cfg, variables, want = reference
  shardings, got = _sharded_forward(T5Model(cfg), variables, sizes, preset)
  query = shardings["params"]["decoder"]["stack"]["layers"]["self_attention"]["query"]
  assert sharded_axis in jax.tree.leaves(tuple(query["kernel"].spec))
  for name, g, w in zip(("encoder", "logits"), got, want):
    assert_close(g, w, what=f"{preset} {name}")


def test_pipelined_stacks_under_3d_match_the_plain_stacks(reference):
  # Both stacks pipelined over 2 stages (4 microbatches), with data and tensor
  # parallelism, on the parameters of the unpipelined model.
  cfg, variables, want = reference
  piped = T5Model(cfg.replace(pipeline_stages=2, pipeline_microbatches=4))
  assert (jax.tree.structure(jax.eval_shape(piped.init, rng_key(0), IDS))
          == jax.tree.structure(variables))
  _, got = _sharded_forward(piped, variables, {"data": 2, "stage": 2, "model": 2}, "3d")
  for name, g, w in zip(("encoder", "logits"), got, want):
    assert_close(g, w, what=f"pipelined {name}")
