"""Rule presets on a small logical-axis model, and the divisibility check."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from etjax.sharding import mesh as mesh_lib
from etjax.sharding import partitioning, rules as rules_lib
from sharding_testlib import TinyClassifier

IDS = jnp.zeros((8, 4), jnp.int32)

# Hand-written expectations from the presets' tables (mesh data=2, fsdp=2, model=2).
EXPECTED = {
    "dp": {"embedding": (None, None), "query": (None, None, None),
           "out": (None, None, None), "wi": (None, None), "wo": (None, None),
           "scale": (None,), "head": (None, None)},
    "fsdp": {"embedding": (None, "fsdp"), "query": ("fsdp", None, None),
             "out": (None, None, "fsdp"), "wi": ("fsdp", None), "wo": (None, "fsdp"),
             "scale": ("fsdp",), "head": ("fsdp", None)},
    "tp": {"embedding": ("model", None), "query": (None, "model", None),
           "out": ("model", None, None), "wi": (None, "model"), "wo": ("model", None),
           "scale": (None,), "head": (None, None)},
    "2d": {"embedding": ("model", "fsdp"), "query": ("fsdp", "model", None),
           "out": ("model", None, "fsdp"), "wi": ("fsdp", "model"),
           "wo": ("model", "fsdp"), "scale": ("fsdp",), "head": ("fsdp", None)},
}
EXPECTED["3d"] = EXPECTED["2d"]


def _abstract_params(model):
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), IDS)


def _padded(spec, ndim):
  return tuple(spec) + (None,) * (ndim - len(spec))


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_preset_partition_specs(preset):
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "model": 2})
  variables = _abstract_params(TinyClassifier())
  shardings = partitioning.state_shardings(variables, mesh, rules_lib.get_rules(preset))
  got = {name: _padded(s.spec, len(EXPECTED[preset][name]))
         for name, s in shardings["params"].items()}
  assert got == EXPECTED[preset]
  batch = partitioning.batch_sharding(mesh, rules_lib.get_rules(preset))
  assert batch.spec == P(("dcn_data", "data", "fsdp"))


def test_3d_puts_layer_stacks_on_stage():
  mesh = mesh_lib.make_mesh({"data": 2, "stage": 2, "model": 2})
  box = nn.LogicallyPartitioned(jax.ShapeDtypeStruct((4, 8, 16), jnp.float32),
                                ("layers", "embed", "mlp"))
  sharding = partitioning.state_shardings({"w": box}, mesh, rules_lib.get_rules("3d"))
  assert _padded(sharding["w"].spec, 3) == ("stage", "fsdp", "model")


def test_sharded_forward_matches_unsharded():
  # Exact mathematics (sums split over devices), so float64 and a tight tolerance.
  with jax.enable_x64(True):
    model = TinyClassifier()
    variables = model.init(jax.random.PRNGKey(0), IDS)
    ids = jax.random.randint(jax.random.PRNGKey(1), (8, 4), 0, 16)
    want = model.apply(variables, ids)
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "model": 2})
    rules = rules_lib.get_rules("2d")
    shardings = partitioning.state_shardings(variables, mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      fn = jax.jit(model.apply, in_shardings=(shardings,
                                              partitioning.batch_sharding(mesh, rules)))
      got = fn(variables, ids)
  assert got.dtype == np.float64
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_indivisible_dimension_names_parameter_shape_and_axes():
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "model": 2})
  variables = _abstract_params(TinyClassifier(heads=3, mlp=15))
  with pytest.raises(ValueError) as err:
    partitioning.state_shardings(variables, mesh, rules_lib.get_rules("2d"))
  msg = str(err.value)
  assert ("params/query: shape (8, 3, 4), dimension 1 of size 3 (logical axis 'heads') "
          "is not divisible by mesh axis 'model' (size 2)") in msg
  assert ("params/wi: shape (8, 15), dimension 1 of size 15 (logical axis 'mlp') "
          "is not divisible by mesh axis 'model' (size 2)") in msg
  # dp replicates heads and mlp, so the same model is fine there.
  partitioning.state_shardings(variables, mesh, rules_lib.get_rules("dp"))


def test_indivisible_over_combined_axes():
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 4})
  box = nn.LogicallyPartitioned(jax.ShapeDtypeStruct((6, 5), jnp.float32),
                                ("embed", None))
  with pytest.raises(ValueError, match=r"w: shape \(6, 5\), dimension 0 of size 6 "
                     r"\(logical axis 'embed'\) is not divisible by mesh axis "
                     r"'fsdp' \(size 4\)"):
    partitioning.validate_divisibility({"w": box}, mesh, rules_lib.get_rules("fsdp"))
  rules = (("embed", ("data", "fsdp")),)
  with pytest.raises(ValueError, match=r"'data' \(size 2\) x 'fsdp' \(size 4\)"):
    partitioning.validate_divisibility({"w": box}, mesh, rules)


def test_batch_divisibility():
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "model": 2})
  rules = rules_lib.get_rules("2d")
  partitioning.validate_batch_divisibility({"input_ids": IDS}, mesh, rules)
  with pytest.raises(ValueError, match=r"divisible by 4, the mesh axes 'dcn_data' "
                     r"\(size 1\) x 'data' \(size 2\) x 'fsdp' \(size 2\) that 'batch' maps "
                     r"to: batch\['labels'\] of shape \(6,\)"):
    partitioning.validate_batch_divisibility(
        {"input_ids": IDS, "labels": jnp.zeros((6,), jnp.int32)}, mesh, rules)


def test_empty_box_from_optax_masking_names_the_fix():
  """Plain optax.multi_transform over boxed params leaves MaskedNodes in boxes."""
  import optax  # pylint: disable=g-import-not-at-top
  params = TinyClassifier().init(jax.random.PRNGKey(0), IDS)["params"]
  tx = optax.multi_transform({"a": optax.sgd(0.1, momentum=0.9), "b": optax.sgd(0.2)},
                             lambda p: jax.tree.map(lambda _: "b", p))
  abstract = jax.eval_shape(tx.init, params)
  mesh = mesh_lib.make_mesh({"data": 8})
  with pytest.raises(ValueError, match=r"a logical box \('vocab', 'embed'\) holds no "
                     r"array \(MaskedNode\).*optim.param_groups"):
    partitioning.state_shardings({"opt_state": abstract}, mesh,
                                 rules_lib.get_rules("dp"))
