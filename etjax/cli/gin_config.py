"""Gin for the command line: `--gin.NAME=VALUE` arguments, the search roots gin files
and their includes resolve against, and binding files and bindings with errors that
name the file, line or binding.

The configurables themselves are in etjax/cli/configurables.py (imported by
`bind_gin`, so binding works from any entry point); the experiments and algorithm
builders of etjax are made configurable here (`register_experiments`).
"""

from __future__ import annotations

import importlib
import os
from typing import Optional, Sequence

from absl import flags
import gin

# Library functions gin files may bind, by gin name: (module, function). The
# experiments are what run files name (`experiment.fn = @...`); the algorithm builders
# are what gin/algorithms/*.gin files configure.
EXPERIMENTS = {
    "feature_table8": ("etjax.experiments.tl_feature_instance", "run_table8"),
    "instance_table9": ("etjax.experiments.tl_feature_instance", "run_table9"),
    "distill_table10": ("etjax.experiments.tl_distill", "run_table10"),
    "distill_adabert": ("etjax.experiments.tl_distill", "run_adabert"),
    "meta_table10": ("etjax.experiments.tl_meta", "run_table10"),
    "meta_table11": ("etjax.experiments.tl_meta", "run_table11"),
    "meta_table12": ("etjax.experiments.tl_meta", "run_table12"),
}
ALGORITHMS = {
    "distill": ("etjax.algorithms.distill", "distill"),
    "pkd": ("etjax.algorithms.pkd", "pkd"),
    "distilbert": ("etjax.algorithms.distilbert", "distilbert"),
    "tinybert": ("etjax.algorithms.tinybert", "tinybert"),
    "AdaBertConfig": ("etjax.algorithms.adabert", "AdaBertConfig"),
    "adabert_search": ("etjax.algorithms.adabert", "adabert_search"),
    "arch_optimizer": ("etjax.algorithms.adabert", "arch_optimizer"),
    "feature_tl": ("etjax.algorithms.feature_based", "build_feature_step"),
    "instance_tl": ("etjax.algorithms.instance_based", "build_instance_step"),
    "ruder_plank": ("etjax.train.ruder_plank", "search"),
    "metaft": ("etjax.algorithms.metaft", "metaft"),
    "metadtl": ("etjax.algorithms.metadtl", "metadtl"),
    "meta_teacher": ("etjax.algorithms.metakd", "meta_teacher"),
    "metakd": ("etjax.algorithms.metakd", "metakd"),
}

_REGISTERED: set = set()


def register_experiments() -> None:
  """Makes the experiment functions and algorithm builders gin configurables (once)."""
  for name, (module, function) in {**EXPERIMENTS, **ALGORITHMS}.items():
    if name not in _REGISTERED:
      gin.external_configurable(getattr(importlib.import_module(module), function),
                                name=name)
      _REGISTERED.add(name)


def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
  """`--gin.NAME=VALUE` (or `--gin.NAME VALUE`) becomes `--gin_bindings=NAME = VALUE`
  in place (t5x's shorthand); everything else is left for absl."""
  out, argv = [], list(argv)
  while argv:
    arg = argv.pop(0)
    if arg.startswith("--gin."):
      name, sep, value = arg[len("--gin."):].partition("=")
      if not sep:
        if not argv:
          raise flags.Error(f"{arg}: expected --gin.NAME=VALUE")
        value = argv.pop(0)
      arg = f"--gin_bindings={name} = {value}"
    out.append(arg)
  return out


