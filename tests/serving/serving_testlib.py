"""A tiny BERT classifier trained for a few steps, as `etjax train` leaves it in a
workdir (model.json, tokenizer, labels.json, checkpoints)."""

from __future__ import annotations

import dataclasses

MAX_LENGTH = 32
TEXTS = (
    "the plot is gripping and the characters are memorable",
    "the blender is flimsy",
    "great",
    # longer than MAX_LENGTH tokens: truncated
    " ".join(["the picture quality is sharp and the price is fair"] * 6),
    "the story is boring and predictable , avoid it , the acting is wooden and dull",
)


@dataclasses.dataclass
class Trained:
  workdir: str
  trainer: object
  state: object
  tokenizer: object
  label_names: tuple
  module: object


def train_workdir(workdir: str) -> Trained:
  from etjax import algorithms
  from etjax.data import pipeline
  from etjax.jobs import tasks
  from etjax.train.trainer import Trainer
  splits = tasks.synthetic_splits(train_size=16, eval_size=4, seed=0)
  tokenizer = tasks.make_tokenizer(None, tasks.texts_of(splits.train) + list(TEXTS), 300)
  module, _ = tasks.build_classifier(
      len(splits.label_names), model="bert-tiny",
      overrides=dict(vocab_size=tokenizer.vocab_size, num_layers=2, hidden_size=32,
                     num_heads=2, intermediate_size=64, max_position_embeddings=64))
  tx = algorithms.make_optimizer("adamw", learning_rate=3e-3, total_steps=4,
                                 warmup_steps=0)
  trainer = Trainer(algorithms.finetune(module, tx), workdir=workdir, num_steps=4,
                    keep_best_metric="accuracy", eval_every=2, progress=False,
                    tensorboard=False, log_every=2)
  tasks.save_job_assets(workdir, tokenizer, splits.label_names)
  tasks.save_model_spec(workdir, module, max_length=MAX_LENGTH, name="bert-tiny")
  encode = lambda exs: pipeline.encode_examples(exs, tokenizer, MAX_LENGTH)
  result = trainer.fit(pipeline.train_iterator(encode(splits.train), 8, seed=0),
                       pipeline.eval_batches(encode(splits.eval), 8))
  return Trained(workdir, trainer, result.state, tokenizer, splits.label_names, module)
