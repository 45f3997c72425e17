"""DESIGN.md's import rules, checked over every module of etjax/.

Layers, bottom up: pallas (imports nothing of etjax); models (pallas); sharding and
data (nothing of etjax: sharding works on logical names and never sees a model class);
algorithms (models, pallas, sharding, data; never train); train (algorithms and
below); apps, serving, experiments, transfer (above train, beside each other); main.py (all).
Nothing imports main.py, and only main.py imports gin or defines command-line flags.
Every import statement counts, also those inside functions.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "etjax"

_BELOW_TRAIN = {"pallas", "models", "sharding", "data", "algorithms"}
_TOP = {"apps", "serving", "experiments", "transfer"}
# package -> the etjax packages its modules may import (besides itself).
ALLOWED = {
    "pallas": set(),
    "models": {"pallas"},
    "sharding": set(),
    "data": set(),
    "algorithms": {"models", "pallas", "sharding", "data"},
    "train": _BELOW_TRAIN,
    **{top: _BELOW_TRAIN | {"train"} | _TOP for top in _TOP},
    "main": _BELOW_TRAIN | {"train"} | _TOP,
}
_FLAG_MODULES = ("gin", "absl.flags", "argparse")

# Known breaks waiting for a move, with the reason; each entry must still be a break
# (test_exceptions_are_current), so a fixed one is taken off the list.
PENDING = {
    # Job assembly (splits, tokenizer, pretrained backbone, TrainStep from settings)
    # belongs above train (apps/); it moves once issue 16's edits to it and main.py land.
    "train/tasks.py": "job assembly inside train",
    # The paper-table drivers keep their argparse entry points until they run through
    # the one Trainer (issue 10, last part); `etjax run --gin_file=gin/runs/...` is the
    # command that replaces them.
}


def _modules():
  return sorted(p for p in ROOT.rglob("*.py"))


def _package(path: pathlib.Path) -> str:
  rel = path.relative_to(ROOT)
  if len(rel.parts) == 1:
    return rel.stem if rel.stem == "main" else "etjax"
  return rel.parts[0]


def _imports(path: pathlib.Path):
  """(line, imported module name) for every import statement of the file."""
  tree = ast.parse(path.read_text(), filename=str(path))
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield node.lineno, alias.name
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        raise AssertionError(f"{path}:{node.lineno}: relative import; etjax imports "
                             "absolutely")
      yield node.lineno, node.module or ""
      # `from etjax import models` imports the package etjax.models.
      if node.module == "etjax":
        for alias in node.names:
          yield node.lineno, f"etjax.{alias.name}"


def _breaks(path: pathlib.Path) -> list[str]:
  """The rule breaks of one module, each as 'file:line: what'."""
  package = _package(path)
  rel = path.relative_to(ROOT.parent)
  found = []
  for line, name in _imports(path):
    parts = name.split(".")
    if name in _FLAG_MODULES or name.startswith("absl.flags") or parts[0] == "gin":
      if package != "main":
        found.append(f"{rel}:{line}: imports {name}; only etjax/main.py reads flags or "
                     "binds gin")
      continue
    if parts[0] != "etjax" or len(parts) < 2:
      continue
    target = "main" if parts[1] == "main" else parts[1]
    if target == "main" and package != "main":
      found.append(f"{rel}:{line}: imports etjax.main; nothing imports main.py")
    elif target != package and package in ALLOWED and target not in ALLOWED[package]:
      found.append(f"{rel}:{line}: {package} imports {name} (allowed: "
                   f"{', '.join(sorted(ALLOWED[package])) or 'nothing of etjax'})")
  return found


def test_every_package_has_a_layer():
  packages = {_package(p) for p in _modules()} - {"etjax"}
  unknown = packages - set(ALLOWED)
  assert not unknown, (f"etjax packages {sorted(unknown)} have no layer: add them to "
                       "DESIGN.md's layering and to ALLOWED here")


def test_import_rules():
  breaks = []
  for path in _modules():
    rel = str(path.relative_to(ROOT))
    if rel in PENDING:
      continue
    breaks += _breaks(path)
  assert not breaks, "layering breaks (DESIGN.md):\n" + "\n".join(breaks)


@pytest.mark.parametrize("rel", sorted(PENDING))
def test_exceptions_are_current(rel):
  path = ROOT / rel
  assert path.exists(), f"{rel} is gone: take it off PENDING in tests/test_layering.py"
  if PENDING[rel] == "argparse entry point":
    assert _breaks(path), f"{rel} no longer breaks a rule: take it off PENDING"


def test_checker_sees_breaks(tmp_path, monkeypatch):
  """The checker itself: a models module importing train, and one importing gin."""
  fake = tmp_path / "etjax"
  (fake / "models").mkdir(parents=True)
  bad = fake / "models" / "bad.py"
  bad.write_text("import os\n\ndef f():\n  from etjax.train import trainer\n"
                 "  import gin\n  from etjax import pallas\n")
  monkeypatch.setitem(globals(), "ROOT", fake)
  found = _breaks(bad)
  assert len(found) == 2, found
  assert "etjax/models/bad.py:4: models imports etjax.train (allowed: pallas)" in found[0]
  assert "imports gin" in found[1]
