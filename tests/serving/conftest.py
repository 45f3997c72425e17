"""Fixtures of the serving tests, built once per session: a tiny trained workdir and
one export of it."""

from __future__ import annotations

import pytest

from tests.serving.serving_testlib import Trained, train_workdir


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Trained:
  return train_workdir(str(tmp_path_factory.mktemp("workdir")))


@pytest.fixture(scope="session")
def exported(trained, tmp_path_factory) -> str:
  """An export root with one version (cpu only: lowering for more is tested once)."""
  from etjax.serving import export
  root = str(tmp_path_factory.mktemp("exports"))
  export.export_workdir(trained.workdir, root, platforms=("cpu",))
  return root
