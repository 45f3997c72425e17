"""seqio Tasks and Mixtures over etjax's readers (the optional extra `etjax[seqio]`).

seqio brings TensorFlow, so this module imports it only when called. What it offers:

  vocab = seqio_tasks.vocabulary(tokenizer)           # an etjax Tokenizer as a seqio Vocabulary
  seqio_tasks.register_file_task('reviews', {'train': 'train.tsv', 'test': 'test.tsv'},
                                 readers.Schema(text_a='text', label='label',
                                                domain='domain'), tokenizer=tokenizer)
  seqio_tasks.register_debian_tasks('shared/data/debian-descriptions')
  examples = seqio_tasks.load_examples('debian_use', 'train')      # list[readers.Example]
  encoded = seqio_tasks.load_encoded('reviews', 'train', max_length=64)

A Task's source reads files with etjax's own reader (`readers.read_examples`, so a bad
row is named by file and line exactly as the native reader names it) and yields the raw
strings; seqio preprocessors map labels and domains to ids through fixed vocabularies
and, when the task has a tokenizer, build BERT inputs ([CLS] a [SEP] (b [SEP]),
'longest_first' truncation, padding to the sequence length) in TensorFlow. Every task's
examples carry:

  text_a, text_b, label_str, domain_str  tf.string []  (text_b '' for single texts)
  label, domain                          tf.int32 []
  input_ids, attention_mask, token_type_ids  tf.int32 [L]  (tasks with a tokenizer)

A multi-domain task also registers one task per domain (`domain_task_name`: NAME.DOMAIN) and a Mixture
`NAME.domains` over them with rates proportional to their training rows (or given).
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from etjax.data import readers, tokenizers

_RAW_KEYS = ('text_a', 'text_b', 'label_str', 'domain_str')
# Registered task or mixture name -> (label vocabulary, domain vocabulary).
_VOCABS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
_TOKEN_KEYS = ('input_ids', 'attention_mask', 'token_type_ids')


def _import_seqio():
  """Returns (seqio, tf), or raises ImportError saying how to install the extra."""
  try:
    import seqio  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("seqio support needs the optional extra: pip install "
                      "'etjax[seqio]' (it brings TensorFlow)") from e
  return seqio, tf


@functools.cache
def _vocabulary_class():
  """Defines the Vocabulary subclass once seqio is importable."""
  seqio, tf = _import_seqio()

  class TokenizerVocabulary(seqio.Vocabulary):
    """An etjax `Tokenizer` as a seqio Vocabulary: ids of word pieces, no specials.

    `encode_tf` runs the same Rust tokenizer as `Tokenizer.encode` (through
    tf.py_function), so seqio and the native pipeline agree on every id.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer):
      self.tokenizer = tokenizer
      super().__init__(extra_ids=0)

    @property
    def _base_vocab_size(self) -> int:
      return self.tokenizer.vocab_size

    @property
    def pad_id(self) -> int:
      return self.tokenizer.pad_id

    @property
    def eos_id(self) -> int:
      return self.tokenizer.sep_id

    @property
    def unk_id(self) -> int:
      return self.tokenizer.unk_id

    def _encode(self, s: str) -> list[int]:
      return self.tokenizer.word_piece_ids(s)

    def _decode(self, ids) -> str:
      return self.tokenizer.decode(ids)

    def _encode_tf(self, s):
      def encode(t):
        return np.asarray(self._encode(t.numpy().decode('utf-8')), np.int32)
      ids = tf.py_function(encode, [s], tf.int32)
      ids.set_shape([None])
      return ids

    def _decode_tf(self, ids):
      def decode(t):
        return self._decode(t.numpy().tolist())
      text = tf.py_function(decode, [ids], tf.string)
      text.set_shape([])
      return text

    def __eq__(self, other) -> bool:
      return (isinstance(other, TokenizerVocabulary) and
              self.tokenizer.backend.to_str() == other.tokenizer.backend.to_str())

    def __hash__(self) -> int:
      return hash(self.tokenizer.backend.to_str())

  return TokenizerVocabulary


def vocabulary(tokenizer: tokenizers.Tokenizer):
  """Returns `tokenizer` wrapped as a `seqio.Vocabulary` (word-piece ids, no specials)."""
  return _vocabulary_class()(tokenizer)


def pair_lengths(n_a, n_b, budget):
  """Lengths kept of a pair under 'longest_first' truncation to `budget` tokens.

  Hugging Face's rule drops one token at a time from the longer side, the first side on
  ties; this is its closed form. Works on python ints and on tf/numpy integer scalars.

  Returns:
    (kept_a, kept_b).
  """
  excess = n_a + n_b - budget
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  excess = tf.maximum(excess, 0)
  gap = tf.abs(n_a - n_b)
  from_longer = tf.minimum(excess, gap)
  rest = excess - from_longer
  a = n_a - tf.where(n_a > n_b, from_longer, 0) - (rest + 1) // 2
  b = n_b - tf.where(n_b > n_a, from_longer, 0) - rest // 2
  return a, b


