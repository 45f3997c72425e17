"""Distillation on synthetic multi-domain reviews, shaped like the paper's Table 10.

    python -m etjax.experiments.tl_distill                    # seeds 0 1 2, markdown table
    python -m etjax.experiments.tl_distill --seeds 0 --teacher_steps 100 --student_steps 100
    python -m etjax.experiments.tl_distill --rows bert_mix tinybert_mix   # some rows
    python -m etjax.experiments.tl_distill --adabert        # AdaBERT's found student vs teacher

Four domains (books, dvd, electronics, kitchen), each with `train_size` labelled
reviews and `test_size` clean test reviews. Teachers (BERT, 4 layers, width 64):
BERT-s is fine-tuned on its own domain only (one teacher per domain); BERT-mix on the
four domains mixed. Students (BERT, 2 layers, width 32) are distilled by TinyBERT's
two stages (intermediate layers with the map m -> m*N/M = 2, 4, then soft logits) on
the training inputs their teacher saw: from each BERT-s on its domain, from BERT-mix
on all domains. Every model is evaluated on each domain's test set; cells are mean
+- standard deviation of the accuracy (%) over the seeds, which draw both the data
and the initialisation. One compiled update per kind of step serves every domain and
seed (teachers' parameters are swapped into the student state).

--adabert instead searches an AdaBERT student (2 cells of 3 nodes, width 32) under a
BERT-s teacher of one domain, retrains the derived cell with KD, and reports both
models' parameters, accuracy and predict latency (median of 20 jitted calls, batch
256), the speed a ratio measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

import jax
import optax
import numpy as np

from etjax import data as data_lib
from etjax.algorithms import optim
from etjax.algorithms import tinybert as tb
from etjax.algorithms.finetune import finetune
from etjax.algorithms.step import unbox
from etjax.data import synthetic
from etjax.experiments.rows import select
import etjax.models as models

MAX_LENGTH = 48
# The models' vocabulary: every seed's tokenizer has at most this many ids, so one
# compiled step serves all seeds.
VOCAB = 1000
DOMAINS = synthetic.DOMAINS
ROWS = {"bert_s": "BERT-s (teacher)", "bert_mix": "BERT-mix (teacher)",
        "tinybert_s": "TinyBERT from BERT-s", "tinybert_mix": "TinyBERT from BERT-mix"}


def classifier(hidden: int, layers: int, classes: int = 2, vocab: int = VOCAB,
               max_positions: int = 64) -> models.SequenceClassifier:
  """A BERT classifier over `vocab` ids (2 heads, MLP 2 * hidden), dropout 0.1."""
  config = models.get_config("bert-tiny", vocab_size=vocab, hidden_size=hidden,
                             num_layers=layers, num_heads=2, intermediate_size=2 * hidden,
                             max_position_embeddings=max_positions, hidden_dropout=0.1,
                             attention_dropout=0.1)
  return models.SequenceClassifier(models.module_for(config), num_labels=classes,
                                   dropout_rate=0.1)


def encoded_domains(seed: int, train_size: int, test_size: int):
  """({domain: {'train', 'test': encoded}}, mixed train set); ids < VOCAB."""
  splits = synthetic.multi_domain_splits(
      {d: (train_size, 0, test_size) for d in DOMAINS}, seed=seed)
  texts = [ex.text_a for d in splits.values() for part in d.values() for ex in part]
  tokenizer = data_lib.build_wordpiece_tokenizer(texts, vocab_size=VOCAB)
  out = {d: {s: data_lib.encode_examples(splits[d][s], tokenizer, MAX_LENGTH)
             for s in ("train", "test")} for d in DOMAINS}
  mixed = data_lib.concatenate([out[d]["train"] for d in DOMAINS])
  return out, mixed


class Runner:
  """Jits a TrainStep's init, update and predict once; trains and evaluates."""

  def __init__(self, step):
    self.step = step
    self.init = jax.jit(step.init)
    self.update = jax.jit(step.update)
    self.predict = jax.jit(step.predict)

  def train(self, data, num_steps: int, seed: int, batch_size: int = 32,
            teacher_params=None):
    """Trains from a fresh init (with `teacher_params`, plain, swapped in)."""
    iterator = data_lib.train_iterator(data, batch_size, seed=seed, process_count=1,
                                       process_index=0)
    state = self.init(jax.random.PRNGKey(seed), next(iterator))
    if teacher_params is not None:
      state = state.replace(teacher_params=_rebox(state.teacher_params, teacher_params))
    for _ in range(num_steps):
      state, _ = self.update(state, next(iterator))
    return state

  def accuracy(self, state, data) -> float:
    correct = total = 0.0
    for batch in data_lib.eval_batches(data, 200, process_count=1, process_index=0):
      logits = np.asarray(self.predict(state, batch)["logits"])
      correct += float(((logits.argmax(-1) == batch["labels"]) * batch["weight"]).sum())
      total += float(batch["weight"].sum())
    return 100.0 * correct / total


