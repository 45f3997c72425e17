"""Meta-learning TL, shaped like the paper's Tables 10, 11 and 12.

    python -m etjax.experiments.tl_meta                 # all three tables, seeds 0 1 2
    python -m etjax.experiments.tl_meta --tables 11 --seeds 0
    python -m etjax.experiments.tl_meta --tables 12 --data debian --methods metadtl
    etjax run --gin_file=gin/runs/table11_metaft.gin    # one table as a gin job

Every table takes a row (and column) selection, so a single row runs on its own
(`etjax.experiments.rows.select`; unknown names fail listing the known ones).

Table 10 (MetaKD rows; the BERT-s/mix and TinyBERT rows come from
etjax/experiments/tl_distill.py with the same data sizes, models, vocabulary and length):
four review domains with `train_size` labelled reviews each. The meta-teacher (BERT,
4 layers, width 64) is MetaFT's meta-learner on the four domains mixed; the MetaKD
student (2 layers, width 32) is meta-distilled from it on the same inputs (KD +
embedding, hidden and attention MSE, weighted by the teacher's domain expertise). For
reference, the same student fine-tuned on the same labelled data without a teacher.
Rows: ROWS_10. The meta-teacher's typicality temperature is 2.0, not MetaFT's 0.5: on
held-out seeds 10 and 11 (never the table's) the sharper weights left the teacher at
77.1/76.3% against 79.9/77.9% (lr 1e-3; at lr 2e-3 MetaFT's teacher was unstable).
The student follows its teacher (KD only, no hard labels), so it can only beat the
no-KD student where the teacher knows more than the labelled data teaches a small
model directly (as with 40 labels in tests/algorithms/test_metakd.py); with all 1,600
labels here the 4x64 teacher is no better than the 2x32 student trained alone, and
distilling it does not beat that student.

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
task:
fine-tuning on the share. MetaFT: meta-learner over the share's domains, then
fine-tuned. MetaDTL: meta-learner over the source task and the share (first-order
episodes; the share repeated to the source's size so that batches hold both tasks),
its target head cut out and fine-tuned on the share. Every method fine-tunes for the
same `ft_steps` (200: at 60, fine-tuning from scratch stayed at chance on the
synthetic dev split with 20% of the data); the meta-learners take `meta_steps` (600:
at 200 the encoder had not learnt the source task, 55% on its own train set). Settings
were chosen on the target's dev split (split='dev'), never on test. Rows:
PERCENTS_12; columns: METHODS_12.

Cells are mean +- standard deviation of test accuracy (%) over the seeds, which draw
the data (for Debian: which descriptions form each share) and the initialisation. One
compiled update per kind of step serves every domain, share and seed (starting
parameters are swapped into fresh states).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

import jax
import numpy as np

from etjax import data as data_lib
from etjax.algorithms import metadtl as md
from etjax.algorithms import metaft as mf
from etjax.algorithms import metakd as mk
from etjax.algorithms import optim
from etjax.algorithms.finetune import finetune, with_pretrained
from etjax.algorithms.step import unbox
from etjax.models.bag import BagOfEmbeddings
from etjax.experiments import cross_task
from etjax.experiments.rows import select
# Same data sizes, models, vocabulary and length as the distillation rows of Table 10.
from etjax.experiments.tl_distill import DOMAINS, classifier, encoded_domains
from etjax.models import SequenceClassifier

ROWS_10 = {"meta_teacher": "Meta-teacher", "no_kd": "Student, no KD (same data)",
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
# Fine-tuning batch: shares smaller than this are repeated up to it, so one compiled
# step serves every share (the Debian 1% share has 5 descriptions).
FT_BATCH = 16


class Runner:
  """Jits a TrainStep's init, update and predict once; trains from swapped-in
  parameters and evaluates."""

  def __init__(self, step, tx):
    self.step, self.tx = step, tx
    self.init = jax.jit(step.init)
    self.update = jax.jit(step.update)
    self.predict = jax.jit(step.predict)

  def train(self, data, num_steps, seed, batch_size=32, teacher_params=None,
            start_params=None, **changes):
    """Trains from a fresh init with `teacher_params` / `start_params` (plain) swapped
    in and other state fields replaced by `changes`."""
    iterator = data_lib.train_iterator(data, batch_size, seed=seed, process_count=1,
                                       process_index=0)
    state = self.init(jax.random.PRNGKey(seed), next(iterator))
    if teacher_params is not None:
      state = state.replace(teacher_params=with_pretrained(state.teacher_params,
                                                           teacher_params))
    if start_params is not None:
      params = with_pretrained(state.params, start_params)
      state = state.replace(params=params, opt_state=self.tx.init(params))
    if changes:
      state = state.replace(**changes)
    for _ in range(num_steps):
      state, _ = self.update(state, next(iterator))
    return state

  def accuracy_by(self, state, data, slice_classes=None) -> np.ndarray:
    """[N] 0/1 correctness per example (logits cut to `slice_classes` if given)."""
    out = []
    for batch in data_lib.eval_batches(data, 200, process_count=1, process_index=0):
      logits = np.asarray(self.predict(state, batch)["logits"])
      if slice_classes is not None:
        logits = logits[:, slice_classes]
      keep = batch["weight"] > 0
      out.append((logits.argmax(-1) == batch["labels"])[keep])
    return np.concatenate(out).astype(np.float64)


def _tx(steps, lr=3e-3):
  return optim.make_optimizer("adamw", learning_rate=lr, total_steps=steps,
                              warmup_steps=steps // 10)


def _at_least(data, rows: int):
  """`data` repeated (cyclically, in order) to at least `rows` rows."""
  n = data_lib.num_examples(data)
  return data if n >= rows else data_lib.take(data, np.resize(np.arange(n), rows))


def table10(seeds, train_size, test_size, teacher_steps, student_steps,
            rows=tuple(ROWS_10), teacher_temperature: float = 2.0) -> dict:
  """{row: {domain or 'Average': [accuracy % per seed]}} for the selected MetaKD rows;
  `teacher_temperature` is the meta-teacher's typicality temperature."""
  rows = select("meta_table10.rows", rows, tuple(ROWS_10))
  results: dict = {}
  teacher_model, student_model = classifier(64, 4, 2), classifier(32, 2, 2)
  teacher_tx, student_tx = _tx(teacher_steps, 1e-3), _tx(student_steps)
  teacher = Runner(mk.meta_teacher(teacher_model, teacher_tx, num_domains=4,
                                   temperature=teacher_temperature), teacher_tx)
  plain = Runner(finetune(student_model, student_tx), student_tx)
  student = None
  for seed in seeds:
    data, mixed = encoded_domains(seed, train_size, test_size)
    states = {}
    if "meta_teacher" in rows or "metakd" in rows:
      states["meta_teacher"] = teacher.train(mixed, teacher_steps, seed)
    if "metakd" in rows:
      teacher_params = jax.device_get(unbox(states["meta_teacher"].params["model"]))
      protos = mk.teacher_prototypes(teacher_model, teacher_params, data_lib.eval_batches(
          mixed, 200, process_count=1, process_index=0), num_domains=4)
      if student is None:
        # Prototypes are state, so one compiled step serves every seed.
        student = Runner(mk.metakd(student_model, (teacher_model, teacher_params),
                                   student_tx, prototypes=protos, temperature=1.0),
                         student_tx)
      states["metakd"] = student.train(mixed, student_steps, seed,
                                       teacher_params=teacher_params,
                                       prototypes_kcd=protos[0], counts_kc=protos[1])
    if "no_kd" in rows:
      states["no_kd"] = plain.train(mixed, student_steps, seed)
    runners = {"meta_teacher": teacher, "no_kd": plain, "metakd": student}
    for row in rows:
      for domain in DOMAINS:
        results.setdefault(ROWS_10[row], {}).setdefault(domain, []).append(
            100 * runners[row].accuracy_by(states[row], data[domain]["test"]).mean())
  for row in results.values():
    row["Average"] = list(np.mean([row[d] for d in DOMAINS], axis=0))
  return results


