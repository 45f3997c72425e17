"""AppZoo tables derived from the human-labelled Debian package descriptions.

    write_tables('../shared/data/debian-descriptions', 'runs/apps_data')
    # or: python benchmarks/apps.py --write_tables=runs/apps_data

writes headerless TSVs (train and dev splits follow the data's split column, which
keeps related packages together):

- use_{train,dev}.tsv          text, use-debtag                  (classification)
- multilabel_{train,dev}.tsv   text, "section,use-debtag" (dev rows of sections
                               absent from train left out)       (multi-label)
- match_{train,dev}.tsv        text_a, text_b, 1 if both packages are in the same
                               archive section else 0 (balanced)  (matching)
- tags_{train,dev}.tsv         words, BIO tags (rows with an entity, and every
                               fourth row without one)           (sequence labeling)
- qa_{train,dev}.tsv           question, context, answer, earlier answers ('||')
                                                                  (comprehension)

Labels of the first three are people's (debtags, archive sections). The tags and the
question-answer pairs are marked by the documented rules below on the real text, so
no app is scored on text it generated:

- URL: a word starting with http://, https://, ftp:// or www.
- VERSION: a number with at least one dot (2.0, 1.2.3), optionally v-prefixed;
- PROTOCOL: one of PROTOCOLS (case-insensitive, the whole word);
- FORMAT: one of FORMATS (file formats, case-insensitive, the whole word).
Words are the whitespace-split text with leading/trailing punctuation split off.
A question asks for the first entity of a kind in the context ("which protocol is
mentioned ?"); the HAE history of a question lists the answers to the earlier
questions about the same description.
"""

from __future__ import annotations

import os
import random
import re
from typing import Optional, Sequence

from etjax.data.debian import load_debian_descriptions

PROTOCOLS = frozenset(
    "http https ftp sftp ssh smtp imap pop3 dns dhcp tcp udp ip ipv4 ipv6 nfs ldap snmp "
    "xmpp irc sip rtp tls ssl telnet rsync smb cifs ntp bittorrent icmp vpn ppp "
    "kerberos radius mqtt webdav gopher nntp uucp".split())
FORMATS = frozenset(
    "png jpeg jpg gif tiff bmp svg pdf postscript xml json yaml csv html xhtml css mp3 "
    "ogg flac wav avi mpeg mp4 tex latex rtf odf utf-8 ascii unicode zip gzip bzip2 tar "
    "iso sql markdown".split())
_URL = re.compile(r"^(https?://|ftp://|www\.)\S+$", re.IGNORECASE)
_VERSION = re.compile(r"^v?\d+(\.\d+)+$", re.IGNORECASE)
_PUNCT = "()[]{},;:.!?\"'`*"
QUESTIONS = {"URL": "what is the web address ?", "VERSION": "which version is mentioned ?",
             "PROTOCOL": "which protocol is mentioned ?",
             "FORMAT": "which file format is mentioned ?"}


def words_of(text: str, max_words: Optional[int] = None) -> list[str]:
  """Whitespace words with leading/trailing punctuation as words of their own."""
  out = []
  for raw in text.split():
    lead = len(raw) - len(raw.lstrip(_PUNCT))
    core = raw.strip(_PUNCT)
    trail = raw[lead + len(core):] if core else ""
    out += list(raw[:lead]) if core else list(raw)
    if core:
      out.append(core)
      out += list(trail)
  return out[:max_words] if max_words else out


def kind_of(word: str) -> Optional[str]:
  """The entity kind the rules give one word, or None."""
  if _URL.match(word):
    return "URL"
  if _VERSION.match(word):
    return "VERSION"
  if word.lower() in PROTOCOLS:
    return "PROTOCOL"
  if word.lower() in FORMATS:
    return "FORMAT"
  return None


def tag_words(words: Sequence[str]) -> list[str]:
  """BIO tags of the rules (each entity is one word, so every tag is B- or O)."""
  return [f"B-{k}" if (k := kind_of(w)) else "O" for w in words]


