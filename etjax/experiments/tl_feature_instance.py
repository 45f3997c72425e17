"""Feature-based (paper Table 8) and instance-based (paper Table 9) TL on synthetic
multi-domain data with a real domain shift, a bag-of-embeddings encoder, 3 seeds.

    etjax run --gin_file=gin/runs/table8_feature_tl.gin
    etjax run --gin_file=gin/runs/table9_instance_tl.gin

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
(FullyShared), Ruder & Plank on the target plus the source reviews chosen by
optuna-optimized feature weights, RTL and MGTL with reinforced selectors.

Every model trains through the one Trainer (etjax.train.fit.fit_arrays). Each method's
hyperparameters are those of gin/algorithms/<method>.gin (`settings`, as
etjax.main.algorithm_settings reads them); the run files bind the experiment's own
design (seeds, steps, rows) and `overrides` of a method's settings. Test labels are
clean; mean +- standard deviation over the seeds. Returns markdown.
"""

from __future__ import annotations

import sys
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import numpy as np

from etjax.algorithms import feature_based as fb
from etjax.algorithms import finetune, instance_based as ib, make_optimizer
from etjax.algorithms.recipe import carry_params
from etjax.data import build_wordpiece_tokenizer, encode_examples, synthetic
from etjax.experiments.rows import (Settings, check_overrides, method_settings,
                                    select)
from etjax.models import SequenceClassifier
from etjax.models.bag import BagOfEmbeddings
from etjax.train import fit as fit_lib
from etjax.train import metrics as metrics_lib
from etjax.train import ruder_plank as rp
from etjax.train.trainer import Trainer

MAX_LENGTH = 64
HIDDEN = 64
BATCH = 32


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


class Fitted(NamedTuple):
  """A trained state with the Trainer that trained it (its compiled predict)."""
  trainer: Trainer
  state: Any

  def predict(self, data) -> dict:
    return self.trainer.predict(self.state, fit_lib.eval_batches(data))

  def logits(self, data) -> np.ndarray:
    return fit_lib.logits(self.trainer, self.state, data)


def _fit(step, data, num_steps: int, seed: int, batch_size=BATCH,
         start_from=None) -> Fitted:
  trainer, result = fit_lib.fit_arrays(step, data, num_steps=num_steps,
                                       batch_size=batch_size, seed=seed,
                                       start_from=start_from)
  return Fitted(trainer, result.state)


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
SINGLE8 = ("Tgt-Only", "Src-Only", "Fine-Tune")
FEATURE_FILES = {"FS": "fully_shared", "SS": "shared_private",
                 "SS-Adv": "shared_private_adv", "DRSS": "drss", "DRSS-Adv": "drss_adv"}
TARGETS8 = ("dvd", "electronics", "kitchen")


def _adam(steps: int):
  return make_optimizer("adamw", learning_rate=5e-3, total_steps=steps,
                        warmup_steps=0, weight_decay=0.0)