def _bert_inputs_fn(tokenizer: tokenizers.Tokenizer, vocab):
  """A seqio preprocessor building BERT inputs at sequence_length['input_ids']."""
  seqio, tf = _import_seqio()

  def build(features, max_length):
    ids_a = vocab.encode_tf(features['text_a'])
    has_b = tf.strings.length(features['text_b']) > 0
    ids_b = tf.cond(has_b, lambda: vocab.encode_tf(features['text_b']),
                    lambda: tf.zeros([0], tf.int32))
    n_a, n_b = tf.size(ids_a), tf.size(ids_b)
    specials = tf.where(has_b, 3, 2)
    keep_a, keep_b = pair_lengths(n_a, n_b, max_length - specials)
    cls, sep = [tokenizer.cls_id], [tokenizer.sep_id]
    first = tf.concat([cls, ids_a[:keep_a], sep], 0)
    second = tf.cond(has_b, lambda: tf.concat([ids_b[:keep_b], sep], 0),
                     lambda: tf.zeros([0], tf.int32))
    ids = tf.concat([first, second], 0)
    pad = max_length - tf.size(ids)
    out = dict(features)
    out['input_ids'] = tf.pad(ids, [[0, pad]], constant_values=tokenizer.pad_id)
    out['attention_mask'] = tf.pad(tf.ones_like(ids), [[0, pad]])
    out['token_type_ids'] = tf.pad(
        tf.concat([tf.zeros_like(first), tf.ones_like(second)], 0), [[0, pad]])
    for k in _TOKEN_KEYS:
      out[k] = tf.ensure_shape(out[k], [max_length])
    return out

  def preprocess(dataset, sequence_length):
    if not sequence_length or not sequence_length.get('input_ids'):
      return dataset  # raw examples only (load_examples)
    max_length = int(sequence_length['input_ids'])
    if max_length < 3:
      raise ValueError(f"sequence_length['input_ids'] must be >= 3, got {max_length}")
    return dataset.map(lambda f: build(f, max_length),
                       num_parallel_calls=tf.data.AUTOTUNE)

  return preprocess


def _ids_fn(label_vocab: Sequence[str], domain_vocab: Sequence[str]):
  """A seqio preprocessor mapping label and domain strings to fixed ids."""
  _, tf = _import_seqio()

  def table(vocab):
    keys = tf.constant(list(vocab) or [''], tf.string)
    return tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(keys, tf.range(tf.size(keys))), -1)

  labels, domains = table(label_vocab), table(domain_vocab)
  has_domains = bool(domain_vocab)

  def preprocess(dataset):
    def to_ids(f):
      out = dict(f)
      out['label'] = tf.cast(labels.lookup(f['label_str']), tf.int32)
      out['domain'] = (tf.cast(domains.lookup(f['domain_str']), tf.int32)
                       if has_domains else tf.constant(0, tf.int32))
      return out
    return dataset.map(to_ids)

  return preprocess


def _raw_rows(examples: Sequence[readers.Example],
              domain_vocab: Sequence[str]) -> list[dict[str, str]]:
  """The raw strings a task's source yields, one dict per example."""
  return [{'text_a': ex.text_a, 'text_b': ex.text_b or '', 'label_str': ex.label_str,
           'domain_str': domain_vocab[ex.domain] if domain_vocab else ''}
          for ex in examples]


def _rows_source(rows_by_split: Callable[[str], list[dict[str, str]]],
                 splits: Sequence[str], counts: Mapping[str, int]):
  """A seqio FunctionDataSource over lists of raw string rows."""
  seqio, tf = _import_seqio()

  def dataset_fn(split, shuffle_files, seed=None):
    del shuffle_files, seed  # one file per split: nothing to shuffle at file level
    rows = rows_by_split(split)
    columns = {k: [r[k] for r in rows] for k in _RAW_KEYS}
    return tf.data.Dataset.from_tensor_slices(
        {k: tf.constant(v, tf.string) for k, v in columns.items()})

  return seqio.FunctionDataSource(dataset_fn, splits=list(splits),
                                  num_input_examples=dict(counts))


def _output_features(tokenizer: Optional[tokenizers.Tokenizer]):
  seqio, _ = _import_seqio()
  if tokenizer is None:
    return {}
  # Not required: without a sequence length the task yields raw examples only.
  return {'input_ids': seqio.Feature(vocabulary(tokenizer), add_eos=False,
                                     required=False)}


