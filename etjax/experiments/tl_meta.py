"""Meta-learning TL, shaped like the paper's Tables 10, 11 and 12.

    etjax run --gin_file=gin/runs/table10_metakd.gin    # Table 10, MetaKD rows
    etjax run --gin_file=gin/runs/table11_metaft.gin    # Table 11
    etjax run --gin_file=gin/runs/table12_metadtl.gin   # Table 12 (and _debian.gin)

Every run goes through the one Trainer (`etjax.train.fit.fit_arrays`, and
`etjax.train.recipe.run_recipe` for Table 12's meta-learner-then-fine-tuning); each
method's hyperparameters come from `settings` (gin/algorithms/*.gin, read by
`etjax.main.algorithm_settings`), the tables' own design (data sizes, widths, steps,
learning rates) from the run files. Every table takes a row (and column) selection, so
one row runs on its own (`etjax.experiments.rows.select`).

Table 10 (MetaKD rows; the BERT-s/mix and TinyBERT rows come from
etjax/experiments/tl_distill.py with the same data sizes, models, vocabulary and length):
four review domains with `train_size` labelled reviews each. The meta-teacher (BERT,
4 layers, width 64) is MetaFT's meta-learner on the four domains mixed (its typicality
temperature is gin/algorithms/metakd.gin's meta_teacher.temperature, 2.0); the MetaKD
student (2 layers, width 32) is meta-distilled from it on the same inputs (KD +
embedding, hidden and attention MSE, weighted by the teacher's domain expertise). For
reference, the same student distilled with the same losses but no expertise weights
(plain KD) and fine-tuned on the labelled data without a teacher. The student follows
its teacher (no hard labels), so it can only beat the no-KD student where the teacher
knows more than the labelled data teaches a small model directly.

Table 11 (MetaFT): each domain keeps 5/10/20% of `train_size` reviews. Without
MetaFT: a classifier (2 layers, width 32) fine-tuned on its domain's share. With
MetaFT: one meta-learner on the four domains' shares, then fine-tuned on each domain's.
Rows: the domains; columns: PERCENTS_11.

Table 12 (single task vs MetaFT vs MetaDTL): a source task and a target task with
different label sets (`etjax.experiments.cross_task`): on 'synthetic' data 3-way
sentiment of media reviews -> 2-way polarity of goods reviews, on 'debian' data the
Debian descriptions' use (8 classes) -> network (client/server). The target keeps
1/2/5/10/20% of its train set; classifiers are BERTs of 2 layers, width 32
(synthetic) or bags of embeddings of width 64 (Debian; `cross_task` says why). Single
task: fine-tuning on the share. MetaFT: meta-learner over the share's domains, then
fine-tuned (a two-stage recipe). MetaDTL: meta-learner over the source task and the
share (the share repeated to the source's size so that batches hold both tasks), its
target head cut out and fine-tuned on the share (a two-stage recipe). Every method
fine-tunes for the same `ft_steps` (200: at 60, fine-tuning from scratch stayed at
chance on the synthetic dev split with 20% of the data); the meta-learners take
`meta_steps` (600: at 200 the encoder had not learnt the source task). Settings were
chosen on the target's dev split (split='dev'), never on test.

Cells are mean +- standard deviation of test accuracy (%) over the seeds, which draw
the data (for Debian: which descriptions form each share) and the initialisation.
"""

from __future__ import annotations

import tempfile
from typing import Mapping, Optional, Sequence

import jax
import numpy as np

from etjax import data as data_lib
from etjax.algorithms import distill as distill_lib
from etjax.algorithms import metadtl as md
from etjax.algorithms import metaft as mf
from etjax.algorithms import metakd as mk
from etjax.algorithms import optim
from etjax.algorithms.finetune import finetune, with_pretrained
from etjax.algorithms.recipe import Stage, carry_params
from etjax.algorithms.step import unbox
from etjax.experiments import cross_task
from etjax.experiments.rows import select
# Same data sizes, models, vocabulary and length as the distillation rows of Table 10.
from etjax.experiments.tl_distill import DOMAINS, classifier, encoded_domains
from etjax.models import SequenceClassifier
from etjax.models.bag import BagOfEmbeddings
from etjax.train import fit as fit_lib
from etjax.train.recipe import run_recipe