def parse_gin_args(argv: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
  """Splits argv into (gin files, gin bindings, other args), shorthand rewritten."""
  files, bindings, rest = [], [], []
  argv = rewrite_gin_args(argv)
  while argv:
    arg = argv.pop(0)
    for flag, into in (("--gin_file", files), ("--gin_bindings", bindings)):
      if arg == flag or arg.startswith(flag + "="):
        into.append(arg.split("=", 1)[1] if "=" in arg else argv.pop(0))
        break
    else:
      rest.append(arg)
  return files, bindings, rest


def gin_search_roots(extra: Sequence[str] = ()) -> list[str]:
  """Directories gin paths resolve against: `extra`, the current directory, and the
  one holding etjax's gin/ (the checkout, or the installed package, which ships gin/
  as package data)."""
  package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  # The checkout's root (editable installs), then the package (setup.py copies gin/
  # into it). 'gin/meshes' tells etjax's configs from the gin-config library's
  # site-packages/gin, which the first candidate may hold.
  shipped = [d for d in (os.path.dirname(package), package)
             if os.path.isdir(os.path.join(d, "gin", "meshes"))]
  roots = [os.path.abspath(p) for p in extra] + [os.getcwd()] + shipped
  return list(dict.fromkeys(roots))


def resolve_gin_path(path: str, roots: Sequence[str]) -> Optional[str]:
  """The first existing `root/path` (or `path` itself when absolute), else None."""
  if os.path.isabs(path):
    return path if os.path.isfile(path) else None
  return next((os.path.join(r, path) for r in roots
               if os.path.isfile(os.path.join(r, path))), None)


class _ResolvingReader:
  """A gin file reader for relative paths under the search roots: gin tries each
  reader per location prefix, so resolving here (first in line) spares its
  package-resource reader, which logs 'Path not found' for every miss."""
  roots: list = []

  @classmethod
  def exists(cls, path: str) -> bool:
    return resolve_gin_path(path, cls.roots) is not None

  @classmethod
  def open(cls, path: str):
    return open(resolve_gin_path(path, cls.roots), encoding="utf-8")


def _install_reader() -> None:
  readers = gin.config._FILE_READERS  # pylint: disable=protected-access
  entry = (_ResolvingReader.open, _ResolvingReader.exists)
  if entry not in readers:
    readers.insert(0, entry)


class _BindingError(ValueError):
  """A --gin binding whose value gin cannot parse."""


def _binding_error(binding: str, e: SyntaxError) -> ValueError:
  name, _, value = binding.partition("=")
  name, value = name.strip(), value.strip()
  detail = str(e).splitlines()[-1].strip() if str(e).strip() else "cannot parse"
  return _BindingError(
      f"gin binding {name} = {value}: {detail}; values are Python literals, so a "
      f"string or path needs quotes inside the flag: --gin.{name}=\"'{value}'\"")


def bind_gin(files: Sequence[str], bindings: Sequence[str],
             search_paths: Sequence[str] = ()) -> None:
  """Parses gin files and bindings; a misspelt name, an unparsable value or a missing
  file fails with a ValueError naming it."""
  # Importing the configurables registers their names (data, train, ...) with gin.
  from etjax.cli import configurables  # pylint: disable=g-import-not-at-top,unused-import
  register_experiments()
  gin.clear_config()
  _ResolvingReader.roots = gin_search_roots(search_paths)
  _install_reader()
  for path in files:
    if resolve_gin_path(path, _ResolvingReader.roots) is None:
      raise ValueError(f"--gin_file {path!r} not found (looked in "
                       f"{', '.join(_ResolvingReader.roots)})")
  try:
    gin.parse_config_files_and_bindings(list(files), None, finalize_config=False)
    for binding in bindings:
      try:
        gin.parse_config(binding)
      except SyntaxError as e:
        raise _binding_error(binding, e) from None
    gin.finalize()
  except _BindingError:
    raise
  except SyntaxError as e:
    where = f"{e.filename}:{e.lineno}: " if e.filename else ""
    raise ValueError(f"gin syntax error: {where}{one_line(e)}") from None
  except IOError as e:
    raise ValueError(f"gin include not found: {e}") from None
  except (ValueError, KeyError) as e:
    raise ValueError(f"gin config error: {one_line(e)}") from None


def one_line(e: BaseException) -> str:
  """An exception's message on one line (gin appends 'In call to configurable ...'
  lines; KeyError quotes its message)."""
  text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
  lines = [l.strip() for l in str(text).splitlines() if l.strip()]
  lines = [l for l in lines if not l.startswith("In call to configurable")]
  return " ".join(lines) or type(e).__name__
