"""The WordPiece vocabulary learner: hand-worked merges, Hugging Face's trainer where no
tie arises, and the same vocabulary in every process (issue 16, defect 1)."""

import json
import subprocess
import sys

import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

from etjax.data import tokenizers

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def test_hand_worked_merges():
  # aab x3, ab x2: characters a (5 starts + 3 inside = 8), ##b 5, b 5, ##a 3; pairs
  # (a,##a) 3 and (##a,##b) 3 tie, broken by text ('##a' < 'a'): ##ab first, then
  # (a,##ab) 3 -> aab, then (a,##b) 2 -> ab.
  vocab = tokenizers.learn_wordpiece_vocab({"aab": 3, "ab": 2}, 100)
  assert vocab == SPECIALS + ["a", "##b", "b", "##a", "##ab", "aab", "ab"]
  # vocab_size cuts the merges (and, below the alphabet, the rarest characters).
  assert tokenizers.learn_wordpiece_vocab({"aab": 3, "ab": 2}, 10) == vocab[:10]
  assert tokenizers.learn_wordpiece_vocab({"aab": 3, "ab": 2}, 100,
                                          min_frequency=3) == vocab[:11]


@pytest.mark.parametrize("vocab_size", [28, 31, 34, 60])
def test_same_token_set_as_huggingface_without_ties(vocab_size):
  # (28 = the 5 specials and the 23 characters.) Pair counts all differ at every
  # merge, so the order of merges is the one both
  # trainers must take; Hugging Face's breaks ties by hash-map order, this one by text.
  texts = (["ab"] * 1 + ["cd"] * 2 + ["ef"] * 4 + ["gh"] * 8 + ["ghij"] * 32 +
           ["ghi"] * 5 + ["xy"] * 3 + ["xyz"] * 64 + ["xyzq"] * 16)
  backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
  backend.normalizer = normalizers.BertNormalizer(lowercase=True)
  backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  backend.train_from_iterator(texts, trainer=trainers.WordPieceTrainer(
      vocab_size=vocab_size, special_tokens=SPECIALS, continuing_subword_prefix="##",
      show_progress=False))
  ours = tokenizers.build_wordpiece_tokenizer(texts, vocab_size)
  assert set(ours.backend.get_vocab()) == set(backend.get_vocab())


_BUILD = """
import json
from etjax.data import synthetic, tokenizers
texts = [ex.text_a for d in synthetic.DOMAINS
         for ex in synthetic.generate_reviews(d, 30, seed=0)]
tok = tokenizers.build_wordpiece_tokenizer(texts, 400)
print(json.dumps(sorted(tok.backend.get_vocab().items())))
"""


def test_same_vocabulary_ids_in_every_process():
  # Hugging Face's trainer gave another vocabulary order (and set) per process.
  runs = [subprocess.run([sys.executable, "-c", _BUILD], capture_output=True, text=True,
                         check=True).stdout for _ in range(3)]
  assert runs[0] == runs[1] == runs[2]
  assert len(json.loads(runs[0])) == 400
