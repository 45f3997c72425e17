"""`etjax predict`'s files: input read with the trained job's schema, output written
atomically with one row per input row.

The schema (saved by `train` as the workdir's schema.json, see `input_schema`) says
which columns hold text_a and, for a sentence-pair model, text_b, and whether the
training files had a header. An input file may be the training format (a header
naming the columns, a label column) or plain lines of text: a first row naming the
text_a column is recognised as a header; a single-sentence model reads text_a only;
every other column (a label, an id) is carried through to the output, so that rows can
be joined back. Blank lines stay: they get an output row with an empty prediction.

Output (TSV, or CSV when the name ends in .csv): line (1-based input line), the
carried columns, prediction, probability (of the predicted label).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from typing import Optional, Sequence

import numpy as np

from etjax.data import readers
from etjax.train import workdir as workdir_lib


def input_schema(schema: Optional[readers.Schema], pairs: bool,
                 format: Optional[str] = None) -> dict:  # pylint: disable=redefined-builtin
  """The JSON-able description of how the job's texts were read (schema.json)."""
  if schema is None:
    return {"text_a": "text_a", "text_b": "text_b" if pairs else None, "header": False,
            "pairs": pairs, "format": format}
  return {"text_a": schema.text_a, "text_b": schema.text_b, "header": schema.header,
          "pairs": pairs, "format": format}


@dataclasses.dataclass
class Inputs:
  """Rows of a prediction input file.

  Attributes:
    lines: the 1-based line of each row (blank lines included).
    texts: (text_a, text_b or None) per row, or None for a blank row.
    carried: the other columns' values per row ([] for a blank row).
    carried_names: names of the carried columns (header names, else 'column<i>').
  """
  lines: list
  texts: list
  carried: list
  carried_names: list

  def examples(self) -> list:
    """The non-blank rows as readers.Example (label 0: unknown)."""
    return [readers.Example(t[0], t[1], 0, 0, "") for t in self.texts if t is not None]


def _decoded_lines(path: str) -> list[str]:
  if not os.path.exists(path):
    raise FileNotFoundError(f"--input {path}: no such file")
  with open(path, "rb") as f:
    raw = f.read()
  lines = raw.split(b"\n")
  if lines and lines[-1] == b"":
    lines.pop()
  out = []
  for i, line in enumerate(lines, 1):
    try:
      out.append(line.decode("utf-8").rstrip("\r"))
    except UnicodeDecodeError as e:
      raise ValueError(f"{path}:{i}: not UTF-8 (byte 0x{line[e.start]:02x} at column "
                       f"{e.start + 1})") from None
  return out


def _column(where: str, col, header: Optional[list], width: int, role: str) -> int:
  if header is not None and isinstance(col, str):
    if col not in header:
      raise ValueError(f"{where}: the header {header} has no {role} column {col!r}")
    return header.index(col)
  index = col if isinstance(col, int) else (0 if role == "text_a" else 1)
  if not 0 <= index < width:
    raise ValueError(f"{where}: the {role} column {index} is outside the {width} "
                     "columns")
  return index


def read_inputs(path: str, schema: dict) -> Inputs:
  """Reads `path` (TSV; CSV if it ends in .csv; JSON objects if .jsonl/.json) by the
  saved `schema`. Raises ValueError naming file and line for a bad row."""
  lower = path[:-3] if path.endswith(".gz") else path
  if lower.endswith((".jsonl", ".json")):
    return _read_jsonl(path, schema)
  lines = _decoded_lines(path)
  if lower.endswith(".csv"):
    rows = [next(csv.reader(io.StringIO(l))) if l.strip() else None for l in lines]
  else:
    rows = [l.split("\t") if l.strip() else None for l in lines]
  text_cols = [schema.get("text_a", "text_a")]
  if schema.get("pairs"):
    text_cols.append(schema.get("text_b") or "text_b")
  first = next((i for i, r in enumerate(rows) if r is not None), None)
  if first is None:
    raise ValueError(f"{path}: no texts to predict")
  header = None
  if any(isinstance(c, str) and c in rows[first] for c in text_cols):
    header = rows[first]
  width = len(rows[first])
  where = f"{path}:{first + 1}"
  cols = [_column(where, c, header, width, role)
          for c, role in zip(text_cols, ("text_a", "text_b"))]
  if schema.get("pairs") and len(cols) < 2:
    raise ValueError(f"{where}: the model classifies sentence pairs; expected a text_b "
                     "column")
  other = [i for i in range(width) if i not in cols]
  names = [header[i] if header else f"column{i + 1}" for i in other]
  result = Inputs([], [], [], names)
  for i, row in enumerate(rows):
    if header is not None and i == first:
      continue
    result.lines.append(i + 1)
    if row is None:
      result.texts.append(None)
      result.carried.append([])
      continue
    if len(row) != width:
      raise ValueError(f"{path}:{i + 1}: expected {width} columns like line "
                       f"{first + 1}, got {len(row)}")
    texts = [row[c] for c in cols]
    result.texts.append(None if not texts[0].strip() else
                        (texts[0], texts[1] if len(texts) > 1 else None))
    result.carried.append([row[c] for c in other])
  if not any(t is not None for t in result.texts):
    raise ValueError(f"{path}: no texts to predict")
  return result


def _read_jsonl(path: str, schema: dict) -> Inputs:
  key_a = schema.get("text_a") if isinstance(schema.get("text_a"), str) else "text_a"
  key_b = schema.get("text_b") if isinstance(schema.get("text_b"), str) else "text_b"
  result = Inputs([], [], [], [])
  for i, line in enumerate(_decoded_lines(path), 1):
    result.lines.append(i)
    result.carried.append([])
    if not line.strip():
      result.texts.append(None)
      continue
    try:
      obj = json.loads(line)
    except ValueError as e:
      raise ValueError(f"{path}:{i}: bad JSON ({e})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get(key_a), str):
      raise ValueError(f"{path}:{i}: expected a JSON object with a string {key_a!r}")
    text_b = obj.get(key_b) if schema.get("pairs") else None
    result.texts.append((obj[key_a], text_b))
  return result


def check_output(path: str) -> None:
  """Fails before any work when `path`'s directory is missing or not writable."""
  directory = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"--output {path}: directory {directory} does not exist")
  if not os.access(directory, os.W_OK):
    raise PermissionError(f"--output {path}: directory {directory} is not writable")
  if os.path.isdir(path):
    raise IsADirectoryError(f"--output {path} is a directory; give a file name")


def write_predictions(path: str, inputs: Inputs, predictions: np.ndarray,
                      probabilities: np.ndarray, label_names: Sequence[str]) -> None:
  """Writes one row per input row (blank rows with empty prediction), atomically."""
  buffer = io.StringIO()
  delimiter = "," if path.endswith(".csv") else "\t"
  writer = csv.writer(buffer, delimiter=delimiter, lineterminator="\n",
                      quoting=csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE,
                      escapechar=None if delimiter == "," else "\\")
  writer.writerow(["line"] + inputs.carried_names + ["prediction", "probability"])
  k = 0
  for line, texts, carried in zip(inputs.lines, inputs.texts, inputs.carried):
    if texts is None:
      writer.writerow([line] + carried + [""] * (len(inputs.carried_names) -
                                                 len(carried)) + ["", ""])
      continue
    p = int(predictions[k])
    writer.writerow([line] + carried + [label_names[p], f"{float(probabilities[k][p]):.4f}"])
    k += 1
  assert k == len(predictions), (k, len(predictions))
  workdir_lib.write_atomic(path, buffer.getvalue())

