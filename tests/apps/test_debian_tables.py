"""The rules that derive tagging and comprehension tables from Debian text."""

import os

from etjax.apps import debian_tables as dt

TEXT = ("Fetches files over HTTP and FTP (see https://example.org/doc). Version 2.4.1 "
        "reads PNG, writes pdf.")


def test_words_split_off_punctuation_and_rules_tag_them():
  words = dt.words_of(TEXT)
  assert words[:6] == ["Fetches", "files", "over", "HTTP", "and", "FTP"]
  assert "(" in words and "https://example.org/doc" in words and ")." not in words
  tags = dict(zip(words, dt.tag_words(words)))
  assert tags["HTTP"] == tags["FTP"] == "B-PROTOCOL"
  assert tags["https://example.org/doc"] == "B-URL"
  assert tags["2.4.1"] == "B-VERSION" and tags["Version"] == "O"
  assert tags["PNG"] == tags["pdf"] == "B-FORMAT"
  assert tags["files"] == "O"


def test_questions_ask_for_the_first_entity_of_each_kind_with_history():
  rows = dt.qa_rows([(TEXT, "net", "downloading")], max_words=100)
  assert [(q, a, h) for q, _, a, h in rows] == [
      ("what is the web address ?", "https://example.org/doc", "-"),
      ("which version is mentioned ?", "2.4.1", "https://example.org/doc"),
      ("which protocol is mentioned ?", "HTTP", "https://example.org/doc||2.4.1"),
      ("which file format is mentioned ?", "PNG", "https://example.org/doc||2.4.1||HTTP")]
  assert all(a in context for _, context, a, _ in rows)


def test_match_pairs_are_balanced_and_labelled_by_section():
  items = [(f"text {i}", "net" if i % 2 else "utils", "x") for i in range(10)]
  sections = {t: s for t, s, _ in items}
  pairs = dt.match_pairs(items, 20, seed=0, max_words=5)
  assert sum(l == "1" for _, _, l in pairs) == 10
  for a, b, label in pairs:
    assert (sections[a] == sections[b]) == (label == "1") and a != b


def test_tables_from_the_shared_data(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  debian = os.path.join(os.path.dirname(root), "shared", "data", "debian-descriptions")
  counts = dt.write_tables(debian, str(tmp_path), match_pairs_per_split={"train": 20,
                                                                         "dev": 10})
  assert counts["use_train.tsv"] > 1000 and counts["match_dev.tsv"] == 10
  for line in open(tmp_path / "tags_dev.tsv", encoding="utf-8"):
    words, tags = line.rstrip("\n").split("\t")
    assert len(words.split()) == len(tags.split())
  labels = lambda name: {l for line in open(tmp_path / name, encoding="utf-8")
                         for l in line.rstrip("\n").split("\t")[1].split(",")}
  assert labels("multilabel_dev.tsv") <= labels("multilabel_train.tsv")
  for line in open(tmp_path / "qa_dev.tsv", encoding="utf-8"):
    _, context, answer, _ = line.rstrip("\n").split("\t")
    assert answer in context
