"""Files for the transfer tests: a tiny random BERT saved as a Hugging Face directory
(weights, config, vocab.txt) and TSV files with two source domains and one target."""

from __future__ import annotations

import os
import random

SENTIMENT = {"positive": ["great", "love", "excellent", "fine", "happy"],
             "negative": ["awful", "hate", "broken", "poor", "sad"]}
TOPICS = {"books": ["plot", "chapter", "author"], "dvd": ["film", "scene", "actor"],
          "kitchen": ["kettle", "pan", "knife"]}
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_bert_dir(path: str, seed: int = 0) -> str:
  """A 2-layer, 32-wide random BERT with a word-level vocab.txt, as transformers
  saves it."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  words = sorted({w for ws in (*SENTIMENT.values(), *TOPICS.values()) for w in ws})
  vocab = SPECIAL + words
  torch.manual_seed(seed)
  config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=64)
  transformers.BertModel(config, add_pooling_layer=True).save_pretrained(path)
  with open(os.path.join(path, "vocab.txt"), "w") as f:
    f.write("\n".join(vocab) + "\n")
  return path


def rows(n: int, domains, seed: int) -> list[str]:
  """`n` TSV rows 'text<TAB>label<TAB>domain': topic words of the domain and
  sentiment words of the label."""
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    domain, label = rng.choice(list(domains)), rng.choice(sorted(SENTIMENT))
    words = [rng.choice(TOPICS[domain]), rng.choice(SENTIMENT[label]),
             rng.choice(TOPICS[domain]), rng.choice(SENTIMENT[label])]
    out.append(f"{' '.join(words)}\t{label}\t{domain}")
  return out


def write_tsv(path: str, lines: list[str]) -> str:
  with open(path, "w") as f:
    f.write("text\tlabel\tdomain\n" + "\n".join(lines) + "\n")
  return path


def write_files(directory: str) -> dict[str, str]:
  """train.tsv (books, dvd sources; kitchen target), dev.tsv and test.tsv (kitchen)."""
  return {
      "train": write_tsv(os.path.join(directory, "train.tsv"),
                         rows(96, ("books", "dvd", "kitchen"), seed=1)),
      "dev": write_tsv(os.path.join(directory, "dev.tsv"), rows(16, ("kitchen",), 2)),
      "test": write_tsv(os.path.join(directory, "test.tsv"), rows(32, ("kitchen",), 3)),
  }