def _single_rows8(enc, vocab, steps, seed, rows) -> dict:
  """{row: [scores of each target]} of Tgt-Only, Src-Only and Fine-Tune."""
  def classifier():
    return SequenceClassifier(BagOfEmbeddings(vocab_size=vocab, hidden_size=HIDDEN), 2,
                              dropout_rate=0.1)
  single = finetune(classifier(), _adam(steps))
  ft_target = finetune(classifier(), _adam(steps // 2))
  scores = {row: [] for row in rows if row in SINGLE8}
  if {"Src-Only", "Fine-Tune"} & set(rows):
    source = _fit(single, enc["books"]["train"], steps, seed)
  for t in TARGETS8:
    tgt, test = enc[t]["train"], enc[t]["test"]
    fitted = {
        "Tgt-Only": lambda: _fit(single, tgt, steps, seed),
        "Src-Only": lambda: source,
        # The source model's parameters, a fresh optimizer on the target.
        "Fine-Tune": lambda: _fit(ft_target, tgt, steps // 2, seed,
                                  start_from=lambda fresh: carry_params(source.state,
                                                                        fresh))}
    for row in scores:
      scores[row].append(pair_scores(fitted[row]().logits(test), test["labels"]))
  return scores


def _feature_step(row, vocab, steps, settings, overrides):
  kwargs = method_settings(settings, FEATURE_FILES[row], "feature_tl", overrides,
                           override_key=FEATURE_FILES[row])
  if kwargs["method"] != "fully_shared":
    # Private encoders narrower than the shared one: with 200 target pairs,
    # full-width private encoders overfit.
    kwargs["make_private_encoder"] = lambda: BagOfEmbeddings(vocab_size=vocab,
                                                             hidden_size=HIDDEN // 4)
  return fb.build_feature_step(
      make_encoder=lambda: BagOfEmbeddings(vocab_size=vocab, hidden_size=HIDDEN),
      tx=_adam(steps), num_domains=1 + len(TARGETS8), **kwargs)


def _joint_rows8(enc, vocab, steps, seed, rows, settings, overrides) -> dict:
  """{row: [scores of each target]} of the methods trained on all domains at once."""
  mixed = _cat([enc["books"]["train"]] + [enc[t]["train"] for t in TARGETS8])
  # Targets are small: oversample them so each batch holds every domain.
  target_rows = np.flatnonzero(mixed["domain"] > 0)
  mixed = {k: np.concatenate([v, np.repeat(v[target_rows], 2, axis=0)])
           for k, v in mixed.items()}
  scores = {}
  for row in (r for r in rows if r in FEATURE_FILES):
    model = _fit(_feature_step(row, vocab, steps, settings, overrides), mixed, steps,
                 seed)
    scores[row] = [pair_scores(model.logits(enc[t]["test"]), enc[t]["test"]["labels"])
                   for t in TARGETS8]
    if row.startswith("DRSS"):
      corr = fb.domain_relationships(model.state)
      print(f"  seed {seed} {row} Omega correlations (books, dvd, electronics, "
            f"kitchen):\n{np.array2string(corr, precision=2)}", file=sys.stderr)
  return scores


def table8(seed: int, steps: int, rows: Sequence[str], settings: Settings,
           overrides: Optional[Mapping] = None) -> dict:
  """{row: mean over the targets of pair_scores} for one seed."""
  splits = synthetic.source_target_splits(
      "books", TARGETS8, source_sizes=(2000, 200, 500), target_sizes=(200, 200, 500),
      seed=seed, task="paraphrase")
  enc, vocab = _encode_splits(splits, MAX_LENGTH)
  scores = {**_single_rows8(enc, vocab, steps, seed, rows),
            **_joint_rows8(enc, vocab, steps, seed, rows, settings, overrides)}
  return {row: np.mean(scores[row], axis=0) for row in rows}


# --- Table 9 -------------------------------------------------------------------------

TABLE9_ROWS = ("Src-only", "Tgt-only", "TL", "Ruder & Plank", "RTL", "MGTL")
INSTANCE_FILES = {"RTL": "rtl", "MGTL": "mgtl"}
SOURCES9 = ("books", "dvd", "electronics")
TARGET9 = "kitchen"


def _table9_data(seed: int):
  """(parts {'source', 'target', 'dev'}, test, flipped [source rows], vocab size)."""
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
  return {"source": source, "target": tgt, "dev": dev}, test, flipped, vocab


def _selector_row(row, classifier, tx, parts, steps, seed, flipped, settings,
                  overrides) -> Fitted:
  """RTL or MGTL trained on {'source', 'target', 'dev'} batches."""
  kwargs = method_settings(settings, INSTANCE_FILES[row], "instance_tl", overrides,
                           override_key=INSTANCE_FILES[row])
  step = ib.build_instance_step(classifier=classifier, tx=tx, **kwargs)
  model = _fit(step, parts, steps, seed,
               batch_size={"source": BATCH, "target": BATCH, "dev": 100})
  p = model.predict(parts["source"])["select_prob"].astype(np.float64)
  print(f"  seed {seed} {row}: expected precision of selection (clean labels) "
        f"{np.sum(p * ~flipped) / np.sum(p):.3f}, mean select prob {p.mean():.3f}",
        file=sys.stderr)
  return model


def table9(seed: int, steps: int, rows: Sequence[str], settings: Settings,
           overrides: Optional[Mapping] = None) -> dict:
  """{row: [ACC, AUC] on the target's test split} for one seed."""
  parts, test, flipped, vocab = _table9_data(seed)
  source, tgt, dev = parts["source"], parts["target"], parts["dev"]
  clf = SequenceClassifier(BagOfEmbeddings(vocab_size=vocab, hidden_size=HIDDEN), 2,
                           dropout_rate=0.1)
  # SGD for every row: Adam's per-coordinate normalisation blurs the delayed
  # reward the selectors learn from (see etjax/algorithms/instance_based).
  sgd = make_optimizer("sgd", learning_rate=1.0, total_steps=steps, momentum=None)
  plain = finetune(clf, sgd)

  def score(model: Fitted):
    logits = model.logits(test)
    return 100 * np.array([metrics_lib.accuracy(logits, test["labels"]),
                           metrics_lib.auc(logits, test["labels"])])

  data = {"Src-only": source, "Tgt-only": tgt, "TL": _cat([source, tgt])}
  if "Ruder & Plank" in rows:
    search = rp.search(source, tgt, dev, step=plain, vocab_size=vocab, seed=seed,
                       **method_settings(settings, "ruder_plank", "ruder_plank",
                                         overrides, override_key="ruder_plank"))
    data["Ruder & Plank"] = _cat([{k: v[search.selected] for k, v in source.items()},
                                  tgt])
  out = {}
  for row in rows:
    if row in INSTANCE_FILES:
      out[row] = score(_selector_row(row, clf, sgd, parts, steps, seed, flipped,
                                     settings, overrides))
    else:
      out[row] = score(_fit(plain, data[row], steps, seed))
  return out


def _markdown(title, columns, rows, results):
  lines = [f"**{title}**", "", "| Method | " + " | ".join(columns) + " |",
           "|---" * (len(columns) + 1) + "|"]
  for row in rows:
    values = np.stack([r[row] for r in results])
    cells = [f"{m:.1f} ± {s:.1f}" for m, s in zip(values.mean(0), values.std(0))]
    lines.append(f"| {row} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def run_table8(*, settings: Settings, seeds=(0, 1, 2), steps: int = 1500,
               rows: Sequence[str] = TABLE8_ROWS,
               overrides: Optional[Mapping[str, Mapping]] = None) -> str:
  """Table 8 as markdown (gin/runs/table8_feature_tl.gin binds the arguments but
  `settings`, which `etjax run` passes: {file stem: {selector: {arg: value}}} of
  gin/algorithms/*.gin). `rows` selects of TABLE8_ROWS; `overrides` maps a method's
  file stem to arguments replacing its settings, e.g. {'drss': {'drss_weight': 0.01}}."""
  rows = select("feature_table8.rows", rows, TABLE8_ROWS)
  check_overrides("feature_table8", overrides, FEATURE_FILES.values())
  results = [table8(s, steps, rows, settings, overrides) for s in seeds]
  return _markdown("Table 8: feature-based TL, synthetic paraphrase pairs (source books; "
                   "targets dvd, electronics, kitchen, averaged)",
                   ("Prec", "Rec", "F1", "ACC", "AUC"), rows, results)


def run_table9(*, settings: Settings, seeds=(0, 1, 2), steps: int = 800,
               rows: Sequence[str] = TABLE9_ROWS,
               overrides: Optional[Mapping[str, Mapping]] = None) -> str:
  """Table 9 as markdown (gin/runs/table9_instance_tl.gin binds the arguments but
  `settings`; see run_table8). `rows` selects of TABLE9_ROWS; `overrides` as in
  run_table8, for 'rtl', 'mgtl' and 'ruder_plank' (e.g. {'ruder_plank':
  {'num_trials': 4}})."""
  rows = select("instance_table9.rows", rows, TABLE9_ROWS)
  check_overrides("instance_table9", overrides,
                   (*INSTANCE_FILES.values(), "ruder_plank"))
  results = [table9(s, steps, rows, settings, overrides) for s in seeds]
  return _markdown("Table 9: instance-based TL, synthetic sentiment (source pool "
                   "books+dvd+electronics with 20% flipped labels; target kitchen)",
                   ("ACC", "AUC"), rows, results)