def domain_task_name(task: str, domain: str) -> str:
  """`TASK.DOMAIN`, with characters seqio refuses in names (e.g. '-') made '_'."""
  return task + '.' + re.sub(r'[^\w.:#]', '_', domain)


def register_rows_task(name: str, rows_by_split: Mapping[str, list[dict[str, str]]], *,
                       label_vocab: Sequence[str], domain_vocab: Sequence[str] = (),
                       tokenizer: Optional[tokenizers.Tokenizer] = None,
                       domain_mixture: bool = True,
                       domain_rates: Optional[Mapping[str, float]] = None):
  """Registers a Task over raw rows ({text_a, text_b, label_str, domain_str} each).

  With domains and `domain_mixture`, also one task per domain (`NAME.DOMAIN`) and the
  Mixture `NAME.domains` over them, rated by `domain_rates` or by training rows.
  Registering a name again replaces it (re-running a notebook cell is not an error).

  Returns:
    The seqio Task.
  """
  seqio, _ = _import_seqio()
  features = _output_features(tokenizer)
  preprocessors = [_ids_fn(label_vocab, domain_vocab)]
  if tokenizer is not None:
    preprocessors.append(_bert_inputs_fn(tokenizer, vocabulary(tokenizer)))

  def add(task_name, rows):
    seqio.TaskRegistry.remove(task_name)
    source = _rows_source(rows.__getitem__, list(rows),
                          {s: len(r) for s, r in rows.items()})
    return seqio.TaskRegistry.add(task_name, source=source, output_features=features,
                                  preprocessors=list(preprocessors))

  task = add(name, dict(rows_by_split))
  vocabs = (tuple(label_vocab), tuple(domain_vocab))
  _VOCABS[name] = vocabs
  if domain_vocab and domain_mixture:
    per_domain = {d: {s: [r for r in rows if r['domain_str'] == d]
                      for s, rows in rows_by_split.items()} for d in domain_vocab}
    for d, rows in per_domain.items():
      add(domain_task_name(name, d), rows)
      _VOCABS[domain_task_name(name, d)] = vocabs
    if domain_rates is None:
      train = 'train' if 'train' in rows_by_split else next(iter(rows_by_split))
      domain_rates = {d: len(rows[train]) for d, rows in per_domain.items()}
    unknown = sorted(set(domain_rates) - set(domain_vocab))
    if unknown:
      raise ValueError(f'domain_rates names unknown domains {unknown}; the domains are '
                       f'{list(domain_vocab)}')
    rated = [(domain_task_name(name, d), float(r)) for d, r in domain_rates.items()
             if r > 0]
    if not rated:
      raise ValueError(f'{name}: every domain rate is 0')
    seqio.MixtureRegistry.remove(f'{name}.domains')
    seqio.MixtureRegistry.add(f'{name}.domains', rated)
    _VOCABS[f'{name}.domains'] = vocabs
  return task


