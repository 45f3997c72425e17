"""FashionBERT on synthetic image-text pairs: alignment and text-to-image retrieval,
pretrained vs the same model without pretraining, paired over seeds.

    python benchmarks/fashionbert.py                        # seeds 0 1 2, the defaults
    python benchmarks/fashionbert.py --seeds 0 --steps 200  # a quick look
    # seeds in parallel processes, then the table from their saved results:
    for s in 0 1 2; do python benchmarks/fashionbert.py --seeds $s --save /tmp/fb & done; wait
    python benchmarks/fashionbert.py --seeds 0 1 2 --load /tmp/fb

Per seed: train pairs (split 'train') and held-out pairs (split 'test') come from
etjax.data.fashion_synthetic with that seed; the model is the zoo's fashionbert-tiny
(32x32 images, 16 patches through the conv stem, 2 layers of width 64). Arms:
  - pretrained: etjax.algorithms.fashionbert_pretrain (MLM + MPM + alignment, adaptive
    loss weights) run by etjax.train.trainer.Trainer for --steps steps;
  - fixed (with --fixed): the same with constant equal weights 1, 1, 1;
  - untrained: the same initial state (same seed), no update.
Evaluation on the held-out pairs: alignment accuracy and AUC of the matched/mismatched
head (Trainer.evaluate), and text-to-image retrieval: each of --queries matched captions
ranks its own image among --candidates images of other products by the alignment
head's log P(matched); Rank@1/5/10 = fraction of queries whose image ranks within the
top 1/5/10 (chance: k / candidates).

The claim, fixed before measuring: pretraining beats no pretraining by a mean paired
gain of at least 0.15 in alignment accuracy and 0.10 in Rank@10 (with 100 candidates,
chance 0.10), each more than 3 standard errors of the paired gains above 0. The script
prints the table and whether the claim holds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

from etjax.algorithms import fashionbert_pretrain as fp
from etjax.algorithms import optim
from etjax.data import fashion_synthetic as fs
from etjax.data import pipeline
from etjax.models import zoo
from etjax.train.trainer import Trainer

CLAIM = {"accuracy": 0.15, "rank@10": 0.10}  # minimum mean paired gains
SE_MULTIPLE = 3.0


def make_step(weighting: str, steps: int, learning_rate: float):
  model = zoo.create_model("fashionbert-tiny")
  tx = optim.make_optimizer("adamw", learning_rate=learning_rate,
                            warmup_steps=max(1, steps // 10), total_steps=steps)
  return fp.fashionbert_pretrain(
      model, tx, mask_token_id=fs.MASK_ID,
      special_token_ids=(fs.PAD_ID, fs.CLS_ID, fs.SEP_ID), weighting=weighting)


def retrieval_scores(trainer: Trainer, state, data: dict, queries: np.ndarray,
                     candidates: np.ndarray, batch_size: int) -> np.ndarray:
  """log P(matched) of every (query caption, candidate image): [Q, C]."""
  q_rows = np.repeat(queries, candidates.shape[1])
  c_rows = candidates.reshape(-1)
  pairs = {k: data[k][q_rows] for k in ("input_ids", "attention_mask", "token_type_ids")}
  pairs["pixels"] = data["pixels"][c_rows]
  pairs["labels"] = np.ones(len(q_rows), np.int32)
  pairs["domain"] = np.zeros(len(q_rows), np.int32)
  pairs["weight"] = np.ones(len(q_rows), np.float32)
  out = trainer.predict(state, pipeline.eval_batches(pairs, batch_size))
  return out["match_score"].reshape(candidates.shape)


def evaluate(trainer: Trainer, state, test: dict, retrieval, batch_size: int) -> dict:
  metrics = trainer.evaluate(state, pipeline.eval_batches(fs.model_arrays(test),
                                                          batch_size))
  queries, candidates, positive = retrieval
  scores = retrieval_scores(trainer, state, test, queries, candidates, batch_size)
  ranks = fp.retrieval_ranks(scores, positive)
  return {"accuracy": metrics["accuracy"], "auc": metrics["auc"],
          **fp.rank_at_k(ranks), "mean_rank": float(ranks.mean())}


def run_seed(seed: int, args) -> dict[str, dict]:
  train = fs.generate_pairs(args.train_pairs, seed=seed, split="train")
  test = fs.generate_pairs(args.test_pairs, seed=seed, split="test")
  retrieval = fs.retrieval_candidates(test, args.candidates, seed=seed,
                                      num_queries=args.queries)
  arms = {}
  weightings = ["adaptive"] + (["fixed"] if args.fixed else [])
  for weighting in weightings:
    step = make_step(weighting, args.steps, args.learning_rate)
    with tempfile.TemporaryDirectory() as workdir:
      trainer = Trainer(step, workdir=workdir, num_steps=args.steps, seed=seed,
                        log_every=max(1, args.steps // 4), progress=False,
                        tensorboard=False)
      start = time.time()
      result = trainer.fit(pipeline.train_iterator(fs.model_arrays(train),
                                                   args.batch_size, seed=seed))
      train_s = time.time() - start
      name = "pretrained" if weighting == "adaptive" else "fixed weights"
      arms[name] = evaluate(trainer, result.state, test, retrieval, args.eval_batch)
      arms[name]["train_s"] = train_s
      arms[name]["final_w"] = "/".join(f"{result.train_metrics.get(f'w_{t}', 0):.2f}"
                                       for t in fp.TASKS)
      if weighting == "adaptive":
        initial = trainer.init_state(fs.model_arrays(train))
        arms["untrained"] = evaluate(trainer, initial, test, retrieval, args.eval_batch)
  return arms


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--learning_rate", type=float, default=1e-3)
  parser.add_argument("--train_pairs", type=int, default=4000)
  parser.add_argument("--test_pairs", type=int, default=1000)
  parser.add_argument("--queries", type=int, default=200)
  parser.add_argument("--candidates", type=int, default=100)
  parser.add_argument("--eval_batch", type=int, default=500)
  parser.add_argument("--fixed", action="store_true",
                      help="also pretrain with fixed equal loss weights")
  parser.add_argument("--save", help="write each seed's results to SAVE/seed_N.json")
  parser.add_argument("--load", help="read the seeds' results from LOAD/ (no training)")
  args = parser.parse_args(argv)
  results = {}
  for seed in args.seeds:
    if args.load:
      with open(os.path.join(args.load, f"seed_{seed}.json")) as f:
        results[seed] = json.load(f)
    else:
      results[seed] = run_seed(seed, args)
    if args.save:
      os.makedirs(args.save, exist_ok=True)
      with open(os.path.join(args.save, f"seed_{seed}.json"), "w") as f:
        json.dump(results[seed], f)
    print(f"seed {seed}: " + "; ".join(
        f"{arm} " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in m.items())
        for arm, m in results[seed].items()), flush=True)
  columns = ("accuracy", "auc", "rank@1", "rank@5", "rank@10", "mean_rank")
  print("\n| arm | " + " | ".join(columns) + " |\n" + "|---" * (len(columns) + 1) + "|")
  for arm in results[args.seeds[0]]:
    cells = []
    for c in columns:
      values = np.array([results[s][arm][c] for s in args.seeds])
      cells.append(f"{values.mean():.3f}" + (f" +- {values.std(ddof=1) / np.sqrt(len(values)):.3f}"
                                             if len(values) > 1 else ""))
    print(f"| {arm} | " + " | ".join(cells) + " |")
  chance = {"rank@1": 1 / args.candidates, "rank@5": 5 / args.candidates,
            "rank@10": 10 / args.candidates}
  print(f"\nchance: accuracy 0.5, " + ", ".join(f"{k} {v:.2f}" for k, v in chance.items()))
  holds = True
  for metric, minimum in CLAIM.items():
    gains = np.array([results[s]["pretrained"][metric] - results[s]["untrained"][metric]
                      for s in args.seeds])
    se = gains.std(ddof=1) / np.sqrt(len(gains)) if len(gains) > 1 else float("nan")
    ok = gains.mean() >= minimum and len(gains) > 1 and gains.mean() > SE_MULTIPLE * se
    holds &= ok
    print(f"paired gain in {metric}: {gains.mean():.3f} (SE {se:.3f}, per seed "
          f"{np.round(gains, 3).tolist()}); claim >= {minimum} and > {SE_MULTIPLE} SE: "
          f"{'holds' if ok else 'FAILS'}")
  print(f"claim {'holds' if holds else 'does not hold'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
