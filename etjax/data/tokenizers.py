"""Tokenizers through the Hugging Face `tokenizers` library.

`load_tokenizer(path)` reads a tokenizer.json (any model: WordPiece, BPE, Unigram) or a
BERT vocab.txt; `build_wordpiece_tokenizer(texts, vocab_size)` trains a BERT-style
WordPiece tokenizer for models trained from scratch. Both return a `Tokenizer` whose
`encode` gives fixed-shape int32 numpy arrays in the batch-dict names of DESIGN.md,
with the ids Hugging Face's BertTokenizerFast gives (truncation 'longest_first').
"""

from __future__ import annotations

import heapq
import json
import os
from typing import Iterable, Mapping, Sequence

import numpy as np
import tokenizers as hf_tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

# Special-token spellings tried in order when no special_tokens_map.json names them.
_SPECIAL_CANDIDATES = {
    'pad_token': ('[PAD]', '<pad>'),
    'cls_token': ('[CLS]', '<s>'),
    'sep_token': ('[SEP]', '</s>'),
    'unk_token': ('[UNK]', '<unk>'),
    'mask_token': ('[MASK]', '<mask>'),
}
_BERT_SPECIALS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')


class Tokenizer:
  """A `tokenizers.Tokenizer` with its special-token ids and array-returning encode.

  Attributes:
    backend: the wrapped `tokenizers.Tokenizer` (configured per call; treat as owned).
    pad_id, cls_id, sep_id, unk_id: special-token ids; mask_id may be None.
    vocab_size: number of ids, added tokens included.
  """

  def __init__(self, backend: hf_tokenizers.Tokenizer, special_tokens: dict[str, str],
               source: str = '<memory>'):
    self.backend = backend
    self.special_tokens = dict(special_tokens)
    self.source = source
    ids = {}
    for name in ('pad_token', 'cls_token', 'sep_token', 'unk_token', 'mask_token'):
      token = special_tokens.get(name)
      token_id = None if token is None else backend.token_to_id(token)
      if token_id is None and name != 'mask_token':
        raise ValueError(f'{source}: special token {name}={token!r} is not in the '
                         'vocabulary')
      ids[name] = token_id
    self.pad_id: int = ids['pad_token']
    self.cls_id: int = ids['cls_token']
    self.sep_id: int = ids['sep_token']
    self.unk_id: int = ids['unk_token']
    self.mask_id: int | None = ids['mask_token']
    self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
    self._config = None
    self._plain = None

  def _configure(self, max_length: int, padding: str):
    config = (max_length, padding)
    if config == self._config:
      return
    if max_length < 3:
      raise ValueError(f'max_length must be >= 3 (room for [CLS] x [SEP]), got '
                       f'{max_length}')
    if padding not in ('max_length', 'longest'):
      raise ValueError(f"padding must be 'max_length' or 'longest', got {padding!r}")
    self.backend.enable_truncation(max_length, strategy='longest_first')
    self.backend.enable_padding(
        pad_id=self.pad_id, pad_token=self.special_tokens['pad_token'],
        length=max_length if padding == 'max_length' else None)
    self._config = config

  def encode(
      self,
      text_a: str | Sequence[str],
      text_b: str | Sequence[str] | None = None,
      *,
      max_length: int = 128,
      padding: str = 'max_length',
  ) -> dict[str, np.ndarray]:
    """Encodes sentences or sentence pairs: [CLS] a [SEP] (b [SEP]).

    Pairs are truncated 'longest_first' (a token from the longer side at a time), as
    Hugging Face does with truncation=True.

    Args:
      text_a: one text or a list of N texts.
      text_b: None, or the second texts (same type and length as text_a).
      max_length: length L after truncation (and padding, if 'max_length').
      padding: 'max_length' pads to L; 'longest' to the longest in the call.

    Returns:
      input_ids, attention_mask, token_type_ids: int32 arrays [N, L] ([L] for one str).
    """
    single = isinstance(text_a, str)
    texts_a = [text_a] if single else list(text_a)
    if text_b is not None:
      if isinstance(text_b, str) != single:
        raise ValueError('text_a and text_b must both be strings or both be lists')
      texts_b = [text_b] if single else list(text_b)
      if len(texts_b) != len(texts_a):
        raise ValueError(f'text_a has {len(texts_a)} texts but text_b has '
                         f'{len(texts_b)}')
      inputs = list(zip(texts_a, texts_b))
    else:
      texts_b = []
      inputs = texts_a
    for name, texts in (('text_a', texts_a), ('text_b', texts_b)):
      for i, t in enumerate(texts):
        if not isinstance(t, str):
          raise ValueError(f'{name}[{i}] is a {type(t).__name__}, not a string')
    self._configure(max_length, padding)
    if not inputs:
      empty = np.zeros((0, max_length), np.int32)
      return {'input_ids': empty, 'attention_mask': empty.copy(),
              'token_type_ids': empty.copy()}
    encodings = self.backend.encode_batch(inputs)
    out = {
        'input_ids': np.asarray([e.ids for e in encodings], np.int32),
        'attention_mask': np.asarray([e.attention_mask for e in encodings], np.int32),
        'token_type_ids': np.asarray([e.type_ids for e in encodings], np.int32),
    }
    if single:
      out = {k: v[0] for k, v in out.items()}
    return out

  def _plain_encoding(self, text: str):
    """`text` through a private copy of the backend that never pads or truncates:
    `encode` configures the shared backend's padding and truncation per call."""
    if self._plain is None:
      self._plain = type(self.backend).from_str(self.backend.to_str())
      self._plain.no_padding()
      self._plain.no_truncation()
    return self._plain.encode(text, add_special_tokens=False)

  def tokenize(self, text: str) -> list[str]:
    """Returns the word pieces of `text`, without special tokens or truncation."""
    return self._plain_encoding(text).tokens

  def word_piece_ids(self, text: str) -> list[int]:
    """Returns the ids of `text`'s word pieces, without special tokens or truncation."""
    return self._plain_encoding(text).ids

  def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = True
             ) -> str:
    """Returns the text of a 1-D id sequence (padding and specials dropped by default)."""
    return self.backend.decode([int(i) for i in ids],
                               skip_special_tokens=skip_special_tokens)

  def save(self, directory: str) -> str:
    """Writes tokenizer.json and special_tokens_map.json; returns the directory."""
    os.makedirs(directory, exist_ok=True)
    self.backend.save(os.path.join(directory, 'tokenizer.json'))
    with open(os.path.join(directory, 'special_tokens_map.json'), 'w') as f:
      json.dump(self.special_tokens, f, indent=1)
    return directory


