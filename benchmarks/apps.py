"""AppZoo on real Debian text: every app trained from its gin run file, scored on dev.

    python benchmarks/apps.py [--apps text_classify_bert,...] [--epochs_bert 0.5]
    python benchmarks/apps.py --apps sequence_labeling_bert_crf --epochs_bert 1.5 --lr_bert 2e-4

Tables come from etjax.apps.debian_tables (people's labels for classification and
matching; rule-marked tags and questions for labeling and comprehension). Each app
runs `etjax app`'s library path (etjax.apps.runner) with its gin/runs/apps file, the
number of epochs lowered for this CPU; then predicts the dev table and compares each
dev example's score with a baseline that learns nothing (the training table's most
frequent label / label set / answer; 'O' everywhere for tagging), paired per example.
The claim "learns" is made when the mean paired gain exceeds 2 standard errors
(threshold fixed before measuring). Prints one markdown row per app.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from etjax import main as etjax_main  # pylint: disable=wrong-import-position
from etjax.apps import debian_tables, metrics, registry, runner, table  # pylint: disable=wrong-import-position
from etjax.cli import configurables  # pylint: disable=wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_NOTE = {
    "use": "Debian use debtag (8 classes, people's labels)",
    "multilabel": "Debian section + use debtag (people's labels)",
    "match": "Debian pairs: same archive section? (people's labels)",
    "tags": "Debian text, rule-marked URL/VERSION/PROTOCOL/FORMAT",
    "qa": "Debian text, rule-made questions on those entities",
}


def _per_example(app, gold_rows, predicted, train_rows, cfg):
  """(model scores, baseline scores) per dev example, and the metric's name."""
  label = cfg["labelName"]
  if app.name.startswith("sequence_labeling"):
    def f1(gold, pred):
      g, p = set(metrics.get_entities(gold)), set(metrics.get_entities(pred))
      if not g and not p:
        return 1.0
      return 2 * len(g & p) / (len(g) + len(p))
    gold = [r.values[label].split() for r in gold_rows]
    return ([f1(g, p.split()) for g, p in zip(gold, predicted)],
            [f1(g, ["O"] * len(g)) for g in gold], "entity F1 per sentence")
  if app.name.startswith("text_comprehension"):
    common = collections.Counter(r.values[label] for r in train_rows).most_common(1)[0][0]
    gold = [r.values[label] for r in gold_rows]
    return ([metrics.token_f1(p, g) for p, g in zip(predicted, gold)],
            [metrics.token_f1(common, g) for g in gold], "SQuAD F1 per question")
  if app.name.endswith("multilabel"):
    sets = lambda v: frozenset(x for x in v.split(",") if x)
    common = collections.Counter(sets(r.values[label]) for r in train_rows
                                 ).most_common(1)[0][0]
    def f1(g, p):
      return 2 * len(g & p) / max(1, len(g) + len(p))
    gold = [sets(r.values[label]) for r in gold_rows]
    return ([f1(g, sets(p)) for g, p in zip(gold, predicted)],
            [f1(g, common) for g in gold], "label-set F1 per row")
  common = collections.Counter(r.values[label] for r in train_rows).most_common(1)[0][0]
  gold = [r.values[label] for r in gold_rows]
  return ([float(p == g) for p, g in zip(predicted, gold)],
          [float(common == g) for g in gold], "accuracy")


