"""Frozen settings dataclasses built from keyword dicts (a gin/algorithms/*.gin file's
bindings, a run file's overrides, a notebook's keywords): an unknown or missing name
fails naming the method and the names it knows."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, TypeVar

T = TypeVar("T")


def settings_from(cls: type[T], who: str, settings: Mapping[str, Any]) -> T:
  """`cls(**settings)` for a dataclass `cls`.

  Raises:
    ValueError: naming `who`, for names `cls` does not have or required ones missing.
  """
  fields = dataclasses.fields(cls)
  known = [f.name for f in fields]
  unknown = sorted(set(settings) - set(known))
  if unknown:
    raise ValueError(f"{who}: unknown setting(s) {unknown}; known: {known}")
  missing = [f.name for f in fields if f.name not in settings
             and f.default is dataclasses.MISSING
             and f.default_factory is dataclasses.MISSING]
  if missing:
    raise ValueError(f"{who}: missing setting(s) {missing}")
  return cls(**settings)