def _read_json(path: str) -> dict:
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}:{e.lineno}: bad JSON: {e.msg}') from e


def _special_tokens(directory: str | None, vocab: dict[str, int]) -> dict[str, str]:
  """Special tokens from tokenizer_config.json / special_tokens_map.json, else guessed.

  Guessing takes the first spelling in _SPECIAL_CANDIDATES that is in `vocab`.
  """
  named: dict[str, str] = {}
  if directory is not None:
    for name in ('tokenizer_config.json', 'special_tokens_map.json'):
      path = os.path.join(directory, name)
      if os.path.exists(path):
        for key, value in _read_json(path).items():
          if key in _SPECIAL_CANDIDATES and value is not None:
            # Values are either 'tok' or {'content': 'tok', ...} (AddedToken dumps).
            named[key] = value['content'] if isinstance(value, dict) else value
  for key, candidates in _SPECIAL_CANDIDATES.items():
    if key not in named:
      found = [c for c in candidates if c in vocab]
      if found:
        named[key] = found[0]
  return named


def _bert_pipeline(backend: hf_tokenizers.Tokenizer, lowercase: bool,
                   strip_accents: bool | None, chinese_chars: bool,
                   cls: str, sep: str) -> hf_tokenizers.Tokenizer:
  """Sets BERT's normalizer, pre-tokenizer, [CLS]/[SEP] template and decoder."""
  backend.normalizer = normalizers.BertNormalizer(
      clean_text=True, handle_chinese_chars=chinese_chars,
      strip_accents=strip_accents, lowercase=lowercase)
  backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  cls_id, sep_id = backend.token_to_id(cls), backend.token_to_id(sep)
  if cls_id is None or sep_id is None:
    raise ValueError(f'the vocabulary lacks {cls!r} or {sep!r}')
  backend.post_processor = processors.TemplateProcessing(
      single=f'{cls}:0 $A:0 {sep}:0', pair=f'{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1',
      special_tokens=[(cls, cls_id), (sep, sep_id)])
  backend.decoder = decoders.WordPiece(prefix='##')
  return backend


