"""Feature-based (paper Table 8) and instance-based (paper Table 9) TL on synthetic
multi-domain data with a real domain shift, a bag-of-embeddings encoder, 3 seeds.

    python -m etjax.experiments.tl_feature_instance              # both tables, seeds 0 1 2
    python -m etjax.experiments.tl_feature_instance --table 8 --seeds 0

Table 8 (paraphrase pairs): source 'books' (2000 pairs), targets dvd, electronics,
kitchen (200 training pairs each, 500 test pairs); scores are averaged over the three
targets. Tgt-Only trains on one target, Src-Only on the source, Fine-Tune on the
source then one target; FS, SS, SS-Adv, DRSS and DRSS-Adv train once on all four
domains together (domain ids 0..3) and are evaluated per target domain. SS and DRSS
use private encoders a quarter of the shared width; DRSS adds a common output layer
to the per-domain ones (their departures from it carry the matrix-normal prior). Prec/Rec/F1
are those of the paraphrase class (the paper's @1 ranks a candidate list; a
synthetic pair has one candidate, so @1 is the pair's own decision).

Table 9 (sentiment): target 'kitchen' (100 training reviews, 200 dev, 500 test);
the source pool mixes books, dvd and electronics (700 reviews each) with 20% of its
labels flipped. Src-only trains on the pool, Tgt-only on the target, TL on both
(FullyShared), Ruder & Plank on the target plus the 700 source reviews chosen by
optuna-optimized feature weights, RTL and MGTL with reinforced selectors.

Every row is one function call with plain arguments (the gin jobs under gin/runs/
bind the same parameters). Test labels are clean; mean +- standard deviation over
the seeds. Prints markdown.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

import jax
import numpy as np
import optax

from etjax.algorithms import feature_based as fb
from etjax.algorithms import finetune, instance_based as ib, make_optimizer
from etjax.algorithms import ruder_plank as rp
from etjax.models.bag import BagOfEmbeddings
from etjax.data import build_wordpiece_tokenizer, encode_examples, synthetic
from etjax.experiments.rows import select
from etjax.models import SequenceClassifier
from etjax.train import metrics as metrics_lib

MAX_LENGTH = 64
HIDDEN = 64


def _encode_splits(splits, max_length, vocab_size=1000):
  """{domain: {split: encoded}} with domain ids renumbered 0..K-1 in dict order."""
  texts = [t for d in splits.values() for s in d.values() for ex in s
           for t in (ex.text_a, ex.text_b) if t is not None]
  tok = build_wordpiece_tokenizer(texts, vocab_size)
  out = {}
  for k, (domain, parts) in enumerate(splits.items()):
    out[domain] = {}
    for split, examples in parts.items():
      enc = encode_examples(examples, tok, max_length)
      enc["domain"] = np.full_like(enc["domain"], k)
      out[domain][split] = enc
  return out, tok.vocab_size


def _cat(datas):
  return {k: np.concatenate([d[k] for d in datas]) for k in datas[0]}


def _batches(data, size, seed):
  rng = np.random.default_rng(seed)
  n = len(data["labels"])
  while True:
    order = rng.permutation(n)
    for i in range(0, n - size + 1, size):
      yield {k: v[order[i:i + size]] for k, v in data.items()}


class Runner:
  """Jits each TrainStep once and reuses it across seeds and data."""

  def __init__(self):
    self._jitted = {}

  def fns(self, step):
    key = id(step)
    if key not in self._jitted:
      self._jitted[key] = (step, jax.jit(step.update), jax.jit(step.predict))
    return self._jitted[key][1:]

  def fit(self, step, batches, steps, seed, state=None):
    update, _ = self.fns(step)
    if state is None:
      state = step.init(jax.random.PRNGKey(seed), next(batches))
    for _ in range(steps):
      state, _ = update(state, next(batches))
    return state

  def logits(self, step, state, data):
    _, predict = self.fns(step)
    return np.asarray(predict(state, data)["logits"], np.float64)


def pair_scores(logits, labels):
  """Prec, Rec, F1 of class 1 at the argmax decision; ACC; AUC (percent)."""
  pred = logits.argmax(-1)
  tp = np.sum((pred == 1) & (labels == 1))
  prec = tp / max(np.sum(pred == 1), 1)
  rec = tp / max(np.sum(labels == 1), 1)
  f1 = 2 * prec * rec / max(prec + rec, 1e-12)
  return 100 * np.array([prec, rec, f1, metrics_lib.accuracy(logits, labels),
                         metrics_lib.auc(logits, labels)])


# --- Table 8 -------------------------------------------------------------------------

TABLE8_ROWS = ("Tgt-Only", "Src-Only", "Fine-Tune", "FS", "SS", "SS-Adv", "DRSS",
               "DRSS-Adv")
TARGETS8 = ("dvd", "electronics", "kitchen")


def table8(seed: int, runner: Runner, steps: int, cache: dict,
           rows: Sequence[str] = TABLE8_ROWS) -> dict:
  splits = synthetic.source_target_splits(
      "books", TARGETS8, source_sizes=(2000, 200, 500), target_sizes=(200, 200, 500),
      seed=seed, task="paraphrase")
  enc, vocab = _encode_splits(splits, MAX_LENGTH)
  key = ("t8", vocab)
  if key not in cache:
    def make_encoder():
      return BagOfEmbeddings(vocab_size=vocab, hidden_size=HIDDEN)
    adam = lambda n: make_optimizer("adamw", learning_rate=5e-3, total_steps=n,
                                    warmup_steps=0, weight_decay=0.0)
    single = finetune(SequenceClassifier(make_encoder(), 2, dropout_rate=0.1),
                      adam(steps))
    ft_target = finetune(SequenceClassifier(make_encoder(), 2, dropout_rate=0.1),
                         adam(steps // 2))
    # Private encoders narrower than the shared one: with 200 target pairs, full-width
    # private encoders overfit.
    common = dict(num_domains=4, dropout_rate=0.1, make_private_encoder=lambda:
                  BagOfEmbeddings(vocab_size=vocab, hidden_size=HIDDEN // 4))
    joint = {
        "FS": fb.fully_shared(make_encoder, adam(steps), num_domains=4,
                              dropout_rate=0.1),
        "SS": fb.shared_private(make_encoder, adam(steps), difference_weight=0.01,
                                **common),
        "SS-Adv": fb.shared_private_adv(make_encoder, adam(steps),
                                        difference_weight=0.01,
                                        adversarial_weight=0.05,
                                        grl_warmup_steps=steps // 2, **common),
        "DRSS": fb.drss(make_encoder, adam(steps), difference_weight=0.01,
                        drss_weight=1e-3, common_head=True, **common),
        "DRSS-Adv": fb.drss_adv(make_encoder, adam(steps), difference_weight=0.01,
                                drss_weight=1e-3, adversarial_weight=0.05,
                                grl_warmup_steps=steps // 2, common_head=True,
                                **common),
    }
    cache[key] = (single, ft_target, joint)
  single, ft_target, joint = cache[key]
  src = enc["books"]["train"]
  tests = {t: enc[t]["test"] for t in TARGETS8}
  scores = {row: [] for row in rows}
  if {"Src-Only", "Fine-Tune"} & set(rows):
    src_state = runner.fit(single, _batches(src, 32, seed), steps, seed)
  for t in TARGETS8:
    tgt = enc[t]["train"]
    if "Tgt-Only" in rows:
      tgt_state = runner.fit(single, _batches(tgt, 32, seed), steps, seed)
      scores["Tgt-Only"].append(pair_scores(runner.logits(single, tgt_state, tests[t]),
                                            tests[t]["labels"]))
    if "Src-Only" in rows:
      scores["Src-Only"].append(pair_scores(runner.logits(single, src_state, tests[t]),
                                            tests[t]["labels"]))
    if "Fine-Tune" in rows:
      # Fine-Tune: the source model's parameters, a fresh optimizer on the target.
      # (A fresh AdamW state is all zeros, whatever the parameters.)
      ft_state = ft_target.init(jax.random.PRNGKey(seed), tgt).replace(
          params=src_state.params)
      ft_state = runner.fit(ft_target, _batches(tgt, 32, seed), steps // 2, seed,
                            state=ft_state)
      scores["Fine-Tune"].append(pair_scores(runner.logits(ft_target, ft_state,
                                                           tests[t]),
                                             tests[t]["labels"]))
  mixed = _cat([src] + [enc[t]["train"] for t in TARGETS8])
  # Targets are small: oversample them so each batch holds every domain.
  target_rows = np.flatnonzero(mixed["domain"] > 0)
  mixed = {k: np.concatenate([v, np.repeat(v[target_rows], 2, axis=0)])
           for k, v in mixed.items()}
  for row, step in joint.items():
    if row not in rows:
      continue
    state = runner.fit(step, _batches(mixed, 32, seed), steps, seed)
    for t in TARGETS8:
      scores[row].append(pair_scores(runner.logits(step, state, tests[t]),
                                     tests[t]["labels"]))
    if row.startswith("DRSS"):
      corr = fb.domain_relationships(state)
      print(f"  seed {seed} {row} Omega correlations (books, dvd, electronics, "
            f"kitchen):\n{np.array2string(corr, precision=2)}", file=sys.stderr)
  return {row: np.mean(v, axis=0) for row, v in scores.items()}


# --- Table 9 -------------------------------------------------------------------------

TABLE9_ROWS = ("Src-only", "Tgt-only", "TL", "Ruder & Plank", "RTL", "MGTL")
SOURCES9 = ("books", "dvd", "electronics")
TARGET9 = "kitchen"


def table9(seed: int, runner: Runner, steps: int, cache: dict, trials: int,
           rows: Sequence[str] = TABLE9_ROWS) -> dict:
  sizes = {d: (700, 10, 10) for d in SOURCES9} | {TARGET9: (100, 200, 500)}
  splits = synthetic.multi_domain_splits(sizes, seed=seed, task="sentiment")
  enc, vocab = _encode_splits(splits, MAX_LENGTH)
  source = _cat([enc[d]["train"] for d in SOURCES9])
  flipped = np.random.default_rng([seed, 9]).random(len(source["labels"])) < 0.2
  source["labels"] = np.where(flipped, 1 - source["labels"], source["labels"]).astype(
      np.int32)
  source["domain"] = np.zeros_like(source["domain"])
  tgt, dev, test = (enc[TARGET9][s] for s in ("train", "dev", "test"))
  for part in (tgt, dev, test):
    part["domain"] = np.ones_like(part["domain"])
  key = ("t9", vocab)
  if key not in cache:
    clf = SequenceClassifier(BagOfEmbeddings(vocab_size=vocab, hidden_size=HIDDEN), 2,
                             dropout_rate=0.1)
    # SGD for every row: Adam's per-coordinate normalisation blurs the delayed
    # reward the selectors learn from (see etjax/algorithms/instance_based).
    sgd = make_optimizer("sgd", learning_rate=1.0, total_steps=steps, momentum=None)
    cache[key] = {
        "plain": finetune(clf, sgd),
        "RTL": ib.rtl(clf, sgd, optax.adam(1e-2), selector_hidden=16,
                      entropy_weight=0.05),
        "MGTL": ib.mgtl(clf, sgd, optax.adam(1e-2), selector_hidden=16,
                        entropy_weight=0.05, adversarial_weight=0.1,
                        immediate_weight=0.3),
    }
  steps_ = cache[key]
  plain = steps_["plain"]

  def score(step, state):
    logits = runner.logits(step, state, test)
    return 100 * np.array([metrics_lib.accuracy(logits, test["labels"]),
                           metrics_lib.auc(logits, test["labels"])])

  out = {}
  for row, data in (("Src-only", source), ("Tgt-only", tgt),
                    ("TL", _cat([source, tgt]))):
    if row in rows:
      out[row] = score(plain, runner.fit(plain, _batches(data, 32, seed), steps, seed))
  if "Ruder & Plank" in rows:
    search = rp.ruder_plank(source, tgt, dev, step=plain, vocab_size=vocab,
                            num_selected=700, num_trials=trials,
                            train_steps=steps // 2, batch_size=32, seed=seed,
                            metric="accuracy")
    chosen = _cat([{k: v[search.selected] for k, v in source.items()}, tgt])
    out["Ruder & Plank"] = score(plain, runner.fit(plain, _batches(chosen, 32, seed),
                                                   steps, seed))
  for row in ("RTL", "MGTL"):
    if row not in rows:
      continue
    step = steps_[row]
    batches = ib.instance_batches(source, tgt, dev, source_batch_size=32,
                                  target_batch_size=32, dev_batch_size=100, seed=seed)
    state = runner.fit(step, batches, steps, seed)
    out[row] = score(step, state)
    p = np.asarray(runner.fns(step)[1](state, source)["select_prob"])
    print(f"  seed {seed} {row}: expected precision of selection (clean labels) "
          f"{np.sum(p * ~flipped) / np.sum(p):.3f}, mean select prob {p.mean():.3f}",
          file=sys.stderr)
  return out


def _markdown(title, columns, rows, results):
  lines = [f"**{title}**", "", "| Method | " + " | ".join(columns) + " |",
           "|---" * (len(columns) + 1) + "|"]
  for row in rows:
    values = np.stack([r[row] for r in results])
    cells = [f"{m:.1f} ± {s:.1f}" for m, s in zip(values.mean(0), values.std(0))]
    lines.append(f"| {row} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def run_table8(seeds=(0, 1, 2), steps: int = 1500,
               rows: Sequence[str] = TABLE8_ROWS) -> str:
  """Table 8 as markdown (gin/runs/table8_feature_tl.gin binds these arguments);
  `rows` selects of TABLE8_ROWS."""
  rows = select("feature_table8.rows", rows, TABLE8_ROWS)
  runner, cache = Runner(), {}
  results = [table8(s, runner, steps, cache, rows) for s in seeds]
  return _markdown("Table 8: feature-based TL, synthetic paraphrase pairs (source books; "
                   "targets dvd, electronics, kitchen, averaged)",
                   ("Prec", "Rec", "F1", "ACC", "AUC"), rows, results)


def run_table9(seeds=(0, 1, 2), steps: int = 800, trials: int = 8,
               rows: Sequence[str] = TABLE9_ROWS) -> str:
  """Table 9 as markdown (gin/runs/table9_instance_tl.gin binds these arguments);
  `rows` selects of TABLE9_ROWS."""
  rows = select("instance_table9.rows", rows, TABLE9_ROWS)
  runner, cache = Runner(), {}
  results = [table9(s, runner, steps, cache, trials, rows) for s in seeds]
  return _markdown("Table 9: instance-based TL, synthetic sentiment (source pool "
                   "books+dvd+electronics with 20% flipped labels; target kitchen)",
                   ("ACC", "AUC"), rows, results)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--table", choices=("8", "9", "both"), default="both")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--steps8", type=int, default=1500)
  parser.add_argument("--steps9", type=int, default=800)
  parser.add_argument("--trials", type=int, default=8)
  parser.add_argument("--rows8", nargs="+", default=list(TABLE8_ROWS))
  parser.add_argument("--rows9", nargs="+", default=list(TABLE9_ROWS))
  args = parser.parse_args(argv)
  command = "python -m etjax.experiments.tl_feature_instance " + " ".join(
      sys.argv[1:] if argv is None else argv)
  start = time.time()
  print(f"Command: `{command.strip()}`; device: {jax.devices()[0].platform}, "
        f"{len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}), mean ± std.\n")
  if args.table in ("8", "both"):
    print(run_table8(args.seeds, args.steps8, args.rows8) + "\n")
  if args.table in ("9", "both"):
    print(run_table9(args.seeds, args.steps9, args.trials, args.rows9))
  print(f"\n(wall time {time.time() - start:.0f} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