def run_app(name: str, data_dir: str, work: str, epochs_bert: float,
            epochs_words: float, length_bert: int = 0, lr_bert: float = 0.0) -> dict:
  etjax_main.bind_gin([os.path.join("gin", "runs", "apps", f"{name}.gin")], [],
                      [ROOT])
  flags = dict(configurables.appzoo())
  train_path, dev_path = (os.path.join(data_dir, os.path.basename(p))
                          for p in flags["inputTable"].split(","))
  app = registry.get_app(name)
  flags.update(inputTable=f"{train_path},{dev_path}",
               checkpointDir=os.path.join(work, name),
               numEpochs=epochs_bert if app.uses_bert else epochs_words)
  # Shorter inputs and a higher rate for this CPU (comprehension keeps its windows).
  if app.uses_bert and length_bert and not name.startswith("text_comprehension"):
    flags["sequenceLength"] = length_bert
  if app.uses_bert and lr_bert:
    flags["learningRate"] = lr_bert
  cpu, wall = time.process_time(), time.perf_counter()
  result = runner.run_app({**flags, "mode": "train"})
  out = os.path.join(work, f"{name}.tsv")
  runner.run_app({"mode": "predict", "checkpointDir": flags["checkpointDir"],
                  "inputTable": dev_path, "outputTable": out,
                  "outputSchema": "predictions"})
  cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
  from etjax.apps.config import parse_schema  # pylint: disable=g-import-not-at-top
  schema = parse_schema(flags["inputSchema"])
  dev_rows, train_rows = table.read_table(dev_path, schema), table.read_table(
      train_path, schema)
  predicted = [r[0] if r else "" for r in (line.rstrip("\n").split("\t") for line in
                                           open(out, encoding="utf-8"))]
  model, base, what = _per_example(app, dev_rows, predicted, train_rows, flags)
  gains = np.asarray(model) - np.asarray(base)
  se = gains.std(ddof=1) / np.sqrt(len(gains))
  table_name = os.path.basename(train_path).rsplit("_", 1)[0]
  return {"app": name, "data": DATA_NOTE[table_name], "steps": result["step"],
          "dev_examples": len(dev_rows),
          "metrics": {k[5:]: v for k, v in result.items() if k.startswith("eval_")},
          "per_example": what, "model": float(np.mean(model)),
          "baseline": float(np.mean(base)), "gain": float(gains.mean()),
          "gain_se": float(se), "learns": bool(gains.mean() > 2 * se),
          "cpu_s": cpu, "wall_s": wall,
          "encoder": flags.get("pretrainedModel", "word embeddings (from the table)"),
          "sequence_length": flags["sequenceLength"],
          "learning_rate": flags["learningRate"]}


def _row(r: dict) -> str:
  main_metrics = {k: v for k, v in r["metrics"].items()
                  if k in ("accuracy", "macro_f1", "micro_f1", "f1", "exact_match",
                           "precision", "recall")}
  shown = ", ".join(f"{k} {v:.3f}" if v <= 1 else f"{k} {v:.1f}"
                    for k, v in main_metrics.items())
  return (f"| {r['app']} | {r['data']} | {r['encoder']} | {r['steps']} x "
          f"L{r['sequence_length']} | {shown} | "
          f"{r['per_example']}: {r['model']:.3f} vs {r['baseline']:.3f} "
          f"(gain {r['gain']:+.3f} ± {r['gain_se']:.3f}; "
          f"{'learns' if r['learns'] else 'not shown'}) | {r['cpu_s']:.0f} s "
          f"({r['wall_s']:.0f} s wall) |")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--apps", default=",".join(n for n in registry.APPS
                                                 if n != "feat_ext_bert"))
  parser.add_argument("--epochs_bert", type=float, default=0.5)
  parser.add_argument("--epochs_words", type=float, default=5.0)
  parser.add_argument("--length_bert", type=int, default=32,
                      help="sequenceLength of the BERT apps (0: the run file's)")
  parser.add_argument("--lr_bert", type=float, default=1e-4,
                      help="learningRate of the BERT apps (0: the run file's)")
  parser.add_argument("--debian_dir", default=os.path.join(
      os.path.dirname(ROOT), "shared", "data", "debian-descriptions"))
  parser.add_argument("--json", default=None, help="also append results to this file")
  parser.add_argument("--write_tables", default=None,
                      help="only write the Debian app tables into this folder")
  args = parser.parse_args()
  if args.write_tables:
    for name, n in debian_tables.write_tables(args.debian_dir, args.write_tables).items():
      print(f"{os.path.join(args.write_tables, name)}: {n} rows")
    return
  work = tempfile.mkdtemp(prefix="etjax-apps-bench-")
  data_dir = os.path.join(work, "data")
  debian_tables.write_tables(args.debian_dir, data_dir)
  print("| app | data | encoder | steps x length | dev metrics | paired vs baseline (mean ± SE) "
        "| CPU time |\n|---|---|---|---|---|---|---|", flush=True)
  for name in args.apps.split(","):
    r = run_app(name, data_dir, work, args.epochs_bert, args.epochs_words,
                args.length_bert, args.lr_bert)
    print(_row(r), flush=True)
    if args.json:
      with open(args.json, "a") as f:
        f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
  main()
