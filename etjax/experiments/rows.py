"""Selecting rows and columns of a paper table, so one row runs as its own job, and
the methods' settings a table reads (gin/algorithms/*.gin, with a run file's overrides).

    etjax run --gin_file=gin/runs/table12_metadtl.gin --gin.meta_table12.methods="['metadtl']"
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional, Sequence

Settings = Mapping[str, Mapping[str, Mapping[str, Any]]]


def select(what: str, chosen: Iterable[Any], known: Sequence[Any]) -> tuple:
  """Checks a selection against the known names; returns it in the table's order.

  Args:
    what: the argument, for the error ('meta_table12.methods').
    chosen: the selected names (any iterable; a single string is refused, since
      'metaft' would otherwise read as six one-letter names).
    known: every name the table has, in its order.

  Returns:
    The selected names as a tuple, ordered as in `known`, without repeats.

  Raises:
    ValueError: an empty selection, a bare string, or a name not in `known` (the
      message lists the known ones).
  """
  if isinstance(chosen, (str, bytes)):
    raise ValueError(f"{what}: give a list of names, e.g. [{chosen!r}], not the string "
                     f"{chosen!r}; known: {list(known)}")
  chosen = list(chosen)
  unknown = [c for c in chosen if c not in known]
  if unknown:
    raise ValueError(f"{what}: unknown {unknown}; known: {list(known)}")
  if not chosen:
    raise ValueError(f"{what}: nothing selected; known: {list(known)}")
  return tuple(k for k in known if k in chosen)


def method_settings(settings: Settings, stem: str, selector: str,
                    overrides: Optional[Mapping[str, Mapping]] = None, *,
                    override_key: Optional[str] = None) -> dict:
  """gin/algorithms/<stem>.gin's bindings of `selector`, with a run file's
  overrides[override_key] ({arg: value}; the key is the table's convention: the file
  stem or the selector, default the selector) over them.

  Raises:
    ValueError: `settings` lack the file's selector (not etjax.main.algorithm_settings()).
  """
  if selector not in settings.get(stem, {}):
    raise ValueError(f"settings have no {selector}.* bindings of gin/algorithms/"
                     f"{stem}.gin (pass etjax.main.algorithm_settings())")
  key = selector if override_key is None else override_key
  return {**settings[stem][selector], **(overrides or {}).get(key, {})}


def check_overrides(what: str, overrides: Optional[Mapping], known: Iterable[str]
                    ) -> None:
  """Raises ValueError naming the overrides of `what` (a table) it does not use."""
  known = list(known)
  unknown = sorted(set(overrides or {}) - set(known))
  if unknown:
    raise ValueError(f"{what}.overrides: unknown {unknown}; known: {known}")