def _share(data, percent, total):
  n = max(int(round(total * percent / 100)), 2)
  return data_lib.take(data, np.arange(n))


def table11(seeds, train_size, test_size, meta_steps, ft_steps, domains=DOMAINS,
            percents=PERCENTS_11, methods=tuple(METHODS_11)) -> dict:
  """{percent: {'No'/'Yes': {domain or 'Average': [accuracy %]}}} for the selected
  domains (rows), percentages and methods; the average is over the selected domains.
  The meta-learner always learns from all four domains' shares."""
  domains = select("meta_table11.domains", domains, DOMAINS)
  percents = select("meta_table11.percents", percents, PERCENTS_11)
  methods = select("meta_table11.methods", methods, tuple(METHODS_11))
  model = classifier(32, 2, 2)
  meta_tx, ft_tx = _tx(meta_steps), _tx(ft_steps, 2e-3)
  meta = Runner(mf.metaft(model, meta_tx, num_domains=4), meta_tx)
  ft = Runner(finetune(model, ft_tx), ft_tx)
  results: dict = {}
  for seed in seeds:
    data, _ = encoded_domains(seed, train_size, test_size)
    for percent in percents:
      shares = {d: _share(data[d]["train"], percent, train_size) for d in DOMAINS}
      starts = {"finetune": None}
      if "metaft" in methods:
        meta_state = meta.train(data_lib.concatenate(list(shares.values())), meta_steps,
                                seed)
        starts["metaft"] = jax.device_get(unbox(meta_state.params["model"]))
      for domain in domains:
        for method in methods:
          state = ft.train(shares[domain], ft_steps, seed, batch_size=16,
                           start_params=starts[method])
          results.setdefault(percent, {}).setdefault(METHODS_11[method], {}).setdefault(
              domain, []).append(100 * ft.accuracy_by(state, data[domain]["test"]).mean())
  for per in results.values():
    for row in per.values():
      row["Average"] = list(np.mean([row[d] for d in domains], axis=0))
  return results


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


