"""Tests of etjax.data.readers and the Debian descriptions loader."""

from __future__ import annotations

import gzip
import json
import logging
import os

import pytest

from etjax import data as etdata
from etjax.data import readers

DEBIAN_DIR = os.path.join(os.path.dirname(__file__), '..', '..', '..', 'shared', 'data',
                          'debian-descriptions')


def _write(tmp_path, name, text):
  path = tmp_path / name
  if name.endswith('.gz'):
    with gzip.open(path, 'wt', encoding='utf-8') as f:
      f.write(text)
  else:
    path.write_text(text, encoding='utf-8')
  return str(path)


def test_tsv_with_header_pairs_and_domains(tmp_path):
  path = _write(tmp_path, 'train.tsv',
                'id\tdomain\tq1\tq2\tlabel\n'
                '1\tbooks\tgood "book"\tfine book\tpos\n'
                '\n'
                '2\tdvd\tbad film\tawful film\tneg\n'
                '3\tbooks\tok\tso so\tpos\n')
  schema = etdata.Schema(text_a='q1', text_b='q2', label='label', domain='domain')
  result = etdata.read_tsv(path, schema)
  assert result.label_vocab == ('neg', 'pos')
  assert result.domain_vocab == ('books', 'dvd')
  assert result.num_rows == 3 and result.num_skipped == 0
  assert result.examples[0] == etdata.Example('good "book"', 'fine book', 1, 0, 'pos')
  assert result.examples[1] == etdata.Example('bad film', 'awful film', 0, 1, 'neg')
  assert len(result) == 3 and list(result)[2].text_b == 'so so'


def test_csv_quoting_without_header_and_given_vocab(tmp_path):
  path = _write(tmp_path, 'dev.csv',
                '"hello, world",yes\n'
                '"two\nlines",no\n'
                'plain,yes\n')
  schema = etdata.Schema(text_a=0, label=1, header=False)
  result = etdata.read_csv(path, schema, label_vocab=('no', 'yes', 'maybe'),
                           default_domain=3)
  assert [e.text_a for e in result] == ['hello, world', 'two\nlines', 'plain']
  assert [e.label for e in result] == [1, 0, 1]
  assert result.label_vocab == ('no', 'yes', 'maybe')
  assert {e.domain for e in result} == {3}


def test_jsonl_numbers_and_gzip(tmp_path):
  lines = [json.dumps({'t': 'a b', 'y': 1}), json.dumps({'t': 'c', 'y': 0}), '']
  path = _write(tmp_path, 'x.jsonl.gz', '\n'.join(lines))
  result = etdata.read_examples(path, etdata.Schema(text_a='t', label='y'))
  assert result.label_vocab == ('0', '1')
  assert [(e.text_a, e.label, e.label_str) for e in result] == [('a b', 1, '1'),
                                                               ('c', 0, '0')]


@pytest.mark.parametrize('name,text,schema,where,what', [
    ('a.tsv', 'text\tlabel\nfine\tpos\ntoo\tmany\tcols\n',
     etdata.Schema(text_a='text', label='label'), ':3:', 'expected 2 columns, got 3'),
    ('a.tsv', 'text\tlabel\nfine\tpos\n\tneg\n',
     etdata.Schema(text_a='text', label='label'), ':3:', "column 'text' (text_a) is empty"),
    ('a.jsonl', '{"t": "x", "y": "pos"}\n{"t": "x", "y": "pos"\n',
     etdata.Schema(text_a='t', label='y'), ':2:', 'bad JSON'),
    ('a.jsonl', '{"t": "x", "y": "pos"}\n{"t": "x"}\n',
     etdata.Schema(text_a='t', label='y'), ':2:', "column 'y' (label) is missing"),
    ('a.jsonl', '{"t": "x", "y": "pos"}\n[1, 2]\n',
     etdata.Schema(text_a='t', label='y'), ':2:', 'expected a JSON object'),
])
def test_malformed_rows_raise_or_skip(tmp_path, caplog, name, text, schema, where,
                                      what):
  path = _write(tmp_path, name, text)
  with pytest.raises(ValueError) as e:
    etdata.read_examples(path, schema)
  assert path + where in str(e.value) and what in str(e.value)
  with caplog.at_level(logging.WARNING, logger='etjax.data.readers'):
    result = etdata.read_examples(path, schema, on_error='skip')
  assert result.num_skipped == 1 and len(result) == 1 and result.num_rows == 2
  assert result.skipped[0][0] == int(where.strip(':'))
  assert 'skipped 1 of 2 malformed rows' in caplog.text


