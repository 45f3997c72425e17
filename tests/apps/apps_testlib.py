"""Shared helpers of the AppZoo tests: tables written by the test, tiny models."""

import os

# A one-layer random BERT; its WordPiece vocabulary is learnt from the training table.
TINY_BERT = ("hidden_size=32 num_layers=1 num_heads=2 intermediate_size=64 "
             "vocab_size=300 max_position_embeddings=64")

POSITIVE = ["great fast tool , works well", "excellent reliable server , love it",
            "good simple editor , works great", "nice clean viewer , great design"]
NEGATIVE = ["bad slow tool , broken often", "awful buggy server , hate it",
            "poor clumsy editor , crashes daily", "terrible ugly viewer , broken design"]


def write(path, rows):
  """Writes rows (sequences of strings) as a headerless TSV; returns the path."""
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write("\t".join(row) + "\n")
  return str(path)


def sentiment_rows(repeat=4):
  rows = []
  for _ in range(repeat):
    rows += [(t, "pos") for t in POSITIVE] + [(t, "neg") for t in NEGATIVE]
  return rows


def read(path):
  with open(path, encoding="utf-8") as f:
    return [line.rstrip("\n").split("\t") for line in f]


def flags(tmp_path, **changes):
  """Train flags of a tiny run; `changes` override (EasyTransfer names)."""
  out = {"mode": "train", "checkpointDir": str(tmp_path / "ckpt"), "batchSize": 8,
         "sequenceLength": 16, "numEpochs": 1.0, "learningRate": 1e-3,
         "pretrainedModel": "bert-tiny", "advancedParameters": TINY_BERT}
  out.update(changes)
  return out


def exists(*parts):
  return os.path.exists(os.path.join(*parts))
