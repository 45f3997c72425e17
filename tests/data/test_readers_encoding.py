"""Readers: bytes that are not UTF-8 are named by file and line and skippable; long
text fields (over csv's 128 KiB default) are read (issue 16, defect 8)."""

import gzip

import pytest

from etjax.data import readers

SCHEMA = readers.Schema(text_a="text", label="label")


@pytest.mark.parametrize("name", ["t.tsv", "t.csv", "t.tsv.gz"])
def test_non_utf8_row_is_named_and_skipped_on_request(tmp_path, name):
  sep = b"," if ".csv" in name else b"\t"
  data = (b"text" + sep + b"label\n" + b"fine" + sep + b"pos\n" + b"caf\xe9" + sep +
          b"neg\n" + b"good" + sep + b"neg\n")
  path = tmp_path / name
  if name.endswith(".gz"):
    with gzip.open(path, "wb") as f:
      f.write(data)
  else:
    path.write_bytes(data)
  with pytest.raises(ValueError, match=rf"{name}:3: not UTF-8: byte 0xe9 in field 1"):
    readers.read_examples(str(path), SCHEMA)
  result = readers.read_examples(str(path), SCHEMA, on_error="skip")
  assert [ex.text_a for ex in result] == ["fine", "good"]
  assert result.num_skipped == 1 and result.skipped[0][0] == 3


def test_non_utf8_jsonl_line_is_named(tmp_path):
  path = tmp_path / "t.jsonl"
  path.write_bytes(b'{"text": "a", "label": "x"}\n{"text": "\xff", "label": "y"}\n')
  with pytest.raises(ValueError, match=r"t.jsonl:2: not UTF-8: byte 0xff"):
    readers.read_examples(str(path), SCHEMA)
  assert len(readers.read_examples(str(path), SCHEMA, on_error="skip")) == 1


def test_a_non_utf8_header_fails_naming_it(tmp_path):
  path = tmp_path / "t.tsv"
  path.write_bytes(b"te\xffxt\tlabel\na\tb\n")
  with pytest.raises(ValueError, match=r"t.tsv:1: header not UTF-8"):
    readers.read_examples(str(path), SCHEMA, on_error="skip")


def test_long_fields_up_to_the_documented_limit(tmp_path):
  long_text = "word " * 100_000  # 500 KB, over csv's 128 KiB default
  path = tmp_path / "t.csv"
  path.write_text(f'text,label\n"{long_text}",pos\n', encoding="utf-8")
  result = readers.read_examples(str(path), SCHEMA)
  assert result[0].text_a == long_text
  too_long = "x" * (readers.FIELD_SIZE_LIMIT + 1)
  path.write_text(f'text,label\n"{too_long}",pos\n', encoding="utf-8")
  with pytest.raises(ValueError, match=r"t.csv:2: .*field limit.*16 MiB"):
    readers.read_examples(str(path), SCHEMA)