def _from_vocab_txt(path: str, directory: str | None) -> Tokenizer:
  config = {}
  if directory is not None and os.path.exists(
      os.path.join(directory, 'tokenizer_config.json')):
    config = _read_json(os.path.join(directory, 'tokenizer_config.json'))
  vocab = {}
  with open(path, encoding='utf-8') as f:
    for i, line in enumerate(f):
      token = line.rstrip('\n')
      # BERT's loader keeps the first id of a duplicated token.
      vocab.setdefault(token, i)
  if not vocab:
    raise ValueError(f'{path}: the vocabulary is empty')
  specials = _special_tokens(directory, vocab)
  for key in ('unk_token', 'cls_token', 'sep_token'):
    if specials.get(key) not in vocab:
      raise ValueError(f'{path}: no {key} in the vocabulary (looked for '
                       f'{specials.get(key) or _SPECIAL_CANDIDATES[key]})')
  backend = hf_tokenizers.Tokenizer(models.WordPiece(
      vocab, unk_token=specials['unk_token'], max_input_chars_per_word=100))
  _bert_pipeline(backend, lowercase=bool(config.get('do_lower_case', True)),
                 strip_accents=config.get('strip_accents'),
                 chinese_chars=bool(config.get('tokenize_chinese_chars', True)),
                 cls=specials['cls_token'], sep=specials['sep_token'])
  return Tokenizer(backend, specials, source=path)


def load_tokenizer(path: str) -> Tokenizer:
  """Loads a tokenizer from a directory, a tokenizer.json or a vocab.txt.

  A directory is searched for tokenizer.json first, then vocab.txt. A vocab.txt makes
  a BERT WordPiece tokenizer that lowercases unless tokenizer_config.json beside it
  says do_lower_case false. Special tokens come from special_tokens_map.json or
  tokenizer_config.json when present, else the BERT/RoBERTa spellings found.

  Returns:
    A `Tokenizer`.

  Raises:
    ValueError: nothing loadable at `path`, or a special token missing.
  """
  if os.path.isdir(path):
    directory = path
    for name in ('tokenizer.json', 'vocab.txt'):
      if os.path.exists(os.path.join(path, name)):
        path = os.path.join(path, name)
        break
    else:
      raise ValueError(f'{directory}: no tokenizer.json or vocab.txt in this folder')
  elif os.path.exists(path):
    directory = os.path.dirname(path) or '.'
  else:
    raise ValueError(f'{path}: no such file or folder')
  if path.endswith('.json'):
    try:
      backend = hf_tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # the Rust side raises a plain Exception
      raise ValueError(f'{path}: not a tokenizers JSON file: {e}') from e
    specials = _special_tokens(directory, backend.get_vocab(with_added_tokens=True))
    return Tokenizer(backend, specials, source=path)
  return _from_vocab_txt(path, directory)


