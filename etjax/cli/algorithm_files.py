"""The methods' defaults, once: gin/algorithms/*.gin read as plain literal bindings.

`algorithm_settings()` is what the experiments and `transfer.method` take their
hyperparameters from; the files are read with gin's own parser, without binding
anything.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import gin

from etjax.cli import gin_config


class _LiteralsOnly(gin.config_parser.ParserDelegate):
  """gin/algorithms/*.gin bind literals only: a reference or macro is an error."""

  def configurable_reference(self, scoped_name, evaluate):
    raise ValueError(f"unexpected configurable reference @{scoped_name}")

  def macro(self, macro_name):
    raise ValueError(f"unexpected macro %{macro_name}")


def algorithm_file_bindings(path: str) -> dict[str, dict[str, Any]]:
  """{selector: {argument: value}} of one algorithm gin file (gin's own parser).

  Raises:
    ValueError: naming the file and line of a binding that is not a plain literal
      binding (an include, scope, reference or macro).
  """
  out: dict[str, dict[str, Any]] = {}
  with open(path, encoding="utf-8") as f:
    try:
      for statement in gin.config_parser.ConfigParser(f, _LiteralsOnly()):
        if (not isinstance(statement, gin.config_parser.BindingStatement) or
            statement.scope):
          raise ValueError(f"{path}:{statement.location.line_num}: algorithm files "
                           "hold plain bindings only (no include, import or scope)")
        out.setdefault(statement.selector, {})[statement.arg_name] = statement.value
    except SyntaxError as e:
      raise ValueError(f"{path}:{e.lineno}: {gin_config.one_line(e)}") from None
    except ValueError as e:
      if str(e).startswith(path):
        raise
      raise ValueError(f"{path}: {e}") from None
  return out


def algorithm_settings(directory: Optional[str] = None) -> dict[str, dict[str, dict]]:
  """Every method's defaults, once: {file stem: {selector: {argument: value}}} of
  gin/algorithms/*.gin (default: the shipped directory), e.g.
  settings['drss']['feature_tl'] -> {'method': 'drss', 'drss_weight': 0.001, ...}.
  The experiments and `transfer.method` read their hyperparameters from here."""
  if directory is None:
    roots = [r for r in gin_config.gin_search_roots()
             if os.path.isdir(os.path.join(r, "gin", "algorithms"))]
    directory = os.path.join(roots[-1], "gin", "algorithms")
  names = sorted(n for n in os.listdir(directory) if n.endswith(".gin"))
  if not names:
    raise ValueError(f"no algorithm gin files under {directory}")
  return {n[:-len(".gin")]: algorithm_file_bindings(os.path.join(directory, n))
          for n in names}
