"""Cross-task data for Table 12 (MetaDTL): a source task and a target task with
different label sets, encoded for the tiny BERT classifiers of the experiments.

Two pairs, each shaped like the paper's MNLI (3-way) -> SciTail (2-way):

- 'synthetic': 3-way sentiment (negative / neutral / positive) of media reviews (books,
  dvd) as the source, 2-way polarity of goods reviews (electronics, kitchen) as the
  target (`etjax.data.synthetic.sentiment_transfer_splits`). The synthetic NLI pairs
  are not used: encoders of width 32-64 stay at chance on them.
- 'debian': the human-labelled Debian package descriptions, what a program is used for
  (use.tsv.gz, 8 classes) as the source and its network role (network.tsv.gz, client
  vs server) as the target; the files' own train/dev/test splits. Its default encoder
  is a bag of embeddings ('bag'): 2-layer BERTs trained from scratch on at most 105
  descriptions of 128 tokens predicted one class throughout (dev split, seed 0: every
  method at 40-70% around the 60.4% majority, 13 minutes a seed), while the bag learns
  the keywords (83-85% on dev from all 525 train descriptions).

Both return a `CrossTask`: the encoded source train set, the target's train set in a
seeded order (a share of p% is its first p% rows, so shares are nested), and the
target's evaluation split ('dev' for choices, 'test' for the table).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import numpy as np

import etjax
from etjax import data as data_lib
from etjax.data import synthetic

KINDS = ("synthetic", "debian")
# Model vocabulary and length per kind: every seed's tokenizer has at most VOCAB ids,
# so one compiled step serves all seeds.
SYNTHETIC_VOCAB, SYNTHETIC_LENGTH = 1000, 48
# Descriptions average ~75 words; 128 tokens keep most of each.
DEBIAN_VOCAB, DEBIAN_LENGTH = 4000, 128
DEBIAN_SUBDIR = os.path.join("shared", "data", "debian-descriptions")


@dataclasses.dataclass(frozen=True)
class CrossTask:
  """A source and a target task, encoded.

  Attributes:
    source: encoded source train set; 'domain' is the example's domain.
    target: encoded target train set in a seeded order.
    evaluation: encoded target dev or test set.
    num_labels: (source classes, target classes).
    num_domains: number of target domains ('domain' < num_domains in target).
    vocab_size, max_length: of the encoding.
    names: (source task, target task), for table captions.
    encoder: the encoder the experiments use on this pair by default ('bert' or
      'bag'; see `debian_pair`).
  """
  source: dict
  target: dict
  evaluation: dict
  num_labels: tuple[int, int]
  num_domains: int
  vocab_size: int
  max_length: int
  names: tuple[str, str]
  encoder: str = "bert"

  def share(self, percent: float, min_rows: int = 2) -> dict:
    """The first `percent`% of the target rows (at least `min_rows`)."""
    n = data_lib.num_examples(self.target)
    return data_lib.take(self.target, np.arange(max(int(round(n * percent / 100)),
                                                    min_rows)))


def _check_split(split: str) -> None:
  if split not in ("dev", "test"):
    raise ValueError(f"cross_task: evaluation split must be 'dev' or 'test', got "
                     f"{split!r}")


def _shuffled(data: dict, seed: int) -> dict:
  return data_lib.take(data, np.random.default_rng(seed).permutation(
      data_lib.num_examples(data)))


def synthetic_pair(seed: int, source_size: int = 1500, target_size: int = 2000,
                   eval_size: int = 400, split: str = "test") -> CrossTask:
  """3-way sentiment of media reviews -> 2-way polarity of goods reviews.

  Args:
    seed: draws the data and the target order.
    source_size, target_size: train examples of each task.
    eval_size: target dev or test examples (clean labels on test).
    split: which target split to evaluate on.

  Returns:
    A `CrossTask` over SYNTHETIC_VOCAB ids and SYNTHETIC_LENGTH tokens; the target's
    domains are DOMAINS indices (num_domains 4).
  """
  _check_split(split)
  sizes2 = (target_size, eval_size if split == "dev" else 0,
            eval_size if split == "test" else 0)
  splits = synthetic.sentiment_transfer_splits((source_size, 0, 0), sizes2, seed=seed)
  texts = [ex.text_a for task in splits.values() for part in task.values() for ex in part]
  tokenizer = data_lib.build_wordpiece_tokenizer(texts, vocab_size=SYNTHETIC_VOCAB)
  enc = lambda ex: data_lib.encode_examples(ex, tokenizer, SYNTHETIC_LENGTH)
  return CrossTask(source=enc(splits["sentiment3"]["train"]),
                   target=_shuffled(enc(splits["polarity"]["train"]), seed),
                   evaluation=enc(splits["polarity"][split]), num_labels=(3, 2),
                   num_domains=len(synthetic.DOMAINS), vocab_size=SYNTHETIC_VOCAB,
                   max_length=SYNTHETIC_LENGTH,
                   names=("3-way sentiment (books, dvd)",
                          "2-way polarity (electronics, kitchen)"))


def default_debian_dir() -> str:
  """../shared/data/debian-descriptions beside the repository holding etjax."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(etjax.__file__)))
  return os.path.normpath(os.path.join(repo, "..", DEBIAN_SUBDIR))


