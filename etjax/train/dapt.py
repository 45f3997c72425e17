"""Domain-adaptive pretraining (Gururangan et al. 2020, "Don't Stop Pretraining"):
continue masked-LM pretraining of an encoder on unlabelled in-domain texts, then hand
the encoder to the next stage (fine-tuning, or any method).

    result = continue_pretraining(encoder, encoder_params, texts, tokenizer,
                                  workdir="runs/dapt", num_steps=300)
    step = algorithms.finetune(classifier, tx, pretrained={"encoder": result.params})

It runs through etjax.train.Trainer (checkpoints, exact resumption, logging) with the
MLM TrainStep of etjax.algorithms.mlm; takes plain arguments (no gin).
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional, Sequence

import jax
import numpy as np

from etjax.algorithms import mlm as mlm_lib
from etjax.algorithms.optim import make_optimizer
from etjax.algorithms.step import unbox
from etjax.data import pipeline
from etjax.models.mlm import MaskedLM
from etjax.train.trainer import Trainer


class DaptResult(NamedTuple):
  """params: the encoder's parameters after MLM (plain numpy, the tree the encoder
  module takes); head: the MLM head's; train_metrics: the last logging window's means
  (loss, masked_accuracy, ...)."""
  params: Any
  head: Any
  train_metrics: dict


def encode_texts(texts: Sequence[str], tokenizer: Any, max_length: int, *,
                 whole_word: bool = False) -> dict[str, np.ndarray]:
  """Unlabelled texts as encoded data for etjax.data.pipeline (labels and domains 0,
  weights 1), plus 'word_start' [N, L] with `whole_word`."""
  texts = [t for t in texts if t and t.strip()]
  if not texts:
    raise ValueError("continue_pretraining: no non-empty texts to pretrain on")
  data = tokenizer.encode(texts, max_length=max_length, padding="max_length")
  n = len(texts)
  data.update(labels=np.zeros(n, np.int32), domain=np.zeros(n, np.int32),
              weight=np.ones(n, np.float32))
  if whole_word:
    data["word_start"] = mlm_lib.word_starts(data["input_ids"], tokenizer)
  return data


def continue_pretraining(encoder: Any, encoder_params: Mapping, texts: Sequence[str],
                         tokenizer: Any, *, workdir: str, num_steps: int,
                         batch_size: int = 16, max_length: int = 64,
                         learning_rate: float = 5e-5, warmup_fraction: float = 0.06,
                         weight_decay: float = 0.01, mask_prob: float = 0.15,
                         whole_word: bool = False, head_params: Optional[Mapping] = None,
                         seed: int = 0, mesh: Any = None, rules: Any = "dp",
                         log_every: int = 50, progress: bool = False) -> DaptResult:
  """Masked-LM training of `encoder` on `texts`; returns its new parameters.

  Args:
    encoder: a BERT/RoBERTa/ALBERT etjax.models.Encoder.
    encoder_params: its parameters (e.g. from etjax.models.from_pretrained).
    texts: unlabelled in-domain texts.
    tokenizer: an etjax.data.tokenizers.Tokenizer with a mask token.
    workdir: checkpoints and metrics of this stage (a finished stage resumes as done).
    num_steps, batch_size, max_length: the run's size.
    learning_rate, warmup_fraction, weight_decay: AdamW with warmup and linear decay.
    mask_prob, whole_word: the masking (see etjax.algorithms.mlm).
    head_params: an MLM head to continue from (e.g. from
      models.from_pretrained(path, head='mlm')); None starts it fresh (a checkpoint
      without one, such as all-MiniLM-L6-v2).
    seed, mesh, rules, log_every, progress: as etjax.train.Trainer takes them.

  Returns:
    A DaptResult.
  """
  if tokenizer.mask_id is None:
    raise ValueError(f"tokenizer {tokenizer.source}: continued MLM pretraining needs a "
                     "mask token ([MASK] or <mask>), and this one has none")
  config = encoder.config
  if tokenizer.vocab_size > config.vocab_size:
    raise ValueError(f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} ids but "
                     f"the encoder's vocab_size is {config.vocab_size}")
  data = encode_texts(texts, tokenizer, max_length, whole_word=whole_word)
  model = MaskedLM(encoder)
  pretrained = {"encoder": dict(encoder_params)}
  if head_params is not None:
    pretrained["lm_head"] = dict(head_params)
  tx = make_optimizer("adamw", learning_rate=learning_rate, total_steps=num_steps,
                      warmup_steps=int(warmup_fraction * num_steps),
                      weight_decay=weight_decay)
  special = [i for i in (tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id)
             if i is not None]
  step = mlm_lib.mlm(model, tx, vocab_size=config.vocab_size, mask_id=tokenizer.mask_id,
                     special_ids=special, mask_prob=mask_prob, whole_word=whole_word,
                     pretrained=pretrained)
  trainer = Trainer(step, workdir=workdir, num_steps=num_steps, mesh=mesh, rules=rules,
                    seed=seed, log_every=log_every, progress=progress, tensorboard=False)
  batches = pipeline.train_iterator(data, min(batch_size, len(data["labels"])),
                                    seed=seed)
  result = trainer.fit(batches)
  params = jax.tree.map(np.asarray, unbox(jax.device_get(result.state.params)))
  return DaptResult(params=params["encoder"], head=params["lm_head"],
                    train_metrics=dict(result.train_metrics))