def table12(seeds, data: str = "synthetic", sizes=None, debian_dir=None,
            split: str = "test", meta_steps: int = 600, ft_steps: int = 200,
            methods=tuple(METHODS_12), percents=PERCENTS_12,
            encoder: Optional[str] = None,
            learning_rates: Optional[tuple[float, float]] = None) -> tuple[dict, dict]:
  """Runs the selected Table 12 cells.

  Args:
    seeds: data and initialisation seeds.
    data, sizes, debian_dir, split: the cross-task pair (`cross_task.load`).
    meta_steps: steps of the MetaFT and MetaDTL meta-learners (batch 32, or 16 for
      MetaFT on the share).
    ft_steps: fine-tuning steps on the target share (batch FT_BATCH).
    methods: columns, keys of METHODS_12.
    percents: rows, of PERCENTS_12.
    encoder: of ENCODERS_12; None takes the pair's (`CrossTask.encoder`).
    learning_rates: (meta-learner, fine-tuning) peak learning rates; None takes
      LEARNING_RATES_12[encoder].

  Returns:
    ({percent: {method key: [accuracy % per seed]}}, info) where info has the pair's
    'names' and the evaluation set's 'majority' class share (%).
  """
  methods = select("meta_table12.methods", methods, tuple(METHODS_12))
  percents = select("meta_table12.percents", percents, PERCENTS_12)
  if encoder is not None:
    select("meta_table12.encoder", [encoder], ENCODERS_12)
  results: dict = {}
  runners: dict = {}
  info: dict = {}
  for seed in seeds:
    pair = cross_task.load(data, seed, sizes=sizes, debian_dir=debian_dir, split=split)
    if not runners:
      encoder = encoder or pair.encoder
      model = lambda c: _cross_task_classifier(encoder, c, pair)
      meta_lr, ft_lr = learning_rates or LEARNING_RATES_12[encoder]
      meta_tx, ft_tx = _tx(meta_steps, meta_lr), _tx(ft_steps, ft_lr)
      runners = {
          "metaft": Runner(mf.metaft(model(pair.num_labels[1]), meta_tx,
                                     num_domains=pair.num_domains), meta_tx),
          "metadtl": Runner(md.metadtl(model(sum(pair.num_labels)), meta_tx,
                                       num_labels=pair.num_labels, first_order=True),
                            meta_tx),
          "ft": Runner(finetune(model(pair.num_labels[1]), ft_tx), ft_tx)}
      labels = pair.evaluation["labels"]
      info = {"names": pair.names,
              "majority": 100 * np.bincount(labels).max() / len(labels)}
    for percent in percents:
      share = _at_least(pair.share(percent), FT_BATCH)
      starts = {"single": None}
      if "metaft" in methods:
        state = runners["metaft"].train(share, meta_steps, seed, batch_size=FT_BATCH)
        starts["metaft"] = jax.device_get(unbox(state.params["model"]))
      if "metadtl" in methods:
        # Balanced tasks: the share repeated to the source's size, so batches hold
        # both tasks and the episodes (support one task, query the other) have
        # queries; measured on the synthetic dev split (seed 0, 600 steps) this lifts
        # MetaDTL from 44/67/63% to 60/69/74% at 1/5/20%.
        mixed = data_lib.concatenate([
            _as_task(pair.source, 0),
            _as_task(_at_least(pair.share(percent),
                               data_lib.num_examples(pair.source)), 1)])
        state = runners["metadtl"].train(mixed, meta_steps, seed)
        starts["metadtl"] = md.task_params(state.params["model"], pair.num_labels, 1)
      for key in methods:
        state = runners["ft"].train(share, ft_steps, seed, batch_size=FT_BATCH,
                                    start_params=starts[key])
        results.setdefault(percent, {}).setdefault(key, []).append(
            100 * runners["ft"].accuracy_by(state, pair.evaluation).mean())
  return results, info


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
                rows: Sequence[str] = tuple(ROWS_10),
                teacher_temperature: float = 2.0) -> str:
  """Table 10's MetaKD rows as markdown (gin/runs/table10_metakd.gin); `rows` selects
  of ROWS_10."""
  r = table10(tuple(seeds), train_size, test_size, teacher_steps, student_steps, rows,
              teacher_temperature)
  return ("Table 10 (MetaKD rows), accuracy (%) per domain, mean ± std over seeds "
          f"{list(seeds)}\n\n" + markdown10(r))