def _clean(text: str) -> str:
  return " ".join(text.replace("\t", " ").split())


def _texts(debian_dir: str) -> dict[str, list[tuple[str, str, str]]]:
  """split -> [(text, section, use-debtag)] of use.tsv.gz (train and dev)."""
  data = load_debian_descriptions(debian_dir, "use")
  return {split: [(_clean(ex.text_a), data.domain_vocab[ex.domain], ex.label_str)
                  for ex in data[split]] for split in ("train", "dev")}


def match_pairs(items: Sequence[tuple[str, str, str]], num_pairs: int, seed: int,
                max_words: int) -> list[tuple[str, str, str]]:
  """Balanced pairs: half from one section (label 1), half from two (label 0)."""
  rng = random.Random(seed)
  by_section: dict[str, list[str]] = {}
  for text, section, _ in items:
    by_section.setdefault(section, []).append(" ".join(text.split()[:max_words]))
  sections = sorted(s for s, t in by_section.items() if len(t) >= 2)
  pairs = []
  for i in range(num_pairs):
    if i % 2 == 0:
      s = rng.choice(sections)
      a, b = rng.sample(by_section[s], 2)
      pairs.append((a, b, "1"))
    else:
      s1, s2 = rng.sample(sections, 2)
      pairs.append((rng.choice(by_section[s1]), rng.choice(by_section[s2]), "0"))
  return pairs


def qa_rows(items: Sequence[tuple[str, str, str]], max_words: int
            ) -> list[tuple[str, str, str, str]]:
  """Questions about the first entity of each kind in each context, in kind order;
  the history column holds the earlier answers about the same context ('-' if none)."""
  rows = []
  for text, _, _ in items:
    words = words_of(text, max_words)
    context = " ".join(words)
    firsts = {}
    for w in words:
      kind = kind_of(w)
      if kind and kind not in firsts:
        firsts[kind] = w
    history: list[str] = []
    for kind in QUESTIONS:
      if kind in firsts:
        rows.append((QUESTIONS[kind], context, firsts[kind], "||".join(history) or "-"))
        history.append(firsts[kind])
  return rows


def write_tables(debian_dir: str, out: str, *, max_words: int = 40, qa_words: int = 96,
                 match_pairs_per_split: Optional[dict] = None, seed: int = 0) -> dict:
  """Writes every table into `out`; returns {name: number of rows}."""
  os.makedirs(out, exist_ok=True)
  texts = _texts(debian_dir)
  counts = {}
  pairs = match_pairs_per_split or {"train": 1200, "dev": 300}

  def write(name, rows):
    with open(os.path.join(out, name), "w", encoding="utf-8") as f:
      for row in rows:
        f.write("\t".join(row) + "\n")
    counts[name] = len(rows)

  for split, items in texts.items():
    short = lambda t: " ".join(t.split()[:max_words])
    write(f"use_{split}.tsv", [(short(t), use) for t, _, use in items])
    # Sections only seen in dev are dropped there: a label the model never saw.
    known = {sec for _, sec, _ in texts["train"]}
    write(f"multilabel_{split}.tsv", [(short(t), f"{sec},{use}") for t, sec, use in items
                                      if sec in known])
    write(f"match_{split}.tsv", match_pairs(items, pairs[split], seed, max_words))
    # Sentences with an entity, and every fourth one without (entities are sparse).
    tag_rows, plain = [], 0
    for text, _, _ in items:
      words = words_of(text, max_words)
      tags = tag_words(words)
      if any(t != "O" for t in tags) or plain % 4 == 0:
        tag_rows.append((" ".join(words), " ".join(tags)))
      plain += all(t == "O" for t in tags)
    write(f"tags_{split}.tsv", tag_rows)
    write(f"qa_{split}.tsv", qa_rows(items, qa_words))
  return counts
