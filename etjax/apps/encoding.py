"""Token-level encodings the AppZoo needs beyond sentence classification.

- words -> word pieces with the position of each word's FIRST sub-token (the one that
  carries the word's tag in sequence labeling);
- texts -> word pieces with character offsets (reading comprehension maps answer
  spans back to the original text through them).

Both run an independent copy of the tokenizer's backend without truncation or padding
(etjax.data.tokenizers.Tokenizer configures its backend per encode call).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import tokenizers as hf_tokenizers

from etjax.data.tokenizers import Tokenizer


def plain_backend(tokenizer: Tokenizer) -> hf_tokenizers.Tokenizer:
  """A copy of the tokenizer's backend with truncation and padding off."""
  backend = hf_tokenizers.Tokenizer.from_str(tokenizer.backend.to_str())
  backend.no_truncation()
  backend.no_padding()
  return backend


def first_subtokens(word_ids: Sequence[Optional[int]], num_words: int) -> list[int]:
  """For each word 0..num_words-1, the position of its first sub-token in a token
  sequence whose `word_ids` say which word each token came from (None: a special
  token); -1 for a word with no token there (truncated away)."""
  first = [-1] * num_words
  for position, word in enumerate(word_ids):
    if word is not None and 0 <= word < num_words and first[word] < 0:
      first[word] = position
  return first


def encode_words(tokenizer: Tokenizer, sentences: Sequence[Sequence[str]],
                 max_length: int, max_words: int) -> dict[str, np.ndarray]:
  """[CLS] pieces [SEP] of pre-split sentences, with first-sub-token positions.

  Returns:
    input_ids, attention_mask, token_type_ids: int32 [N, max_length];
    word_index: int32 [N, max_words], position of each word's first sub-token (0 where
      there is no word or it was truncated away);
    word_mask: int32 [N, max_words], 1 for words that kept their first sub-token (a
      prefix of each row).
  """
  backend = plain_backend(tokenizer)
  n = len(sentences)
  out = {k: np.zeros((n, max_length), np.int32)
         for k in ("input_ids", "attention_mask", "token_type_ids")}
  out["word_index"] = np.zeros((n, max_words), np.int32)
  out["word_mask"] = np.zeros((n, max_words), np.int32)
  for i, words in enumerate(sentences):
    ids, word_ids = [tokenizer.cls_id], [None]
    if words:
      enc = backend.encode(list(words), is_pretokenized=True, add_special_tokens=False)
      ids += enc.ids[:max_length - 2]
      word_ids += enc.word_ids[:max_length - 2]
    ids.append(tokenizer.sep_id)
    word_ids.append(None)
    out["input_ids"][i] = tokenizer.pad_id
    out["input_ids"][i, :len(ids)] = ids
    out["attention_mask"][i, :len(ids)] = 1
    first = first_subtokens(word_ids, min(len(words), max_words))
    for w, position in enumerate(first):
      if position < 0:
        break
      out["word_index"][i, w] = position
      out["word_mask"][i, w] = 1
  return out


def tokens_with_offsets(tokenizer: Tokenizer, texts: Sequence[str]
                        ) -> list[tuple[list[int], list[tuple[int, int]]]]:
  """Word-piece ids and (char start, char end) offsets of each text, no specials."""
  backend = plain_backend(tokenizer)
  encodings = backend.encode_batch(list(texts), add_special_tokens=False)
  return [(list(e.ids), [tuple(o) for o in e.offsets]) for e in encodings]