def vocabularies(name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(label names, domain names) of a task or mixture registered by this module; ids
  of its examples index them."""
  if name not in _VOCABS:
    raise ValueError(f'{name!r} is not a task or mixture registered through '
                     f'etjax.data.seqio_tasks; registered: {sorted(_VOCABS)}')
  return _VOCABS[name]


def register_file_task(name: str, paths: Mapping[str, str], schema: readers.Schema, *,
                       tokenizer: Optional[tokenizers.Tokenizer] = None,
                       format: Optional[str] = None,  # pylint: disable=redefined-builtin
                       on_error: str = 'raise',
                       domain_rates: Optional[Mapping[str, float]] = None):
  """Registers a CSV/TSV/JSONL dataset (one file per split) as a seqio Task.

  Label and domain vocabularies are fixed from the 'train' file (else the first split),
  sorted, as the native reader fixes them; a label of another split outside them is an
  error naming file and line.

  Args:
    name: the task name.
    paths: split name -> file.
    schema: where text_a, text_b, label and domain live.
    tokenizer: when given, examples also carry BERT inputs built with it.
    format: 'csv', 'tsv' or 'jsonl' (guessed from each file name when None).
    on_error: 'raise' or 'skip', as for `readers.read_examples`.
    domain_rates: mixing rates of the per-domain Mixture (default: training rows).

  Returns:
    The seqio Task.
  """
  if not paths:
    raise ValueError(f'{name}: no files given')
  first = 'train' if 'train' in paths else next(iter(paths))
  vocab_source = readers.read_examples(paths[first], schema, format=format,
                                       on_error=on_error)
  rows = {}
  for split, path in paths.items():
    # The native reader parses and validates each split (errors name file and line).
    read = readers.read_examples(path, schema, format=format,
                                 label_vocab=vocab_source.label_vocab,
                                 domain_vocab=vocab_source.domain_vocab or None,
                                 on_error=on_error)
    rows[split] = _raw_rows(read.examples, read.domain_vocab)
  return register_rows_task(name, rows, label_vocab=vocab_source.label_vocab,
                            domain_vocab=vocab_source.domain_vocab, tokenizer=tokenizer,
                            domain_rates=domain_rates)


def register_debian_tasks(directory: str, *,
                          tokenizer: Optional[tokenizers.Tokenizer] = None) -> list[str]:
  """Registers `debian_use` and `debian_network` (splits train/dev/test), their
  per-domain tasks and `debian_TASK.domains` Mixtures.

  Returns:
    The names of the two tasks.
  """
  from etjax.data import debian  # pylint: disable=g-import-not-at-top
  names = []
  for task in debian.DEBIAN_TASKS:
    data = debian.load_debian_descriptions(directory, task)
    rows = {split: _raw_rows(data[split], data.domain_vocab)
            for split in debian.DEBIAN_SPLITS}
    register_rows_task(f'debian_{task}', rows, label_vocab=data.label_vocab,
                       domain_vocab=data.domain_vocab, tokenizer=tokenizer)
    names.append(f'debian_{task}')
  return names


class _InMemorySourceFilter(logging.Filter):
  """Drops seqio's advice to cache FunctionDataSources before training: these sources
  are files read whole into memory, shuffled per seed, and etjax's own pipeline (which
  checkpoints its position) takes over once the examples are loaded."""

  def filter(self, record: logging.LogRecord) -> bool:
    return 'uncached FunctionDataset' not in record.getMessage()


_SOURCE_FILTER = _InMemorySourceFilter()


def _dataset(name: str, split: str, *, max_length: Optional[int], shuffle: bool,
             seed: int, num_examples: Optional[int]):
  seqio, _ = _import_seqio()
  absl_logger = logging.getLogger('absl')
  if _SOURCE_FILTER not in absl_logger.filters:
    absl_logger.addFilter(_SOURCE_FILTER)
  provider = seqio.get_mixture_or_task(name)
  lengths = {'input_ids': max_length} if max_length else None
  if isinstance(provider, seqio.Mixture):
    if num_examples is None:
      raise ValueError(f'{name} is a Mixture: give num_examples (it samples without end)')
    keys = ['label', 'domain', *_RAW_KEYS] + (list(_TOKEN_KEYS[1:]) if max_length else [])
    ds = provider.get_dataset(lengths, split=split, shuffle=True, seed=seed,
                              num_epochs=None, passthrough_features=keys,
                              log_mixing_proportions=False)
  else:
    ds = provider.get_dataset(lengths, split=split, shuffle=shuffle, seed=seed,
                              num_epochs=1 if num_examples is None else None)
  return ds.take(num_examples) if num_examples is not None else ds


def load_examples(name: str, split: str, *, num_examples: Optional[int] = None,
                  shuffle: bool = False, seed: int = 0) -> list[readers.Example]:
  """Reads a registered task (in file order unless `shuffle`) or samples a Mixture
  (`num_examples` rows, deterministic per seed) as etjax Examples.

  Returns:
    list of `readers.Example` (label and domain ids from the task's fixed vocabularies).
  """
  ds = _dataset(name, split, max_length=None, shuffle=shuffle, seed=seed,
                num_examples=num_examples)
  out = []
  for f in ds.as_numpy_iterator():
    text_b = f['text_b'].decode('utf-8')
    out.append(readers.Example(text_a=f['text_a'].decode('utf-8'),
                               text_b=text_b or None, label=int(f['label']),
                               domain=int(f['domain']),
                               label_str=f['label_str'].decode('utf-8')))
  return out


def load_encoded(name: str, split: str, max_length: int, *,
                 num_examples: Optional[int] = None, shuffle: bool = False,
                 seed: int = 0) -> dict[str, np.ndarray]:
  """The task's tokenized examples as etjax's encoded data (`pipeline.encode_examples`
  layout: input_ids, attention_mask, token_type_ids int32 [N, L]; labels, domain int32
  [N]; weight float32 [N]), ready for `pipeline.train_iterator` / `eval_batches`.
  The task must have been registered with a tokenizer.
  """
  ds = _dataset(name, split, max_length=max_length, shuffle=shuffle, seed=seed,
                num_examples=num_examples)
  rows = list(ds.as_numpy_iterator())
  if not rows:
    raise ValueError(f'{name}: split {split!r} has no examples')
  if 'input_ids' not in rows[0]:
    raise ValueError(f'{name} has no token features: register it with a tokenizer')
  data = {k: np.stack([r[k] for r in rows]).astype(np.int32) for k in _TOKEN_KEYS}
  data['labels'] = np.asarray([r['label'] for r in rows], np.int32)
  data['domain'] = np.asarray([r['domain'] for r in rows], np.int32)
  data['weight'] = np.ones(len(rows), np.float32)
  return data
