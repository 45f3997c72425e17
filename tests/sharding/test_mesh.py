"""make_mesh: shapes, device order across dcn_data granules, and errors."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from etjax.sharding import mesh as mesh_lib


def test_default_puts_all_devices_on_data():
  mesh = mesh_lib.make_mesh()
  assert mesh.axis_names == ("dcn_data", "data", "fsdp", "stage", "model")
  assert dict(mesh.shape) == {"dcn_data": 1, "data": 8, "fsdp": 1, "stage": 1,
                              "model": 1}


def test_sizes_and_free_axis():
  mesh = mesh_lib.make_mesh({"fsdp": -1, "model": 2})
  assert dict(mesh.shape)["fsdp"] == 4 and dict(mesh.shape)["model"] == 2
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_hybrid_mesh_keeps_each_granule_contiguous():
  mesh = mesh_lib.make_mesh({"dcn_data": 2, "data": 2, "model": 2})
  assert mesh.devices.shape == (2, 2, 1, 1, 2)
  ids = np.vectorize(lambda d: d.id)(mesh.devices)
  # One process: the first four devices stand in for granule 0, the rest for 1.
  assert sorted(ids[0].ravel()) == [0, 1, 2, 3]
  assert sorted(ids[1].ravel()) == [4, 5, 6, 7]


def test_parse_mesh_spec():
  assert mesh_lib.parse_mesh_spec("data=2, fsdp=4,model=1") == {
      "data": 2, "fsdp": 4, "model": 1}
  assert mesh_lib.parse_mesh_spec("dcn_data=2,data=-1") == {"dcn_data": 2, "data": -1}
  with pytest.raises(ValueError, match="unknown axis 'tensor'"):
    mesh_lib.parse_mesh_spec("data=2,tensor=4")
  with pytest.raises(ValueError, match="expected NAME=SIZE, got 'data'"):
    mesh_lib.parse_mesh_spec("data")


@pytest.mark.parametrize("sizes,message", [
    ({"data": 3}, r"needs 3 devices, but 8 are available"),
    ({"data": 2, "model": 2}, r"needs 4 devices, but 8 are available"),
    ({"data": -1, "fsdp": -1}, r"only one mesh axis may be -1, got \['data', 'fsdp'\]"),
    ({"data": -1, "model": 3}, r"8 devices do not divide into axes"),
    ({"tensor": 2}, r"unknown mesh axes \['tensor'\]"),
    ({"data": 0}, r"must be positive or -1"),
])
def test_errors(sizes, message):
  with pytest.raises(ValueError, match=message):
    mesh_lib.make_mesh(sizes)


def test_subset_of_devices():
  mesh = mesh_lib.make_mesh({"data": 2}, devices=jax.devices()[:2])
  assert mesh.devices.size == 2