def _rebox(boxed, plain):
  # Same tree up to the boxes: the boxes' values are the leaves, in the same order.
  return jax.tree.unflatten(jax.tree.structure(boxed), jax.tree.leaves(plain))


def table10(seeds=(0, 1, 2), train_size: int = 400, test_size: int = 400,
            teacher_steps: int = 300, student_steps: int = 300,
            rows: Sequence[str] = tuple(ROWS)) -> dict:
  """Runs the selected rows (keys of ROWS) for every seed; a TinyBERT row trains its
  teacher whether or not the teacher's row is selected.

  Returns:
    {row name: {domain: [accuracy % per seed]}}.
  """
  rows = select("distill_table10.rows", rows, tuple(ROWS))
  results: dict = {}
  runners = {}
  for seed in seeds:
    data, mixed = encoded_domains(seed, train_size, test_size)
    if "teacher" not in runners:
      teacher_model = classifier(64, 4)
      student_model = classifier(32, 2)
      runners["teacher"] = Runner(finetune(teacher_model, optim.make_optimizer(
          "adamw", learning_rate=2e-3, total_steps=teacher_steps,
          warmup_steps=teacher_steps // 10)))
      stage1 = student_steps // 2
      stage2 = student_steps - stage1
      placeholder = jax.eval_shape(teacher_model.init, jax.random.PRNGKey(0),
                                   mixed["input_ids"][:2])["params"]
      placeholder = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), unbox(placeholder))
      runners["student"] = Runner(tb.tinybert(
          student_model, (teacher_model, placeholder),
          optim.make_optimizer("adamw", learning_rate=3e-3, total_steps=stage1),
          optim.make_optimizer("adamw", learning_rate=3e-3, total_steps=stage2),
          intermediate_steps=stage1, temperature=1.0))
    teacher_runner, student_runner = runners["teacher"], runners["student"]

    def record(row, domain, runner, state):
      if row in rows:
        results.setdefault(ROWS[row], {}).setdefault(domain, []).append(
            runner.accuracy(state, data[domain]["test"]))

    def distil(teacher_state, train):
      return student_runner.train(train, student_steps, seed,
                                  teacher_params=unbox(teacher_state.params))

    mix_teacher = mix_student = None
    if {"bert_mix", "tinybert_mix"} & set(rows):
      mix_teacher = teacher_runner.train(mixed, teacher_steps, seed)
      mix_student = distil(mix_teacher, mixed) if "tinybert_mix" in rows else None
    for domain in DOMAINS:
      if {"bert_s", "tinybert_s"} & set(rows):
        single = teacher_runner.train(data[domain]["train"], teacher_steps, seed)
        record("bert_s", domain, teacher_runner, single)
      record("bert_mix", domain, teacher_runner, mix_teacher)
      if "tinybert_s" in rows:
        record("tinybert_s", domain, student_runner,
               distil(single, data[domain]["train"]))
      record("tinybert_mix", domain, student_runner, mix_student)
  for row in results.values():
    row["Average"] = list(np.mean([row[d] for d in DOMAINS], axis=0))
  return results


def _time_predict(runner: Runner, state, batch, repeats: int = 20) -> float:
  """Median milliseconds of one jitted predict call on `batch` (compiled first)."""
  jax.block_until_ready(runner.predict(state, batch))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(runner.predict(state, batch))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def adabert_report(seed: int = 0, domain: str = "electronics", train_size: int = 400,
                   test_size: int = 400, teacher_steps: int = 300,
                   search_steps: int = 200, student_steps: int = 300,
                   beta: float = 0.05) -> dict:
  """AdaBERT on one domain: search under the fine-tuned teacher, derive, retrain with
  KD; returns the genotype, parameter counts, accuracies and predict latency (batch
  256) of teacher and student."""
  from etjax.algorithms import adabert as ab  # pylint: disable=g-import-not-at-top
  from etjax.algorithms.distill import distill, hinton  # pylint: disable=g-import-not-at-top
  data, _ = encoded_domains(seed, train_size, test_size)
  train, test = data[domain]["train"], data[domain]["test"]
  teacher_model = classifier(64, 4)
  teacher = Runner(finetune(teacher_model, optim.make_optimizer(
      "adamw", learning_rate=2e-3, total_steps=teacher_steps,
      warmup_steps=teacher_steps // 10)))
  teacher_state = teacher.train(train, teacher_steps, seed)
  teacher_pair = (teacher_model, unbox(teacher_state.params))
  config = ab.AdaBertConfig(vocab_size=VOCAB, width=32, num_cells=2, num_nodes=3,
                            max_length=MAX_LENGTH)
  search = Runner(ab.adabert_search(config, teacher_pair, optax.adam(3e-3),
                                    optax.adam(3e-2), gamma=0.8, beta=beta,
                                    temperature=2.0))
  search_state = search.train(train, search_steps, seed)
  genotype = ab.derive_genotype(unbox(search_state.params["student"]["alpha"]), config)
  ab.check_genotype(genotype, config)
  student = Runner(distill(ab.AdaBert(config, genotype), teacher_pair,
                           optim.make_optimizer("adamw", learning_rate=5e-3,
                                                total_steps=student_steps),
                           losses=hinton(1.0), temperature=2.0))
  student_state = student.train(train, student_steps, seed)
  batch = next(iter(data_lib.eval_batches(test, 256, process_count=1, process_index=0)))
  return {
      "genotype": genotype,
      "teacher_params": ab.param_count(teacher_state.params),
      "student_params": ab.param_count(student_state.params["student"]),
      "teacher_accuracy": teacher.accuracy(teacher_state, test),
      "student_accuracy": student.accuracy(student_state, test),
      "teacher_ms": _time_predict(teacher, teacher_state, batch),
      "student_ms": _time_predict(student, student_state, batch),
      "expected_cost": ab.architecture_weights(search_state, config)[1]}


def markdown(results: dict, seeds) -> str:
  """The table: one row per model, one column per domain and the average."""
  columns = list(DOMAINS) + ["Average"]
  lines = ["| Model | " + " | ".join(columns) + " |",
           "| --- |" + " --- |" * len(columns)]
  for name, row in results.items():
    cells = [f"{np.mean(row[c]):.1f} ± {np.std(row[c]):.1f}" for c in columns]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  lines.append(f"\nAccuracy (%) on clean test reviews, mean ± std over seeds "
               f"{list(seeds)}.")
  return "\n".join(lines)


def run_table10(seeds=(0, 1, 2), train_size: int = 400, test_size: int = 400,
                teacher_steps: int = 300, student_steps: int = 300,
                rows: Sequence[str] = tuple(ROWS)) -> str:
  """Table 10's teacher and TinyBERT rows as markdown (gin/runs/table10_tinybert.gin);
  `rows` selects of ROWS."""
  return markdown(table10(tuple(seeds), train_size, test_size, teacher_steps,
                          student_steps, rows), seeds)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--train_size", type=int, default=400)
  parser.add_argument("--test_size", type=int, default=400)
  parser.add_argument("--teacher_steps", type=int, default=300)
  parser.add_argument("--student_steps", type=int, default=300)
  parser.add_argument("--search_steps", type=int, default=200)
  parser.add_argument("--beta", type=float, default=0.05,
                      help="AdaBERT's efficiency weight")
  parser.add_argument("--rows", nargs="+", default=list(ROWS),
                      help="Table 10 rows to run")
  parser.add_argument("--adabert", action="store_true",
                      help="instead of Table 10, report AdaBERT's found student")
  args = parser.parse_args(argv)
  start = time.time()
  if args.adabert:
    report = adabert_report(args.seeds[0], train_size=args.train_size,
                            test_size=args.test_size, teacher_steps=args.teacher_steps,
                            search_steps=args.search_steps,
                            student_steps=args.student_steps, beta=args.beta)
    print("| Model | Parameters | Accuracy (%) | Predict ms (batch 256) |")
    print("| --- | --- | --- | --- |")
    for who in ("teacher", "student"):
      print(f"| {'BERT 4x64 teacher' if who == 'teacher' else 'AdaBERT student'} | "
            f"{report[who + '_params']:,} | {report[who + '_accuracy']:.1f} | "
            f"{report[who + '_ms']:.2f} |")
    print(f"\nGenotype: {report['genotype']}; expected cost after search "
          f"{report['expected_cost']:.3f}")
    print(f"\nCommand: python -m etjax.experiments.tl_distill "
          f"{' '.join(argv or sys.argv[1:])}  ({time.time() - start:.0f} s on "
          f"{jax.devices()[0].platform})")
    return 0
  results = table10(tuple(args.seeds), args.train_size, args.test_size,
                    args.teacher_steps, args.student_steps, args.rows)
  print(markdown(results, args.seeds))
  print(f"\nCommand: python -m etjax.experiments.tl_distill {' '.join(argv or sys.argv[1:])}"
        f"  ({time.time() - start:.0f} s on {jax.devices()[0].platform})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
