"""DESIGN.md's import rules, checked over every module of etjax/.

Layers, bottom up: pallas (imports nothing of etjax); models (pallas); sharding and
data (nothing of etjax: sharding works on logical names and never sees a model class);
algorithms (models, pallas, sharding, data; never train); train (algorithms and
below); transfer (train and below); jobs (job assembly from plain settings: transfer,
train and below); apps, serving, experiments (jobs and below, beside each other);
cli (the command line below its entry point: all of the above); main.py (all).
Nothing imports main.py, only main.py imports cli, and only main.py and cli import gin
or define command-line flags. Every import statement counts, also those inside
functions; there are no exceptions.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "etjax"

_BELOW_TRAIN = {"pallas", "models", "sharding", "data", "algorithms"}
_TOP = {"apps", "serving", "experiments"}
# package -> the etjax packages its modules may import (besides itself).
ALLOWED = {
    "pallas": set(),
    "models": {"pallas"},
    "sharding": set(),
    "data": set(),
    "algorithms": {"models", "pallas", "sharding", "data"},
    "train": _BELOW_TRAIN,
    "transfer": _BELOW_TRAIN | {"train"},
    "jobs": _BELOW_TRAIN | {"train", "transfer"},
    **{top: _BELOW_TRAIN | {"train", "transfer", "jobs"} | _TOP for top in _TOP},
    "cli": _BELOW_TRAIN | {"train", "transfer", "jobs"} | _TOP,
    "main": _BELOW_TRAIN | {"train", "transfer", "jobs", "cli"} | _TOP,
}
# The packages that may import gin or define command-line flags.
_COMMAND_LINE = {"main", "cli"}
_FLAG_MODULES = ("gin", "absl.flags", "argparse")


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
      # `from etjax import models` imports the package etjax.models, and
      # `from absl import flags` the module absl.flags.
      if node.module in ("etjax", "absl"):
        for alias in node.names:
          yield node.lineno, f"{node.module}.{alias.name}"


def _breaks(path: pathlib.Path) -> list[str]:
  """The rule breaks of one module, each as 'file:line: what'."""
  package = _package(path)
  rel = path.relative_to(ROOT.parent)
  found = []
  for line, name in _imports(path):
    parts = name.split(".")
    if name in _FLAG_MODULES or name.startswith("absl.flags") or parts[0] == "gin":
      if package not in _COMMAND_LINE:
        found.append(f"{rel}:{line}: imports {name}; only etjax/main.py and etjax/cli/ "
                     "read flags or bind gin")
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
  breaks = [b for path in _modules() for b in _breaks(path)]
  assert not breaks, "layering breaks (DESIGN.md):\n" + "\n".join(breaks)


def test_layers_are_an_order():
  """No two packages may import each other, except the top ones beside each other."""
  both = sorted((a, b) for a in ALLOWED for b in ALLOWED[a]
                if a < b and a in ALLOWED.get(b, ()) and not {a, b} <= _TOP)
  assert not both, f"packages allowed to import each other: {both}"


def test_checker_sees_breaks(tmp_path, monkeypatch):
  """The checker itself: a models module importing train and gin, a train module
  importing jobs, a jobs module importing apps, gin and flags outside the command
  line."""
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
  # Job assembly sits above train and below the apps: neither side may reach across.
  (fake / "train").mkdir()
  (fake / "jobs").mkdir()
  (fake / "train" / "bad.py").write_text("from etjax.jobs import tasks\n")
  (fake / "jobs" / "bad.py").write_text("from etjax.transfer import job\n"
                                        "from etjax.apps import runner\n")
  assert _breaks(fake / "train" / "bad.py") == [
      "etjax/train/bad.py:1: train imports etjax.jobs (allowed: algorithms, data, "
      "models, pallas, sharding)"]
  assert _breaks(fake / "jobs" / "bad.py") == [
      "etjax/jobs/bad.py:2: jobs imports etjax.apps (allowed: algorithms, "
      "data, models, pallas, sharding, train, transfer)"]
  # gin and flags: the command line's (cli, main.py) alone; only main.py imports cli.
  (fake / "cli").mkdir()
  (fake / "apps").mkdir()
  flags_and_gin = "import gin\nfrom absl import flags\n"
  (fake / "cli" / "ok.py").write_text(flags_and_gin + "from etjax.jobs import runs\n")
  (fake / "main.py").write_text(flags_and_gin + "from etjax.cli import commands\n")
  (fake / "apps" / "bad.py").write_text(flags_and_gin +
                                       "from etjax.cli import gin_config\n")
  assert _breaks(fake / "cli" / "ok.py") == [] and _breaks(fake / "main.py") == []
  found = _breaks(fake / "apps" / "bad.py")
  assert [f.split(": ", 1)[0] for f in found] == ["etjax/apps/bad.py:1",
                                                  "etjax/apps/bad.py:2",
                                                  "etjax/apps/bad.py:3"], found
  assert "only etjax/main.py and etjax/cli/ read flags" in found[1]
  assert "apps imports etjax.cli" in found[2]