def learn_wordpiece_vocab(words: Mapping[str, int], vocab_size: int, *,
                          min_frequency: int = 1,
                          specials: Sequence[str] = _BERT_SPECIALS) -> list[str]:
  """Learns a WordPiece vocabulary by frequency-ranked pair merges, deterministically.

  The algorithm of Hugging Face's WordPieceTrainer (BPE merges over characters, a
  word-internal piece written '##piece'), with every tie broken by the pieces' text
  instead of hash-map order, so the same words give the same vocabulary, in the same
  order, in every process.

  Args:
    words: {pre-tokenized word: count}.
    vocab_size: the most tokens to return (specials included).
    min_frequency: a pair seen fewer times is not merged.
    specials: tokens placed first (ids 0..len-1).

  Returns:
    The tokens in id order: specials, characters (each also as '##c') by descending
    count (ties by text), then merged pieces in merge order.
  """
  counts = sorted(words.items())  # a fixed word order: everything below follows it
  symbols = [[w[0]] + ["##" + c for c in w[1:]] for w, _ in counts]
  char_count: dict[str, int] = {}
  for syms, (_, n) in zip(symbols, counts):
    # Every character also as a word start (as Hugging Face's alphabet has it), so a
    # new word starting with a character seen only inside words is not [UNK].
    for c in syms + [c[2:] for c in syms[1:]]:
      char_count[c] = char_count.get(c, 0) + n
  vocab = list(specials)
  vocab += sorted(char_count, key=lambda c: (-char_count[c], c))
  vocab = vocab[:vocab_size]
  known = set(vocab)
  pairs: dict[tuple[str, str], int] = {}
  where: dict[tuple[str, str], set] = {}

  def count_pairs(i: int, sign: int, changed: set) -> None:
    syms, n = symbols[i], counts[i][1]
    for pair in zip(syms, syms[1:]):
      pairs[pair] = pairs.get(pair, 0) + sign * n
      changed.add(pair)
      if sign > 0:
        where.setdefault(pair, set()).add(i)

  changed: set = set()
  for i in range(len(symbols)):
    count_pairs(i, +1, changed)
  # A max-heap by (count, then text: ties go to the smaller pair), with lazy deletion:
  # an entry whose count no longer matches is dropped when popped, and every pair
  # whose count a merge changed is pushed again with its new count.
  heap = [(-pairs[p], p) for p in changed]
  heapq.heapify(heap)
  while len(vocab) < vocab_size and heap:
    negative, pair = heapq.heappop(heap)
    if pairs.get(pair, 0) != -negative:
      continue
    if -negative < min_frequency:
      break
    a, b = pair
    merged = a + b[2:]
    if merged not in known:
      vocab.append(merged)
      known.add(merged)
    changed = set()
    for i in sorted(where.pop(pair)):
      syms, out, j = symbols[i], [], 0
      if pair not in zip(syms, syms[1:]):
        continue
      count_pairs(i, -1, changed)
      while j < len(syms):
        if j + 1 < len(syms) and syms[j] == a and syms[j + 1] == b:
          out.append(merged)
          j += 2
        else:
          out.append(syms[j])
          j += 1
      symbols[i] = out
      count_pairs(i, +1, changed)
    pairs.pop(pair, None)
    for p in changed - {pair}:
      if pairs[p] > 0:
        heapq.heappush(heap, (-pairs[p], p))
      else:
        del pairs[p]
  return vocab


def build_wordpiece_tokenizer(texts: Iterable[str], vocab_size: int, *,
                              lowercase: bool = True, min_frequency: int = 1
                              ) -> Tokenizer:
  """Trains a BERT-style WordPiece tokenizer on `texts`, deterministically.

  Ids 0..4 are [PAD], [UNK], [CLS], [SEP], [MASK]; the rest are learnt by
  `learn_wordpiece_vocab` from the words BERT's normalizer and pre-tokenizer make of
  `texts`. The same texts give the same tokenizer (same ids) in every process. On a
  small closed vocabulary (the synthetic domains) every word becomes one token.

  Returns:
    A `Tokenizer` with at most `vocab_size` ids.
  """
  if vocab_size <= len(_BERT_SPECIALS):
    raise ValueError(f'vocab_size must exceed the {len(_BERT_SPECIALS)} special '
                     f'tokens, got {vocab_size}')
  normalizer = normalizers.BertNormalizer(lowercase=lowercase)
  pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  words: dict[str, int] = {}
  for text in texts:
    for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)):
      words[word] = words.get(word, 0) + 1
  vocab = learn_wordpiece_vocab(words, vocab_size, min_frequency=min_frequency)
  backend = hf_tokenizers.Tokenizer(models.WordPiece(
      {token: i for i, token in enumerate(vocab)}, unk_token='[UNK]',
      continuing_subword_prefix='##', max_input_chars_per_word=100))
  _bert_pipeline(backend, lowercase=lowercase, strip_accents=None, chinese_chars=True,
                 cls='[CLS]', sep='[SEP]')
  specials = dict(zip(('pad_token', 'unk_token', 'cls_token', 'sep_token',
                       'mask_token'), _BERT_SPECIALS))
  return Tokenizer(backend, specials, source='build_wordpiece_tokenizer')