def debian_pair(seed: int, directory: Optional[str] = None,
                split: str = "test") -> CrossTask:
  """Debian 'use' (8 classes) -> Debian 'network' (client vs server).

  Args:
    seed: orders the target's train rows (the descriptions are fixed).
    directory: folder holding use.tsv.gz and network.tsv.gz (default
      `default_debian_dir()`).
    split: which network split to evaluate on.

  Returns:
    A `CrossTask` over DEBIAN_VOCAB ids (a WordPiece vocabulary learnt from both
    tasks' train descriptions only) and DEBIAN_LENGTH tokens; domains index the network
    file's archive sections.

  Raises:
    ValueError: a bad split, or no data folder.
  """
  _check_split(split)
  directory = default_debian_dir() if directory is None else directory
  if not os.path.isdir(directory):
    raise ValueError(f"cross_task: Debian data folder {directory!r} does not exist; "
                     "pass the folder holding use.tsv.gz and network.tsv.gz")
  use = data_lib.load_debian_descriptions(directory, "use")
  network = data_lib.load_debian_descriptions(directory, "network")
  texts = [ex.text_a for ex in use["train"] + network["train"]]
  tokenizer = data_lib.build_wordpiece_tokenizer(texts, vocab_size=DEBIAN_VOCAB)
  enc = lambda ex: data_lib.encode_examples(ex, tokenizer, DEBIAN_LENGTH)
  return CrossTask(source=enc(use["train"]),
                   target=_shuffled(enc(network["train"]), seed),
                   evaluation=enc(network[split]),
                   num_labels=(len(use.label_vocab), len(network.label_vocab)),
                   num_domains=len(network.domain_vocab), vocab_size=DEBIAN_VOCAB,
                   max_length=DEBIAN_LENGTH,
                   names=("Debian use (8 classes)", "Debian network (client/server)"),
                   encoder="bag")


def load(kind: str, seed: int, *, sizes: Optional[tuple[int, int, int]] = None,
         debian_dir: Optional[str] = None, split: str = "test") -> CrossTask:
  """`synthetic_pair` or `debian_pair` by name.

  Args:
    kind: 'synthetic' or 'debian'.
    seed: data seed.
    sizes: (source, target, eval) sizes, synthetic only (default 1500, 2000, 400);
      the Debian files fix their own.
    debian_dir: Debian data folder, debian only.
    split: 'dev' or 'test'.

  Raises:
    ValueError: an unknown kind, or an argument the kind does not take.
  """
  if kind == "synthetic":
    if debian_dir is not None:
      raise ValueError("cross_task: debian_dir is for kind 'debian', not 'synthetic'")
    return synthetic_pair(seed, *(sizes or (1500, 2000, 400)), split=split)
  if kind == "debian":
    if sizes is not None:
      raise ValueError(f"cross_task: the Debian files fix their sizes; got sizes "
                       f"{sizes} for kind 'debian'")
    return debian_pair(seed, debian_dir, split=split)
  raise ValueError(f"cross_task: unknown data {kind!r}; expected one of {KINDS}")
