"""Readers for labelled text in CSV, TSV and JSONL files with an explicit schema.

A `Schema` names the columns (CSV/TSV, by header name or 0-based index) or fields
(JSONL) holding text_a, the optional text_b, the label and the optional domain. Labels
and domains become integer ids through vocabularies that are either given or inferred
(sorted) from the file, and then passed on, fixed, to the dev and test files:

  train = read_examples('train.tsv', schema)
  dev = read_examples('dev.tsv', schema, label_vocab=train.label_vocab,
                      domain_vocab=train.domain_vocab)

Bad rows (wrong column count, missing or empty field, unknown label or domain, bad
JSON) raise a ValueError naming the file, line and column; with on_error='skip' they
are skipped, counted in `ReadResult.num_skipped` and reported in one logged warning.
Files may be gzip-compressed (name ending in .gz). Bytes that are not UTF-8 make their
row bad (named by file and line). A text field may hold up to FIELD_SIZE_LIMIT (16 MiB).
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import logging
import os
from typing import Iterator, Mapping, Sequence

logger = logging.getLogger(__name__)

Column = str | int

_FORMATS = ('csv', 'tsv', 'jsonl')


@dataclasses.dataclass(frozen=True)
class Example:
  """One labelled text (or text pair).

  Attributes:
    text_a: the first (or only) text.
    text_b: the second text of a pair, or None.
    label: label id in the reader's label vocabulary.
    domain: domain id (0 when the data has no domain column).
    label_str: the label as written in the file.
  """
  text_a: str
  text_b: str | None
  label: int
  domain: int
  label_str: str


@dataclasses.dataclass(frozen=True)
class Schema:
  """Where each field lives: column names or 0-based indices (CSV/TSV), field names (JSONL).

  Attributes:
    text_a: column of the first text.
    label: column of the label.
    text_b: column of the second text, or None for single texts.
    domain: column of the domain name, or None.
    header: whether a CSV/TSV file starts with a header line (ignored for JSONL).
  """
  text_a: Column
  label: Column
  text_b: Column | None = None
  domain: Column | None = None
  header: bool = True

  def fields(self) -> dict[str, Column]:
    """Returns {role: column} for the roles this schema uses."""
    out = {'text_a': self.text_a, 'label': self.label}
    if self.text_b is not None:
      out['text_b'] = self.text_b
    if self.domain is not None:
      out['domain'] = self.domain
    return out


@dataclasses.dataclass(frozen=True)
class ReadResult:
  """What a reader returns: the examples, the vocabularies used, and what was skipped.

  Attributes:
    examples: the parsed examples, in file order.
    label_vocab: label strings; `Example.label` indexes into it.
    domain_vocab: domain strings; `Example.domain` indexes into it (empty when the
      schema has no domain column and every example has the `default_domain`).
    num_rows: data rows seen (skipped ones included).
    num_skipped: rows skipped under on_error='skip'.
    skipped: (line, reason) of each skipped row.
  """
  examples: list[Example]
  label_vocab: tuple[str, ...]
  domain_vocab: tuple[str, ...]
  num_rows: int
  num_skipped: int
  skipped: tuple[tuple[int, str], ...] = ()

  def __len__(self) -> int:
    return len(self.examples)

  def __iter__(self) -> Iterator[Example]:
    return iter(self.examples)

  def __getitem__(self, i):
    return self.examples[i]


class RowError(ValueError):
  """A malformed row; the message names file, line and column."""


@dataclasses.dataclass(frozen=True)
class Row:
  """One raw data row: its 1-based line number and its fields (None if unparsable)."""
  line: int
  fields: Mapping[Column, str] | None
  error: str | None = None


# Longest text field accepted (csv's default, 128 KiB, refuses long documents).
FIELD_SIZE_LIMIT = 16 * 1024 * 1024


def _open_text(path: str) -> io.TextIOBase:
  # Undecodable bytes become lone surrogates (surrogateescape), so a bad row is
  # reported with its line, and skipped under on_error='skip', like any other bad row.
  if path.endswith('.gz'):
    return io.TextIOWrapper(gzip.open(path, 'rb'), encoding='utf-8', newline='',
                            errors='surrogateescape')
  return open(path, 'r', encoding='utf-8', newline='', errors='surrogateescape')


def _utf8_error(values) -> str | None:
  """'not UTF-8 (...)' when a decoded value holds an undecodable byte, else None."""
  for column, value in enumerate(values, 1):
    bad = next((c for c in value if '\udc80' <= c <= '\udcff'), None)
    if bad is not None:
      return (f'not UTF-8: byte 0x{ord(bad) - 0xdc00:02x} in field {column} '
              '(save the file as UTF-8)')
  return None


def guess_format(path: str) -> str:
  """Returns 'csv', 'tsv' or 'jsonl' from the file name (a trailing .gz is ignored)."""
  name = path[:-3] if path.endswith('.gz') else path
  ext = os.path.splitext(name)[1].lower().lstrip('.')
  if ext == 'json':
    ext = 'jsonl'
  if ext not in _FORMATS:
    raise ValueError(f'{path}: cannot tell the format from the extension {ext!r}; '
                     f'pass format= one of {_FORMATS}')
  return ext


def iter_rows(path: str, fmt: str, schema: Schema) -> Iterator[Row]:
  """Yields the data rows of a CSV/TSV/JSONL file as `Row`s.

  CSV/TSV rows with a header map column name -> value; without one, index -> value.
  A row whose column count differs from the header's (or the first row's), or a JSONL
  line that is not a JSON object, is yielded with `fields=None` and `error` set, so
  that the caller decides between raising and skipping.

  Raises:
    ValueError: the file is missing, or a schema column is not in the header.
  """
  if fmt not in _FORMATS:
    raise ValueError(f'{path}: unknown format {fmt!r}; expected one of {_FORMATS}')
  if not os.path.exists(path):
    raise ValueError(f'{path}: no such file')
  with _open_text(path) as f:
    if fmt == 'jsonl':
      yield from _iter_jsonl(path, f)
    else:
      yield from _iter_delimited(path, f, fmt, schema)


def _iter_jsonl(path: str, f) -> Iterator[Row]:
  for line_no, line in enumerate(f, start=1):
    if not line.strip():
      continue
    bad = _utf8_error([line])
    if bad:
      yield Row(line_no, None, bad.replace(' in field 1', ''))
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      yield Row(line_no, None, f'bad JSON ({e.msg} at column {e.colno})')
      continue
    if not isinstance(obj, dict):
      yield Row(line_no, None, f'expected a JSON object, got {type(obj).__name__}')
      continue
    yield Row(line_no, obj)


def _iter_delimited(path: str, f, fmt: str, schema: Schema) -> Iterator[Row]:
  if fmt == 'tsv':
    # TSV has no quoting: a '"' is text (Debian descriptions contain many).
    reader = csv.reader(f, delimiter='\t', quoting=csv.QUOTE_NONE)
  else:
    reader = csv.reader(f, delimiter=',')
  names: list[str] | None = None
  width: int | None = None
  prev_end = 0
  csv.field_size_limit(max(csv.field_size_limit(), FIELD_SIZE_LIMIT))
  while True:
    try:
      values = next(reader)
    except StopIteration:
      return
    except csv.Error as e:
      hint = (f' (the limit is {FIELD_SIZE_LIMIT >> 20} MiB per field: '
              'etjax.data.readers.FIELD_SIZE_LIMIT)' if 'field limit' in str(e) else '')
      raise ValueError(f'{path}:{reader.line_num}: {e}{hint}') from e
    line_no, prev_end = prev_end + 1, reader.line_num
    if not values or (len(values) == 1 and not values[0].strip()):
      continue
    bad = _utf8_error(values)
    if bad and schema.header and names is None:
      raise ValueError(f'{path}:{line_no}: header {bad}')
    if bad:
      yield Row(line_no, None, bad)
      continue
    if schema.header and names is None:
      names = values
      width = len(names)
      for role, col in schema.fields().items():
        if isinstance(col, int):
          if not 0 <= col < width:
            raise ValueError(f'{path}:{line_no}: schema {role}={col} is outside the '
                             f'{width} columns of the header')
        elif col not in names:
          raise ValueError(f'{path}:{line_no}: schema {role}={col!r} is not a column '
                           f'of the header {names}')
      continue
    if width is None:
      width = len(values)
    if len(values) != width:
      yield Row(line_no, None, f'expected {width} columns, got {len(values)}')
      continue
    fields: dict[Column, str] = dict(enumerate(values))
    if names is not None:
      fields.update(zip(names, values))
    yield Row(line_no, fields)


def _field(path: str, row: Row, role: str, col: Column) -> str:
  """Returns the non-empty string in column `col`, or raises RowError naming it."""
  assert row.fields is not None
  if col not in row.fields or row.fields[col] is None:
    raise RowError(f'{path}:{row.line}: column {col!r} ({role}) is missing')
  value = row.fields[col]
  if isinstance(value, bool):
    value = str(value).lower()
  elif isinstance(value, (int, float)):
    value = str(value)
  elif not isinstance(value, str):
    raise RowError(f'{path}:{row.line}: column {col!r} ({role}) should be a string or '
                   f'number, got {type(value).__name__}')
  if not value.strip():
    raise RowError(f'{path}:{row.line}: column {col!r} ({role}) is empty')
  return value


def _vocab(values: Sequence[str]) -> tuple[str, ...]:
  return tuple(sorted(set(values)))


def rows_to_examples(
    path: str,
    rows: Sequence[Row],
    schema: Schema,
    *,
    label_vocab: Sequence[str] | None = None,
    domain_vocab: Sequence[str] | None = None,
    default_domain: int = 0,
    on_error: str = 'raise',
) -> ReadResult:
  """Turns raw rows into a `ReadResult` (the shared core of every reader).

  Vocabularies that are None are inferred as the sorted distinct values of the valid
  rows; given ones are fixed, and a value outside them makes the row malformed.

  Raises:
    ValueError: a malformed row under on_error='raise', or no valid rows at all.
  """
  if on_error not in ('raise', 'skip'):
    raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
  fields = schema.fields()
  parsed: list[tuple[int, dict[str, str | None]]] = []
  skipped: list[tuple[int, str]] = []

  def fail(line: int, message: str):
    if on_error == 'raise':
      raise RowError(message)
    skipped.append((line, message))

  for row in rows:
    if row.fields is None:
      fail(row.line, f'{path}:{row.line}: {row.error}')
      continue
    try:
      values = {role: _field(path, row, role, col) for role, col in fields.items()}
    except RowError as e:
      fail(row.line, str(e))
      continue
    parsed.append((row.line, values))

  if label_vocab is None:
    label_vocab = _vocab([v['label'] for _, v in parsed])
  label_vocab = tuple(label_vocab)
  if 'domain' in fields and domain_vocab is None:
    domain_vocab = _vocab([v['domain'] for _, v in parsed])
  domain_vocab = tuple(domain_vocab or ())
  for name, vocab in (('label_vocab', label_vocab), ('domain_vocab', domain_vocab)):
    if len(set(vocab)) != len(vocab):
      raise ValueError(f'{name} has repeated entries: {list(vocab)}')
  label_ids = {s: i for i, s in enumerate(label_vocab)}
  domain_ids = {s: i for i, s in enumerate(domain_vocab)}

  examples = []
  for line, v in parsed:
    if v['label'] not in label_ids:
      fail(line, f'{path}:{line}: column {schema.label!r} (label): unknown label '
           f'{v["label"]!r}; known labels: {list(label_vocab)}')
      continue
    domain = default_domain
    if 'domain' in fields:
      if v['domain'] not in domain_ids:
        fail(line, f'{path}:{line}: column {schema.domain!r} (domain): unknown domain '
             f'{v["domain"]!r}; known domains: {list(domain_vocab)}')
        continue
      domain = domain_ids[v['domain']]
    examples.append(Example(text_a=v['text_a'], text_b=v.get('text_b'),
                            label=label_ids[v['label']], domain=domain,
                            label_str=v['label']))

  num_rows = len(rows)
  skipped.sort()
  if not examples:
    if num_rows == 0:
      raise ValueError(f'{path}: the file has no data rows')
    raise ValueError(f'{path}: none of the {num_rows} data rows is valid; first '
                     f'problem: {skipped[0][1]}')
  if skipped:
    logger.warning('%s: skipped %d of %d malformed rows (first: %s)', path,
                   len(skipped), num_rows, skipped[0][1])
  return ReadResult(examples=examples, label_vocab=label_vocab,
                    domain_vocab=domain_vocab, num_rows=num_rows,
                    num_skipped=len(skipped), skipped=tuple(skipped))


def read_examples(
    path: str,
    schema: Schema,
    *,
    format: str | None = None,  # pylint: disable=redefined-builtin
    label_vocab: Sequence[str] | None = None,
    domain_vocab: Sequence[str] | None = None,
    default_domain: int = 0,
    on_error: str = 'raise',
) -> ReadResult:
  """Reads a CSV, TSV or JSONL file (optionally .gz) into examples.

  Args:
    path: the file.
    schema: where text_a, text_b, label and domain live.
    format: 'csv', 'tsv' or 'jsonl'; guessed from the extension when None.
    label_vocab: the fixed label strings (id = position); inferred (sorted) if None.
    domain_vocab: the fixed domain strings; inferred if None and the schema has a
      domain column.
    default_domain: domain id of every example when the schema has no domain column
      (e.g. one file per domain).
    on_error: 'raise' (ValueError naming file, line, column) or 'skip' (count and warn).

  Returns:
    A `ReadResult` with the examples in file order.
  """
  fmt = format or guess_format(path)
  rows = list(iter_rows(path, fmt, schema))
  return rows_to_examples(path, rows, schema, label_vocab=label_vocab,
                          domain_vocab=domain_vocab, default_domain=default_domain,
                          on_error=on_error)


def read_csv(path: str, schema: Schema, **kwargs) -> ReadResult:
  """`read_examples` for a comma-separated file (RFC 4180 quoting)."""
  return read_examples(path, schema, format='csv', **kwargs)


def read_tsv(path: str, schema: Schema, **kwargs) -> ReadResult:
  """`read_examples` for a tab-separated file (no quoting)."""
  return read_examples(path, schema, format='tsv', **kwargs)


def read_jsonl(path: str, schema: Schema, **kwargs) -> ReadResult:
  """`read_examples` for a file of one JSON object per line."""
  return read_examples(path, schema, format='jsonl', **kwargs)

