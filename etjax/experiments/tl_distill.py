"""Distillation on synthetic multi-domain reviews, shaped like the paper's Table 10.

    etjax run --gin_file=gin/runs/table10_tinybert.gin   # teachers and TinyBERT
    etjax run --gin_file=gin/runs/table10_adabert.gin    # AdaBERT's found student

Four domains (books, dvd, electronics, kitchen), each with `train_size` labelled
reviews and `test_size` clean test reviews. Teachers (BERT, 4 layers, width 64):
BERT-s is fine-tuned on its own domain only (one teacher per domain); BERT-mix on the
four domains mixed. Students (BERT, 2 layers, width 32) are distilled by TinyBERT's
two stages (intermediate layers with the map m -> m*N/M = 2, 4, then soft logits) on
the training inputs their teacher saw: from each BERT-s on its domain, from BERT-mix
on all domains. Every model is evaluated on each domain's test set; cells are mean
+- standard deviation of the accuracy (%) over the seeds, which draw both the data
and the initialisation.

Every model trains through the one Trainer (`etjax.train.fit.fit_arrays`); TinyBERT's
two stages are one TrainStep (etjax.algorithms.tinybert), so one run. A student's step
is built once with a placeholder teacher, and each run swaps its teacher's parameters
into the fresh state (`start_from`), so one compiled update serves every teacher. The
methods' settings (TinyBERT's losses, layer map and temperature; AdaBERT's cell space
and search weights) are gin/algorithms/{tinybert,adabert}.gin's, passed in as
`settings` by `etjax run`; `overrides` replaces some for one table ({file stem: {arg:
value}}); the run files bind the experiment's own design (sizes, steps, seeds).

The AdaBERT experiment searches a student (cells of the search space, width 32) under
a BERT-s teacher of one domain, retrains the derived cell with the search's KD and CE
terms (gamma, T; no efficiency term), and reports both models' parameters, accuracy and
predict latency (median of 20 jitted calls, batch 256), the speed a ratio measured in
the same run.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
import optax

from etjax import data as data_lib
from etjax.algorithms import adabert as ab
from etjax.algorithms import optim
from etjax.algorithms import tinybert as tb
from etjax.algorithms.finetune import finetune
from etjax.algorithms.step import unbox
from etjax.data import synthetic
from etjax.experiments.rows import (Settings, check_overrides, method_settings,
                                    select)
from etjax.train import fit as fit_lib
import etjax.models as models

MAX_LENGTH = 48
# The models' vocabulary: every seed's tokenizer has at most this many ids, so one
# compiled step serves all seeds.
VOCAB = 1000
BATCH_SIZE = 32
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


def teacher_step(steps: int, learning_rate: float = 2e-3):
  """(module, fine-tuning step) of a 4 x 64 teacher (AdamW, 10% warm-up)."""
  model = classifier(64, 4)
  return model, finetune(model, optim.make_optimizer(
      "adamw", learning_rate=learning_rate, total_steps=steps, warmup_steps=steps // 10))


def placeholder_teacher():
  """(4 x 64 teacher module, zero plain params): a student step's teacher until a
  run swaps the trained one in (`with_teacher`)."""
  model = classifier(64, 4)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          np.zeros((2, MAX_LENGTH), np.int32))
  return model, jax.tree.map(lambda x: np.zeros(x.shape, x.dtype),
                             unbox(shapes["params"]))


def with_teacher(teacher_params):
  """start_from: a fresh DistillState with `teacher_params` (plain) swapped in."""
  def start(fresh):
    # Same tree up to the boxes: the boxes' values are the leaves, in the same order.
    # Copies: the student's updates donate their state, which must not delete the
    # teacher's own (still evaluated) parameters.
    leaves = [jax.numpy.array(x, copy=True) for x in jax.tree.leaves(teacher_params)]
    return fresh.replace(teacher_params=jax.tree.unflatten(
        jax.tree.structure(fresh.teacher_params), leaves))
  return start


def train(step, data, steps: int, seed: int, teacher_params=None):
  """(Trainer, final state) of `step` trained on `data` (a teacher swapped in)."""
  start = None if teacher_params is None else with_teacher(teacher_params)
  trainer, result = fit_lib.fit_arrays(step, data, num_steps=steps,
                                       batch_size=BATCH_SIZE, seed=seed,
                                       start_from=start)
  return trainer, result.state


def accuracy(run, data) -> float:
  """Accuracy (%) of a (Trainer, state) on encoded data."""
  return 100.0 * fit_lib.accuracy(run[0], run[1], data)


def tinybert_step(settings: Settings, overrides, student_steps: int,
                  learning_rate: float = 3e-3):
  """TinyBERT (2 x 32 student under a placeholder 4 x 64 teacher), stage 1 for half of
  `student_steps` (the table's split; tinybert.gin's intermediate_steps is replaced),
  each stage AdamW from `learning_rate` decaying over its own steps."""
  stage1 = student_steps // 2
  kwargs = dict(method_settings(settings, "tinybert", "tinybert", overrides),
                intermediate_steps=stage1)
  tx = lambda n: optim.make_optimizer("adamw", learning_rate=learning_rate,
                                      total_steps=n)
  return tb.tinybert(classifier(32, 2), placeholder_teacher(), tx(stage1),
                     tx(student_steps - stage1), **kwargs)


def table10_seed(seed: int, rows: Sequence[str], steps, sizes, num_steps) -> dict:
  """{row: {domain: accuracy %}} of one seed; steps = (teacher, student) TrainSteps,
  sizes = (train, test), num_steps = (teacher's, student's)."""
  data, mixed = encoded_domains(seed, *sizes)
  (teacher, student), (teacher_steps, student_steps) = steps, num_steps
  out: dict = {row: {} for row in rows}

  def runs(train_set, domains, teacher_row: str, student_row: str):
    """Trains the teacher (and its TinyBERT student when selected) on `train_set`;
    records the selected ones on the test sets of `domains`."""
    trained = {teacher_row: train(teacher, train_set, teacher_steps, seed)}
    if student_row in rows:
      trained[student_row] = train(student, train_set, student_steps, seed,
                                   teacher_params=unbox(trained[teacher_row][1].params))
    for row, run in trained.items():
      if row in rows:
        out[row].update({d: accuracy(run, data[d]["test"]) for d in domains})

  if {"bert_mix", "tinybert_mix"} & set(rows):
    runs(mixed, DOMAINS, "bert_mix", "tinybert_mix")
  if {"bert_s", "tinybert_s"} & set(rows):
    for domain in DOMAINS:
      runs(data[domain]["train"], (domain,), "bert_s", "tinybert_s")
  return out


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


def run_table10(*, settings: Settings, seeds=(0, 1, 2), train_size: int = 400,
                test_size: int = 400, teacher_steps: int = 300, student_steps: int = 300,
                rows: Sequence[str] = tuple(ROWS),
                overrides: Optional[Mapping[str, Mapping]] = None) -> str:
  """Table 10's teacher and TinyBERT rows as markdown (gin/runs/table10_tinybert.gin).

  Args:
    settings: {file stem: {selector: {arg: value}}} of gin/algorithms/*.gin, which
      `etjax run` passes (etjax.main.algorithm_settings); TinyBERT's come from
      settings['tinybert']['tinybert'].
    seeds: each draws the data and the initialisations.
    train_size, test_size: reviews per domain.
    teacher_steps, student_steps: updates of each teacher and each student (half of a
      student's in TinyBERT's stage 1).
    rows: keys of ROWS to run; a TinyBERT row trains its teacher either way.
    overrides: {'tinybert': {arg: value}} over tinybert.gin's bindings.
  """
  rows = select("distill_table10.rows", rows, tuple(ROWS))
  check_overrides("distill_table10", overrides, ("tinybert",))
  steps = (teacher_step(teacher_steps)[1],
           tinybert_step(settings, overrides, student_steps))
  per_seed = []
  for seed in seeds:
    per_seed.append(table10_seed(seed, rows, steps, (train_size, test_size),
                                 (teacher_steps, student_steps)))
    # A long run's finished seeds stay readable in the log if it is stopped.
    logging.warning("distill_table10 seed %d: %s", seed, per_seed[-1])
  results = {}
  for row in rows:
    cells = {d: [s[row][d] for s in per_seed] for d in DOMAINS}
    cells["Average"] = list(np.mean([cells[d] for d in DOMAINS], axis=0))
    results[ROWS[row]] = cells
  return markdown(results, seeds)


def time_predict(step, state, batch, repeats: int = 20) -> float:
  """Median milliseconds of one jitted `step.predict` call on `batch` (compiled
  first): a measurement, not training, so a direct call."""
  predict = jax.jit(step.predict)
  jax.block_until_ready(predict(state, batch))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(predict(state, batch))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def adabert_search_step(settings: Settings, overrides, width: int,
                        learning_rate: float = 3e-3):
  """(AdaBertConfig, adabert_search's settings, the search step under a placeholder
  teacher); the ops' weights with Adam at `learning_rate`, alpha with adabert.gin's
  arch_optimizer."""
  config = ab.AdaBertConfig(**dict(
      method_settings(settings, "adabert", "AdaBertConfig", overrides),
      vocab_size=VOCAB, width=width, max_length=MAX_LENGTH))
  kwargs = method_settings(settings, "adabert", "adabert_search", overrides)
  step = ab.adabert_search(
      config, placeholder_teacher(), optax.adam(learning_rate),
      ab.arch_optimizer(**method_settings(settings, "adabert", "arch_optimizer",
                                          overrides)), **kwargs)
  return config, kwargs, step


def adabert_retrain_step(config, genotype, search_kwargs, steps: int,
                         learning_rate: float = 5e-3):
  """The derived student retrained with the search's CE and KD terms
  (`adabert.retrain`), AdamW decaying over `steps`."""
  return ab.retrain(config, genotype, placeholder_teacher(),
                    optim.make_optimizer("adamw", learning_rate=learning_rate,
                                         total_steps=steps),
                    gamma=search_kwargs["gamma"],
                    temperature=search_kwargs["temperature"])


def adabert_seed(seed: int, steps, search, domain: str, sizes, num_steps) -> dict:
  """One seed of the AdaBERT experiment: teacher, search, derivation, retraining.

  Args:
    steps: (teacher, search) TrainSteps; search: (config, search settings).
    sizes: (train, test) reviews; num_steps: (teacher, search, retraining) updates.
  """
  data, _ = encoded_domains(seed, *sizes)
  train_set, test = data[domain]["train"], data[domain]["test"]
  config, search_kwargs = search
  teacher = train(steps[0], train_set, num_steps[0], seed)
  teacher_params = unbox(teacher[1].params)
  searched = train(steps[1], train_set, num_steps[1], seed, teacher_params)
  genotype = ab.derive_genotype(unbox(searched[1].params["student"]["alpha"]), config)
  ab.check_genotype(genotype, config)
  retrain = adabert_retrain_step(config, genotype, search_kwargs, num_steps[2])
  student = train(retrain, train_set, num_steps[2], seed, teacher_params)
  batch = next(iter(fit_lib.eval_batches(test, 256)()))
  return {"genotype": genotype,
          "teacher_params": ab.param_count(teacher_params),
          "student_params": ab.param_count(student[1].params["student"]),
          "teacher_accuracy": accuracy(teacher, test),
          "student_accuracy": accuracy(student, test),
          "teacher_ms": time_predict(steps[0], teacher[1], batch),
          "student_ms": time_predict(retrain, student[1], batch),
          "expected_cost": ab.architecture_weights(searched[1], config,
                                                   search_kwargs["cost"])[1]}


def adabert_markdown(reports: Sequence[dict], seeds) -> str:
  """Teacher vs found student: parameters, accuracy and latency per seed and mean."""
  get = lambda key: np.array([r[key] for r in reports], np.float64)
  lines = ["| Model | Parameters | Accuracy (%) | Predict ms, batch 256 |",
           "| --- | --- | --- | --- |"]
  for who, name in (("teacher", "BERT 4x64 teacher"), ("student", "AdaBERT student")):
    sizes = sorted({r[who + "_params"] for r in reports})
    lines.append(f"| {name} | {' / '.join(f'{n:,}' for n in sizes)} | "
                 f"{get(who + '_accuracy').mean():.1f} ± "
                 f"{get(who + '_accuracy').std():.1f} | {get(who + '_ms').mean():.2f} |")
  lines.append(f"\nMean ± std over seeds {list(seeds)}; per seed (genotype, expected "
               "cost after search, teacher/student parameters and predict time):")
  for seed, r in zip(seeds, reports):
    lines.append(f"- seed {seed}: {r['genotype']}, cost {r['expected_cost']:.3f}, "
                 f"{r['teacher_params'] / r['student_params']:.1f}x smaller, "
                 f"{r['teacher_ms'] / r['student_ms']:.1f}x faster")
  return "\n".join(lines)


def run_adabert(*, settings: Settings, seeds=(0, 1, 2), domain: str = "electronics",
                train_size: int = 400, test_size: int = 400, teacher_steps: int = 300,
                search_steps: int = 200, student_steps: int = 300, width: int = 32,
                overrides: Optional[Mapping[str, Mapping]] = None) -> str:
  """AdaBERT under a BERT-s teacher of `domain` as markdown
  (gin/runs/table10_adabert.gin).

  Args:
    settings: as in run_table10; AdaBERT's from settings['adabert'] (AdaBertConfig's
      cell space, adabert_search's gamma, beta, temperature and cost, arch_optimizer's
      learning rate).
    seeds, train_size, test_size: as in run_table10.
    teacher_steps, search_steps, student_steps: updates of the teacher, the search
      and the retraining of the derived student.
    width: the student's width (the table's; AdaBertConfig.width is replaced, as are
      vocab_size and max_length by the data's).
    overrides: {'AdaBertConfig', 'adabert_search' or 'arch_optimizer': {arg: value}}
      over adabert.gin.
  """
  check_overrides("distill_adabert", overrides,
                  ("AdaBertConfig", "adabert_search", "arch_optimizer"))
  config, kwargs, search = adabert_search_step(settings, overrides, width)
  steps = (teacher_step(teacher_steps)[1], search)
  reports = []
  for seed in seeds:
    reports.append(adabert_seed(seed, steps, (config, kwargs), domain,
                                (train_size, test_size),
                                (teacher_steps, search_steps, student_steps)))
    logging.warning("distill_adabert seed %d: %s", seed, reports[-1])
  return adabert_markdown(reports, seeds)
