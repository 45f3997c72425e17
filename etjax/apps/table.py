"""Input and output tables of the AppZoo: headerless TSV files described by a schema.

As in EasyTransfer, a table has no header: --inputSchema names its columns in order.
A column of type int or float with length n holds n comma-separated numbers. Rows
keep their line number so every error names file and line.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np

from etjax.apps.config import Column


@dataclasses.dataclass(frozen=True)
class Row:
  """One table row: its file, 1-based line, raw strings and parsed values by name."""
  path: str
  line: int
  raw: dict
  values: dict

  @property
  def where(self) -> str:
    return f"{self.path}:{self.line}"


def _parse(path: str, line: int, column: Column, text: str) -> Any:
  if column.type == "str":
    return text
  cast = int if column.type == "int" else float
  parts = text.split(",") if column.length > 1 else [text]
  if len(parts) != column.length:
    raise ValueError(f"{path}:{line}: column {column.name!r} holds {len(parts)} values, "
                     f"the schema says {column.length}")
  try:
    values = [cast(p) for p in parts]
  except ValueError:
    raise ValueError(f"{path}:{line}: column {column.name!r} ({column.type}) has "
                     f"{text!r}") from None
  return values[0] if column.length == 1 else values


def read_table(path: str, schema: Sequence[Column]) -> list[Row]:
  """Every non-empty line of a headerless TSV as a Row; a line whose column count
  differs from the schema's fails naming file and line."""
  if not os.path.exists(path):
    raise ValueError(f"--inputTable {path}: no such file")
  rows = []
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      line = line.rstrip("\n").rstrip("\r")
      if not line.strip():
        continue
      fields = line.split("\t")
      if len(fields) != len(schema):
        raise ValueError(f"{path}:{line_no}: {len(fields)} columns, but --inputSchema "
                         f"has {len(schema)} ({', '.join(c.name for c in schema)})")
      raw = {c.name: v for c, v in zip(schema, fields)}
      values = {c.name: _parse(path, line_no, c, v) for c, v in zip(schema, fields)}
      rows.append(Row(path, line_no, raw, values))
  if not rows:
    raise ValueError(f"{path}: the table has no rows")
  return rows


def format_value(value: Any) -> str:
  """A cell of the output table: numbers as is, arrays comma-joined."""
  array = np.asarray(value)
  if array.ndim == 0:
    item = array.item()
    return f"{item:.6g}" if isinstance(item, float) else str(item)
  return ",".join(format_value(v) for v in array.reshape(-1))


def write_table(path: str, rows: Sequence[Sequence[str]]) -> None:
  """Writes rows of strings as a headerless TSV (through a temporary file)."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for row in rows:
      cells = [c.replace("\t", " ").replace("\n", " ") for c in row]
      f.write("\t".join(cells) + "\n")
  os.replace(tmp, path)
