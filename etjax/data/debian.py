"""Loader for the human-labelled Debian package descriptions (real multi-domain text).

The data lives outside the package (../shared/data/debian-descriptions in this
project); the caller passes its folder.
"""

from __future__ import annotations

import dataclasses
import os

from etjax.data import readers

DEBIAN_TASKS = ('use', 'network')
DEBIAN_SPLITS = ('train', 'dev', 'test')


@dataclasses.dataclass(frozen=True)
class SplitData:
  """Examples per split with the vocabularies they share.

  Attributes:
    splits: split name -> examples (file order).
    label_vocab: label strings; `Example.label` indexes into it.
    domain_vocab: domain strings; `Example.domain` indexes into it.
  """
  splits: dict[str, list[readers.Example]]
  label_vocab: tuple[str, ...]
  domain_vocab: tuple[str, ...]

  def __getitem__(self, split: str) -> list[readers.Example]:
    if split not in self.splits:
      raise KeyError(f'no split {split!r}; have {sorted(self.splits)}')
    return self.splits[split]


def load_debian_descriptions(directory: str, task: str = 'use') -> SplitData:
  """Loads the human-labelled Debian package descriptions (see that folder's README).

  Each row of `<directory>/<task>.tsv.gz` has columns split, domain (archive section),
  label (a debtag) and text. Both vocabularies are taken (sorted) over all splits, so
  ids agree between train, dev and test.

  Args:
    directory: the folder holding use.tsv.gz and network.tsv.gz.
    task: 'use' (8 classes) or 'network' (client/server).

  Returns:
    A `SplitData` with splits 'train', 'dev' and 'test'.

  Raises:
    ValueError: unknown task, missing file, or a malformed row.
  """
  if task not in DEBIAN_TASKS:
    raise ValueError(f'unknown Debian task {task!r}; expected one of {DEBIAN_TASKS}')
  path = os.path.join(directory, f'{task}.tsv.gz')
  schema = readers.Schema(text_a='text', label='label', domain='domain')
  by_split: dict[str, list[readers.Row]] = {s: [] for s in DEBIAN_SPLITS}
  all_rows = []
  # text_b='split' only makes iter_rows check that all four columns are in the header.
  header_schema = readers.Schema(text_a='text', text_b='split', label='label',
                                 domain='domain')
  for row in readers.iter_rows(path, 'tsv', header_schema):
    if row.fields is not None:
      split = row.fields['split']
      if split not in by_split:
        raise ValueError(f'{path}:{row.line}: column split: unknown split {split!r}; '
                         f'expected one of {DEBIAN_SPLITS}')
      by_split[split].append(row)
    all_rows.append(row)
  vocab = readers.rows_to_examples(path, all_rows, schema)
  splits = {
      s: readers.rows_to_examples(path, rows, schema,
                                  label_vocab=vocab.label_vocab,
                                  domain_vocab=vocab.domain_vocab).examples
      for s, rows in by_split.items()}
  return SplitData(splits=splits, label_vocab=vocab.label_vocab,
                   domain_vocab=vocab.domain_vocab)