def run_table11(seeds=(0, 1, 2), train_size: int = 400, test_size: int = 400,
                meta_steps: int = 200, ft_steps: int = 60,
                domains: Sequence[str] = DOMAINS,
                percents: Sequence[int] = PERCENTS_11,
                methods: Sequence[str] = tuple(METHODS_11)) -> str:
  """Table 11 as markdown (gin/runs/table11_metaft.gin); rows `domains`, columns
  `percents` x `methods` ('finetune' = No, 'metaft' = Yes)."""
  r = table11(tuple(seeds), train_size, test_size, meta_steps, ft_steps, domains,
              percents, methods)
  return ("Table 11 (MetaFT with 5/10/20% of each domain's data), accuracy (%), mean ± "
          f"std over seeds {list(seeds)}\n\n" + markdown11(r))


def run_table12(seeds=(0, 1, 2), data: str = "synthetic",
                source_size: Optional[int] = None, target_size: Optional[int] = None,
                test_size: Optional[int] = None, debian_dir: Optional[str] = None,
                split: str = "test", meta_steps: int = 600, ft_steps: int = 200,
                methods: Sequence[str] = tuple(METHODS_12),
                percents: Sequence[int] = PERCENTS_12,
                encoder: Optional[str] = None,
                learning_rates: Optional[Sequence[float]] = None) -> str:
  """Table 12 as markdown (gin/runs/table12_metadtl.gin, table12_metadtl_debian.gin).

  `data` is 'synthetic' (sizes default to 1500 source, 2000 target, 400 evaluation
  examples) or 'debian' (the files fix the sizes; giving one is an error); `split`
  'dev' evaluates on the target's dev split, for choosing settings. Rows `percents`,
  columns `methods` (keys of METHODS_12); `encoder` ('bert' or 'bag') and
  `learning_rates` (meta-learner, fine-tuning) default to the data's
  (`CrossTask.encoder`, LEARNING_RATES_12).
  """
  sizes = None
  if (source_size, target_size, test_size) != (None, None, None):
    sizes = (source_size or 1500, target_size or 2000, test_size or 400)
  r, info = table12(tuple(seeds), data, sizes, debian_dir, split, meta_steps, ft_steps,
                    methods, percents, encoder,
                    tuple(learning_rates) if learning_rates else None)
  source, target = info["names"]
  return (f"Table 12 ({target} target with {source} for transfer), {split} accuracy "
          f"(%), mean ± std over seeds {list(seeds)}; majority class "
          f"{info['majority']:.1f}%\n\n" + markdown12(r))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tables", nargs="+", default=["10", "11", "12"])
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--train_size", type=int, default=400)
  parser.add_argument("--test_size", type=int, default=400)
  parser.add_argument("--teacher_steps", type=int, default=300)
  parser.add_argument("--student_steps", type=int, default=300)
  parser.add_argument("--meta_steps", type=int, default=200)
  parser.add_argument("--ft_steps", type=int, default=60)
  parser.add_argument("--cross_meta_steps", type=int, default=600, help="Table 12")
  parser.add_argument("--cross_ft_steps", type=int, default=200, help="Table 12")
  parser.add_argument("--rows", nargs="+", default=list(ROWS_10), help="Table 10")
  parser.add_argument("--domains", nargs="+", default=list(DOMAINS), help="Table 11")
  parser.add_argument("--methods", nargs="+", default=list(METHODS_12), help="Table 12")
  parser.add_argument("--percents", type=int, nargs="+", default=None,
                      help="Tables 11 and 12 (default: all of each)")
  parser.add_argument("--data", default="synthetic", choices=cross_task.KINDS,
                      help="Table 12's cross-task pair")
  parser.add_argument("--encoder", default=None, choices=ENCODERS_12,
                      help="Table 12's encoder (default: the data's)")
  parser.add_argument("--learning_rates", type=float, nargs=2, default=None,
                      help="Table 12's meta-learner and fine-tuning learning rates")
  parser.add_argument("--split", default="test", choices=("dev", "test"),
                      help="Table 12's evaluation split")
  args = parser.parse_args(argv)
  start = time.time()
  if "10" in args.tables:
    print(run_table10(args.seeds, args.train_size, args.test_size, args.teacher_steps,
                      args.student_steps, args.rows) + "\n", flush=True)
  if "11" in args.tables:
    print(run_table11(args.seeds, args.train_size, args.test_size, args.meta_steps,
                      args.ft_steps, args.domains, args.percents or PERCENTS_11)
          + "\n", flush=True)
  if "12" in args.tables:
    print(run_table12(args.seeds, args.data, split=args.split,
                      meta_steps=args.cross_meta_steps, ft_steps=args.cross_ft_steps,
                      methods=args.methods, percents=args.percents or PERCENTS_12,
                      encoder=args.encoder, learning_rates=args.learning_rates)
          + "\n", flush=True)
  print(f"Command: python -m etjax.experiments.tl_meta "
        f"{' '.join(argv if argv is not None else sys.argv[1:])}  "
        f"({time.time() - start:.0f} s on {jax.devices()[0].platform})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