def test_unknown_label_and_domain(tmp_path):
  path = _write(tmp_path, 'd.tsv', 't\tl\td\nx\tpos\tbooks\ny\tmeh\tbooks\n'
                'z\tneg\ttoys\n')
  schema = etdata.Schema(text_a='t', label='l', domain='d')
  with pytest.raises(ValueError, match=r"d.tsv:3: column 'l' \(label\): unknown label "
                     r"'meh'; known labels: \['neg', 'pos'\]"):
    etdata.read_tsv(path, schema, label_vocab=('neg', 'pos'))
  result = etdata.read_tsv(path, schema, label_vocab=('neg', 'pos'),
                           domain_vocab=('books',), on_error='skip')
  assert result.num_skipped == 2 and [e.text_a for e in result] == ['x']
  assert "unknown domain 'toys'" in result.skipped[1][1]


def test_empty_files_and_bad_schema(tmp_path):
  schema = etdata.Schema(text_a='t', label='l')
  for name, text in (('e.tsv', ''), ('h.tsv', 't\tl\n'), ('e.jsonl', '\n\n')):
    path = _write(tmp_path, name, text)
    with pytest.raises(ValueError, match=f'{path}: the file has no data rows'):
      etdata.read_examples(path, schema, on_error='skip')
  path = _write(tmp_path, 'b.tsv', 't\tl\n\tx\n')
  with pytest.raises(ValueError, match='none of the 1 data rows is valid'):
    etdata.read_tsv(path, schema, on_error='skip')
  path = _write(tmp_path, 'c.tsv', 'text\tl\nx\ty\n')
  with pytest.raises(ValueError, match=r"c.tsv:1: schema text_a='t' is not a column"):
    etdata.read_tsv(path, schema)
  with pytest.raises(ValueError, match='cannot tell the format'):
    etdata.read_examples(_write(tmp_path, 'x.txt', 'a'), schema)
  with pytest.raises(ValueError, match='no such file'):
    etdata.read_tsv(str(tmp_path / 'missing.tsv'), schema)
  with pytest.raises(ValueError, match="on_error must be 'raise' or 'skip'"):
    etdata.read_tsv(path, etdata.Schema(text_a='text', label='l'), on_error='ignore')


def test_vocab_from_train_is_reused(tmp_path):
  schema = etdata.Schema(text_a='t', label='l')
  train = etdata.read_tsv(_write(tmp_path, 'tr.tsv', 't\tl\na\tz\nb\ty\n'), schema)
  dev = etdata.read_tsv(_write(tmp_path, 'dv.tsv', 't\tl\nc\tz\n'), schema,
                        label_vocab=train.label_vocab)
  assert train.label_vocab == ('y', 'z') and dev.examples[0].label == 1
  with pytest.raises(ValueError, match='label_vocab has repeated entries'):
    etdata.read_tsv(_write(tmp_path, 'd2.tsv', 't\tl\nc\tz\n'), schema,
                    label_vocab=('z', 'z'))


def test_debian_descriptions():
  # The shared data lies beside the repository for developers and CI alike.
  assert os.path.isdir(DEBIAN_DIR), f'{DEBIAN_DIR} (shared data) is missing'
  use = etdata.load_debian_descriptions(DEBIAN_DIR, 'use')
  sizes = {s: len(v) for s, v in use.splits.items()}
  assert sum(sizes.values()) == 1808  # as the data's README says
  assert set(sizes) == {'train', 'dev', 'test'} and min(sizes.values()) > 100
  assert len(use.label_vocab) == 8 and 'converting' in use.label_vocab
  assert 'text' in use.domain_vocab and 'net' in use.domain_vocab
  ex = use['train'][0]
  assert use.label_vocab[ex.label] == ex.label_str and ex.text_b is None
  assert 0 <= ex.domain < len(use.domain_vocab)
  net = etdata.load_debian_descriptions(DEBIAN_DIR, 'network')
  assert net.label_vocab == ('client', 'server')
  assert sum(len(v) for v in net.splits.values()) == 751
  with pytest.raises(ValueError, match='unknown Debian task'):
    etdata.load_debian_descriptions(DEBIAN_DIR, 'topics')


def test_row_iterator_reports_start_line_of_multiline_records(tmp_path):
  path = _write(tmp_path, 'm.csv', 't,l\n"a\nb",x\nc,y,z\n')
  rows = list(readers.iter_rows(path, 'csv', etdata.Schema(text_a='t', label='l')))
  assert [r.line for r in rows] == [2, 4] and rows[1].fields is None