ROWS_10 = {"meta_teacher": "Meta-teacher", "no_kd": "Student, no KD (same data)",
           "kd": "Student, plain KD (same teacher, no expertise weights)",
           "metakd": "MetaKD student"}
PERCENTS_11 = (5, 10, 20)
METHODS_11 = {"finetune": "No", "metaft": "Yes"}
PERCENTS_12 = (1, 2, 5, 10, 20)
METHODS_12 = {"single": "Single-task", "metaft": "MetaFT", "metadtl": "MetaDTL"}
ENCODERS_12 = ("bert", "bag")
# (meta-learner, fine-tuning) learning rates per encoder. The bag of embeddings, whose
# rows see sparse updates, fine-tuned on the Debian dev split at 2e-3 stayed near the
# majority class (51-52% with 5% of the data) and reached 67-70% at 1e-2.
LEARNING_RATES_12 = {"bert": (3e-3, 2e-3), "bag": (1e-2, 1e-2)}
# Fine-tuning batch: shares smaller than this are repeated up to it (the Debian 1%
# share has 5 descriptions).
FT_BATCH = 16


def _tx(steps, lr=3e-3):
  return optim.make_optimizer("adamw", learning_rate=lr, total_steps=steps,
                              warmup_steps=steps // 10)


def _at_least(data, rows: int):
  """`data` repeated (cyclically, in order) to at least `rows` rows."""
  n = data_lib.num_examples(data)
  return data if n >= rows else data_lib.take(data, np.resize(np.arange(n), rows))


def _train(step, data, num_steps, seed, batch_size=32, start_from=None):
  """(trainer, final state): `num_steps` updates of `step` through the Trainer."""
  trainer, result = fit_lib.fit_arrays(step, data, num_steps=num_steps,
                                       batch_size=batch_size, seed=seed,
                                       start_from=start_from)
  return trainer, result.state


def _percent(trainer, state, data) -> float:
  return 100 * fit_lib.accuracy(trainer, state, data)


def carry_classifier(previous, fresh):
  """Recipe carry from a meta-learner (params {'model': classifier, ...}) to the
  fine-tuning of its classifier: `carry_params` of the 'model' sub-tree."""
  return carry_params(previous.replace(params=previous.params["model"]), fresh)


def carry_task(num_labels: Sequence[int], task: int = 1):
  """Recipe carry from a MetaDTL meta-learner to the fine-tuning of `task`'s
  classifier, its head cut out of the meta-learner's (`metadtl.task_params`)."""
  def carry(previous, fresh):
    cut = md.task_params(previous.params["model"], num_labels, task)
    return carry_params(previous.replace(params=cut), fresh)
  return carry


# --- Table 10 -------------------------------------------------------------------------


def teacher_carry(teacher_model, data):
  """Carry from a trained meta-teacher to a fresh distillation state: the teacher's
  classifier as `teacher_params`, and (MetaKD) its class prototypes over `data`."""
  def carry(previous, fresh):
    params = jax.device_get(unbox(previous.params["model"]))
    fresh = fresh.replace(teacher_params=with_pretrained(fresh.teacher_params, params))
    if not hasattr(fresh, "prototypes_kcd"):
      return fresh
    protos, counts = mk.teacher_prototypes(
        teacher_model, params, fit_lib.eval_batches(data)(),
        num_domains=fresh.prototypes_kcd.shape[0])
    return fresh.replace(prototypes_kcd=protos, counts_kc=counts)
  return carry


def distillation_students(settings, teacher_model, teacher_state, data, student_model,
                          tx) -> dict:
  """The 'metakd' and plain 'kd' students of a trained meta-teacher: the same losses
  and temperature (metakd.gin), with and without the expertise weights. The teacher
  and prototypes are state, so these steps serve every seed (`teacher_carry`)."""
  kd = dict(settings["metakd"]["metakd"])
  params = jax.device_get(unbox(teacher_state.params["model"]))
  protos = mk.teacher_prototypes(teacher_model, params, fit_lib.eval_batches(data)(),
                                 num_domains=len(DOMAINS))
  return {"metakd": mk.metakd(student_model, (teacher_model, params), tx,
                              prototypes=protos, **kd),
          "kd": distill_lib.distill(student_model, (teacher_model, params), tx,
                                    losses=kd["losses"], temperature=kd["temperature"],
                                    layer_map=kd["layer_map"])}


def table10(seeds, train_size, test_size, teacher_steps, student_steps, *,
            settings: Mapping, rows=tuple(ROWS_10)) -> dict:
  """{row: {domain or 'Average': [accuracy % per seed]}} for the selected rows."""
  rows = select("meta_table10.rows", rows, tuple(ROWS_10))
  teacher_model, student_model = classifier(64, 4, 2), classifier(32, 2, 2)
  teacher_tx, student_tx = _tx(teacher_steps, 1e-3), _tx(student_steps)
  steps = {"meta_teacher": mk.meta_teacher(teacher_model, teacher_tx,
                                           **settings["metakd"]["meta_teacher"]),
           "no_kd": finetune(student_model, student_tx)}
  results: dict = {}
  for seed in seeds:
    data, mixed = encoded_domains(seed, train_size, test_size)
    runs = {}
    if set(rows) & {"meta_teacher", "kd", "metakd"}:
      runs["meta_teacher"] = _train(steps["meta_teacher"], mixed, teacher_steps, seed)
      teacher_state = runs["meta_teacher"][1]
      if "kd" not in steps:
        steps.update(distillation_students(settings, teacher_model, teacher_state,
                                           mixed, student_model, student_tx))
      carry = teacher_carry(teacher_model, mixed)
      start = lambda fresh: carry(teacher_state, fresh)
      runs.update({row: _train(steps[row], mixed, student_steps, seed, start_from=start)
                   for row in rows if row in ("kd", "metakd")})
    if "no_kd" in rows:
      runs["no_kd"] = _train(steps["no_kd"], mixed, student_steps, seed)
    for row in rows:
      for domain in DOMAINS:
        results.setdefault(ROWS_10[row], {}).setdefault(domain, []).append(
            _percent(*runs[row], data[domain]["test"]))
  for row in results.values():
    row["Average"] = list(np.mean([row[d] for d in DOMAINS], axis=0))
  return results


# --- Table 11 -------------------------------------------------------------------------


def _share(data, percent, total):
  n = max(int(round(total * percent / 100)), 2)
  return data_lib.take(data, np.arange(n))


def table11(seeds, train_size, test_size, meta_steps, ft_steps, *, settings: Mapping,
            domains=DOMAINS, percents=PERCENTS_11, methods=tuple(METHODS_11)) -> dict:
  """{percent: {'No'/'Yes': {domain or 'Average': [accuracy %]}}} for the selected
  domains (rows), percentages and methods; the average is over the selected domains.
  The meta-learner always learns from all four domains' shares."""
  domains = select("meta_table11.domains", domains, DOMAINS)
  percents = select("meta_table11.percents", percents, PERCENTS_11)
  methods = select("meta_table11.methods", methods, tuple(METHODS_11))
  model = classifier(32, 2, 2)
  meta = mf.metaft(model, _tx(meta_steps),
                   **dict(settings["metaft"]["metaft"], num_domains=len(DOMAINS)))
  ft = finetune(model, _tx(ft_steps, 2e-3))
  results: dict = {}
  for seed in seeds:
    data, _ = encoded_domains(seed, train_size, test_size)
    for percent in percents:
      shares = {d: _share(data[d]["train"], percent, train_size) for d in DOMAINS}
      starts = {"finetune": None}
      if "metaft" in methods:
        _, meta_state = _train(meta, data_lib.concatenate(list(shares.values())),
                               meta_steps, seed)
        starts["metaft"] = lambda fresh, s=meta_state: carry_classifier(s, fresh)
      for domain in domains:
        for method in methods:
          run = _train(ft, shares[domain], ft_steps, seed, batch_size=16,
                       start_from=starts[method])
          results.setdefault(percent, {}).setdefault(METHODS_11[method], {}).setdefault(
              domain, []).append(_percent(*run, data[domain]["test"]))
  for per in results.values():
    for row in per.values():
      row["Average"] = list(np.mean([row[d] for d in domains], axis=0))
  return results


# --- Table 12 -------------------------------------------------------------------------


def _as_task(data, task):
  return dict(data, domain=np.full_like(data["domain"], task))


def _cross_task_classifier(encoder: str, classes: int, pair: cross_task.CrossTask):
  """Table 12's classifier: a BERT of 2 layers, width 32 ('bert'), or a bag of
  embeddings of width 64 ('bag'), over the pair's vocabulary and length."""
  if encoder == "bert":
    return classifier(32, 2, classes, pair.vocab_size, pair.max_length)
  if encoder == "bag":
    return SequenceClassifier(BagOfEmbeddings(pair.vocab_size, 64), classes,
                              dropout_rate=0.1)
  raise ValueError(f"meta_table12.encoder: unknown {encoder!r}; known: "
                   f"{list(ENCODERS_12)}")


def table12_steps(pair, encoder, learning_rates, meta_steps, ft_steps, settings):
  """{'metaft', 'metadtl', 'ft': TrainStep} of Table 12 for `pair`."""
  model = lambda classes: _cross_task_classifier(encoder, classes, pair)
  meta_lr, ft_lr = learning_rates or LEARNING_RATES_12[encoder]
  meta_tx = _tx(meta_steps, meta_lr)
  return {"metaft": mf.metaft(model(pair.num_labels[1]), meta_tx,
                              **dict(settings["metaft"]["metaft"],
                                     num_domains=pair.num_domains)),
          "metadtl": md.metadtl(model(sum(pair.num_labels)), meta_tx,
                                **dict(settings["metadtl"]["metadtl"],
                                       num_labels=pair.num_labels)),
          "ft": finetune(model(pair.num_labels[1]), _tx(ft_steps, ft_lr))}


def table12_cell(method, pair, percent, steps, seed, meta_steps, ft_steps) -> float:
  """Test (or dev) accuracy % of one method on one share: single-task fine-tuning,
  or the recipe meta-learner -> fine-tuning on the share."""
  share = _at_least(pair.share(percent), FT_BATCH)
  batches = lambda data, size: lambda: fit_lib.train_batches(data, size, seed)
  evaluation = fit_lib.eval_batches(pair.evaluation)
  if method == "single":
    _, result = fit_lib.fit_arrays(steps["ft"], share, num_steps=ft_steps,
                                   batch_size=FT_BATCH, seed=seed, eval_data=evaluation)
    return 100 * result.eval_metrics["accuracy"]
  if method == "metaft":
    first, carry = Stage("metaft", steps["metaft"], meta_steps,
                         batches(share, FT_BATCH)), carry_classifier
  else:
    # Balanced tasks: the share repeated to the source's size, so batches hold both
    # tasks and the episodes (support one task, query the other) have queries;
    # measured on the synthetic dev split (seed 0, 600 steps) this lifted MetaDTL from
    # 44/67/63% to 60/69/74% at 1/5/20%.
    mixed = data_lib.concatenate([
        _as_task(pair.source, 0),
        _as_task(_at_least(pair.share(percent), data_lib.num_examples(pair.source)), 1)])
    first, carry = (Stage("metadtl", steps["metadtl"], meta_steps, batches(mixed, 32)),
                    carry_task(pair.num_labels))
  stages = [first, Stage("finetune", steps["ft"], ft_steps, batches(share, FT_BATCH),
                         evaluation, carry)]
  with tempfile.TemporaryDirectory(prefix="etjax-table12-") as workdir:
    results = run_recipe(stages, workdir, seed=seed, mesh=fit_lib.one_device_mesh(),
                         progress=False, tensorboard=False)
  return 100 * results[-1].eval_metrics["accuracy"]


def table12(seeds, data: str = "synthetic", sizes=None, debian_dir=None,
            split: str = "test", meta_steps: int = 600, ft_steps: int = 200, *,
            settings: Mapping, methods=tuple(METHODS_12), percents=PERCENTS_12,
            encoder: Optional[str] = None,
            learning_rates: Optional[tuple[float, float]] = None) -> tuple[dict, dict]:
  """Runs the selected Table 12 cells.

  Args:
    seeds: data and initialisation seeds.
    data, sizes, debian_dir, split: the cross-task pair (`cross_task.load`).
    meta_steps: steps of the MetaFT and MetaDTL meta-learners (batch 32, or
      FT_BATCH for MetaFT on the share).
    ft_steps: fine-tuning steps on the target share (batch FT_BATCH).
    settings: the methods' settings (`etjax.main.algorithm_settings()`).
    methods: columns, keys of METHODS_12.
    percents: rows, of PERCENTS_12.
    encoder: of ENCODERS_12; None takes the pair's (`CrossTask.encoder`).
    learning_rates: (meta-learner, fine-tuning) peak learning rates; None takes
      LEARNING_RATES_12[encoder].

  Returns:
    ({percent: {method key: [accuracy % per seed]}}, info) where info has the pair's
    'names' and the first seed's evaluation set's 'majority' class share (%).
  """
  methods = select("meta_table12.methods", methods, tuple(METHODS_12))
  percents = select("meta_table12.percents", percents, PERCENTS_12)
  if encoder is not None:
    select("meta_table12.encoder", [encoder], ENCODERS_12)
  results: dict = {}
  steps: dict = {}
  info: dict = {}
  for seed in seeds:
    pair = cross_task.load(data, seed, sizes=sizes, debian_dir=debian_dir, split=split)
    if not steps:
      # One set of steps (and compiled updates) for every seed and share; the caption
      # gives the first seed's evaluation set.
      encoder = encoder or pair.encoder
      steps = table12_steps(pair, encoder, learning_rates, meta_steps, ft_steps,
                            settings)
      labels = pair.evaluation["labels"]
      info = {"names": pair.names,
              "majority": 100 * np.bincount(labels).max() / len(labels)}
    for percent in percents:
      for method in methods:
        results.setdefault(percent, {}).setdefault(method, []).append(
            table12_cell(method, pair, percent, steps, seed, meta_steps, ft_steps))
  return results, info


# --- markdown and the experiments -----------------------------------------------------


def _cell(values) -> str:
  return f"{np.mean(values):.1f} ± {np.std(values):.1f}"


def markdown10(results) -> str:
  columns = list(DOMAINS) + ["Average"]
  lines = ["| Model | " + " | ".join(columns) + " |",
           "| --- |" + " --- |" * len(columns)]
  for name, row in results.items():
    lines.append(f"| {name} | " + " | ".join(_cell(row[c]) for c in columns) + " |")
  return "\n".join(lines)


def markdown11(results) -> str:
  keys = [(p, k) for p in results for k in results[p]]
  head = "| Domain | " + " | ".join(f"{p}% {k}" for p, k in keys) + " |"
  lines = [head, "| --- |" + " --- |" * len(keys)]
  for domain in next(iter(results.values()))[keys[0][1]]:
    cells = [_cell(results[p][k][domain]) for p, k in keys]
    lines.append(f"| {domain} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def markdown12(results) -> str:
  methods = list(next(iter(results.values())))
  gain = "single" in methods and "metadtl" in methods
  lines = ["| Percentage | " + " | ".join(METHODS_12[m] for m in methods)
           + (" | MetaDTL - single |" if gain else " |"),
           "| --- |" + " --- |" * (len(methods) + gain)]
  for p, r in results.items():
    cells = [_cell(r[m]) for m in methods]
    if gain:
      diff = np.asarray(r["metadtl"]) - np.asarray(r["single"])
      cells.append(f"{diff.mean():+.1f} ± {diff.std():.1f}")
    lines.append(f"| {p}% | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def run_table10(seeds=(0, 1, 2), train_size: int = 400, test_size: int = 400,
                teacher_steps: int = 300, student_steps: int = 300,
                rows: Sequence[str] = tuple(ROWS_10), *, settings: Mapping) -> str:
  """Table 10's MetaKD rows as markdown (gin/runs/table10_metakd.gin); `rows` selects
  of ROWS_10; `settings` are the methods' (`etjax.main.algorithm_settings()`)."""
  r = table10(tuple(seeds), train_size, test_size, teacher_steps, student_steps,
              settings=settings, rows=rows)
  return ("Table 10 (MetaKD rows), accuracy (%) per domain, mean ± std over seeds "
          f"{list(seeds)}\n\n" + markdown10(r))


def run_table11(seeds=(0, 1, 2), train_size: int = 400, test_size: int = 400,
                meta_steps: int = 200, ft_steps: int = 60,
                domains: Sequence[str] = DOMAINS,
                percents: Sequence[int] = PERCENTS_11,
                methods: Sequence[str] = tuple(METHODS_11), *,
                settings: Mapping) -> str:
  """Table 11 as markdown (gin/runs/table11_metaft.gin); rows `domains`, columns
  `percents` x `methods` ('finetune' = No, 'metaft' = Yes)."""
  r = table11(tuple(seeds), train_size, test_size, meta_steps, ft_steps,
              settings=settings, domains=domains, percents=percents, methods=methods)
  return ("Table 11 (MetaFT with 5/10/20% of each domain's data), accuracy (%), mean ± "
          f"std over seeds {list(seeds)}\n\n" + markdown11(r))


def run_table12(seeds=(0, 1, 2), data: str = "synthetic",
                source_size: Optional[int] = None, target_size: Optional[int] = None,
                test_size: Optional[int] = None, debian_dir: Optional[str] = None,
                split: str = "test", meta_steps: int = 600, ft_steps: int = 200,
                methods: Sequence[str] = tuple(METHODS_12),
                percents: Sequence[int] = PERCENTS_12,
                encoder: Optional[str] = None,
                learning_rates: Optional[Sequence[float]] = None, *,
                settings: Mapping) -> str:
  """Table 12 as markdown (gin/runs/table12_metadtl.gin, table12_metadtl_debian.gin).

  `data` is 'synthetic' (sizes default to 1500 source, 2000 target, 400 evaluation
  examples) or 'debian' (the files fix the sizes; giving one is an error); `split`
  'dev' evaluates on the target's dev split, for choosing settings. Rows `percents`,
  columns `methods` (keys of METHODS_12); `encoder` ('bert' or 'bag') and
  `learning_rates` (meta-learner, fine-tuning) default to the data's
  (`CrossTask.encoder`, LEARNING_RATES_12); `settings` are the methods'.
  """
  sizes = None
  if (source_size, target_size, test_size) != (None, None, None):
    sizes = (source_size or 1500, target_size or 2000, test_size or 400)
  r, info = table12(tuple(seeds), data, sizes, debian_dir, split, meta_steps, ft_steps,
                    settings=settings, methods=methods, percents=percents,
                    encoder=encoder,
                    learning_rates=tuple(learning_rates) if learning_rates else None)
  source, target = info["names"]
  return (f"Table 12 ({target} target with {source} for transfer), {split} accuracy "
          f"(%), mean ± std over seeds {list(seeds)}; majority class "
          f"{info['majority']:.1f}%\n\n" + markdown12(r))
