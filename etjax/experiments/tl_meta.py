"""Meta-learning TL on synthetic data, shaped like the paper's Tables 10, 11 and 12.

    python -m etjax.experiments.tl_meta                 # all three tables, seeds 0 1 2
    python -m etjax.experiments.tl_meta --tables 11 --seeds 0
    etjax run --gin_file=gin/runs/table11_metaft.gin    # one table as a gin job

Table 10 (MetaKD rows; the BERT-s/mix and TinyBERT rows come from
etjax/experiments/tl_distill.py with the same data sizes, models, vocabulary and length):
four review domains with `train_size` labelled reviews each. The meta-teacher (BERT,
4 layers, width 64) is MetaFT's meta-learner on the four domains mixed; the MetaKD
student (2 layers, width 32) is meta-distilled from it on the same inputs (KD +
embedding, hidden and attention MSE, weighted by the teacher's domain expertise). For
reference, the same student fine-tuned on the same labelled data without a teacher.

Table 11 (MetaFT): each domain keeps 5/10/20% of `train_size` reviews. Without
MetaFT: a classifier (2 layers, width 32) fine-tuned on its domain's share. With
MetaFT: one meta-learner on the four domains' shares, then fine-tuned on each domain's.

Table 12 (single task vs MetaFT vs MetaDTL): 2-way entailment (SciTail-like nli2) with
1/2/5/10/20% of `nli2_size` training pairs, and 3-way NLI (MNLI-like nli3, `nli3_size`
pairs) for transfer; classifiers of 2 layers, width 32. Single task: fine-tuning on
the nli2 share. MetaFT: meta-learner over the nli2 share's four domains, then
fine-tuned. MetaDTL: meta-learner over nli3 and the nli2 share (first-order episodes),
its nli2 head cut out and fine-tuned.

Cells are mean +- standard deviation of test accuracy (%) over the seeds, which draw
the data and the initialisation. One compiled update per kind of step serves every
domain, share and seed (starting parameters are swapped into fresh states).
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np

from etjax import data as data_lib
from etjax.algorithms import metadtl as md
from etjax.algorithms import metaft as mf
from etjax.algorithms import metakd as mk
from etjax.algorithms import optim
from etjax.algorithms.finetune import finetune, with_pretrained
from etjax.algorithms.step import unbox
from etjax.data import synthetic
# Same data sizes, models, vocabulary and length as the distillation rows of Table 10.
from etjax.experiments.tl_distill import (DOMAINS, MAX_LENGTH, VOCAB, classifier,
                                         encoded_domains)

PERCENTS_11 = (5, 10, 20)
PERCENTS_12 = (1, 2, 5, 10, 20)


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


def table10(seeds, train_size, test_size, teacher_steps, student_steps) -> dict:
  """{row: {domain or 'Average': [accuracy % per seed]}} for the MetaKD rows."""
  results: dict = {}
  teacher_model, student_model = classifier(64, 4, 2), classifier(32, 2, 2)
  teacher_tx, student_tx = _tx(teacher_steps, 1e-3), _tx(student_steps)
  teacher = Runner(mk.meta_teacher(teacher_model, teacher_tx, num_domains=4), teacher_tx)
  plain = Runner(finetune(student_model, student_tx), student_tx)
  student = None
  for seed in seeds:
    data, mixed = encoded_domains(seed, train_size, test_size)
    teacher_state = teacher.train(mixed, teacher_steps, seed)
    teacher_params = jax.device_get(unbox(teacher_state.params["model"]))
    protos = mk.teacher_prototypes(teacher_model, teacher_params, data_lib.eval_batches(
        mixed, 200, process_count=1, process_index=0), num_domains=4)
    if student is None:
      # Prototypes are state, so one compiled step serves every seed.
      student = Runner(mk.metakd(student_model, (teacher_model, teacher_params),
                                 student_tx, prototypes=protos, temperature=1.0),
                       student_tx)
    kd_state = student.train(mixed, student_steps, seed, teacher_params=teacher_params,
                             prototypes_kcd=protos[0], counts_kc=protos[1])
    plain_state = plain.train(mixed, student_steps, seed)
    for domain in DOMAINS:
      test = data[domain]["test"]
      for row, runner, state in (("Meta-teacher", teacher, teacher_state),
                                 ("Student, no KD (same data)", plain, plain_state),
                                 ("MetaKD student", student, kd_state)):
        results.setdefault(row, {}).setdefault(domain, []).append(
            100 * runner.accuracy_by(state, test).mean())
  for row in results.values():
    row["Average"] = list(np.mean([row[d] for d in DOMAINS], axis=0))
  return results


def _share(data, percent, total):
  n = max(int(round(total * percent / 100)), 2)
  return data_lib.take(data, np.arange(n))


def table11(seeds, train_size, test_size, meta_steps, ft_steps) -> dict:
  """{percent: {'No'/'Yes': {domain or 'Average': [accuracy %]}}}."""
  model = classifier(32, 2, 2)
  meta_tx, ft_tx = _tx(meta_steps), _tx(ft_steps, 2e-3)
  meta = Runner(mf.metaft(model, meta_tx, num_domains=4), meta_tx)
  ft = Runner(finetune(model, ft_tx), ft_tx)
  results: dict = {}
  for seed in seeds:
    data, _ = encoded_domains(seed, train_size, test_size)
    for percent in PERCENTS_11:
      shares = {d: _share(data[d]["train"], percent, train_size) for d in DOMAINS}
      meta_state = meta.train(data_lib.concatenate(list(shares.values())), meta_steps,
                              seed)
      start = jax.device_get(unbox(meta_state.params["model"]))
      for domain in DOMAINS:
        test = data[domain]["test"]
        for key, params in (("No", None), ("Yes", start)):
          state = ft.train(shares[domain], ft_steps, seed, batch_size=16,
                           start_params=params)
          results.setdefault(percent, {}).setdefault(key, {}).setdefault(
              domain, []).append(100 * ft.accuracy_by(state, test).mean())
  for per in results.values():
    for row in per.values():
      row["Average"] = list(np.mean([row[d] for d in DOMAINS], axis=0))
  return results


def _nli(seed, nli3_size, nli2_size, test_size):
  splits = synthetic.cross_task_splits((nli3_size, 0, 0), (nli2_size, 0, test_size),
                                       seed=seed)
  texts = [t for task in splits.values() for part in task.values() for ex in part
           for t in (ex.text_a, ex.text_b)]
  tokenizer = data_lib.build_wordpiece_tokenizer(texts, vocab_size=VOCAB)
  enc = lambda ex: data_lib.encode_examples(ex, tokenizer, MAX_LENGTH)
  nli2 = enc(splits["nli2"]["train"])
  # Shares are prefixes of a fixed shuffle, so every domain appears in every share.
  nli2 = data_lib.take(nli2, np.random.default_rng(seed).permutation(nli2_size))
  return enc(splits["nli3"]["train"]), nli2, enc(splits["nli2"]["test"])


def _as_task(data, task):
  return dict(data, domain=np.full_like(data["domain"], task))


def table12(seeds, nli3_size, nli2_size, test_size, meta_steps, ft_steps) -> dict:
  """{percent: {'Single-task'/'MetaFT'/'MetaDTL': [accuracy %]}}."""
  model2, model5 = classifier(32, 2, 2), classifier(32, 2, 5)
  meta_tx, ft_tx = _tx(meta_steps), _tx(ft_steps, 2e-3)
  metaft = Runner(mf.metaft(model2, meta_tx, num_domains=4), meta_tx)
  metadtl = Runner(md.metadtl(model5, meta_tx, num_labels=(3, 2), first_order=True),
                   meta_tx)
  ft = Runner(finetune(model2, ft_tx), ft_tx)
  results: dict = {}
  for seed in seeds:
    nli3, nli2, test = _nli(seed, nli3_size, nli2_size, test_size)
    for percent in PERCENTS_12:
      share = _share(nli2, percent, nli2_size)
      starts = {"Single-task": None}
      # Batches of 16 (the 1% share has 20 pairs), so one compiled step serves all.
      state = metaft.train(share, meta_steps, seed, batch_size=16)
      starts["MetaFT"] = jax.device_get(unbox(state.params["model"]))
      mixed = data_lib.concatenate([_as_task(nli3, 0), _as_task(share, 1)])
      state = metadtl.train(mixed, meta_steps, seed)
      starts["MetaDTL"] = md.task_params(state.params["model"], (3, 2), 1)
      for key, params in starts.items():
        state = ft.train(share, ft_steps, seed, batch_size=16, start_params=params)
        results.setdefault(percent, {}).setdefault(key, []).append(
            100 * ft.accuracy_by(state, test).mean())
  return results


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
  head = "| Domain | " + " | ".join(f"{p}% No | {p}% Yes" for p in PERCENTS_11) + " |"
  lines = [head, "| --- |" + " --- |" * (2 * len(PERCENTS_11))]
  for domain in list(DOMAINS) + ["Average"]:
    cells = [_cell(results[p][k][domain]) for p in PERCENTS_11 for k in ("No", "Yes")]
    lines.append(f"| {domain} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def markdown12(results) -> str:
  lines = ["| Percentage | Single-task | MetaFT | MetaDTL | MetaDTL - single |",
           "| --- | --- | --- | --- | --- |"]
  for p in PERCENTS_12:
    r = results[p]
    gain = np.asarray(r["MetaDTL"]) - np.asarray(r["Single-task"])
    lines.append(f"| {p}% | {_cell(r['Single-task'])} | {_cell(r['MetaFT'])} | "
                 f"{_cell(r['MetaDTL'])} | {gain.mean():+.1f} ± {gain.std():.1f} |")
  return "\n".join(lines)


def run_table10(seeds=(0, 1, 2), train_size: int = 400, test_size: int = 400,
                teacher_steps: int = 300, student_steps: int = 300) -> str:
  """Table 10's MetaKD rows as markdown (gin/runs/table10_metakd.gin)."""
  r = table10(tuple(seeds), train_size, test_size, teacher_steps, student_steps)
  return ("Table 10 (MetaKD rows), accuracy (%) per domain, mean ± std over seeds "
          f"{list(seeds)}\n\n" + markdown10(r))


def run_table11(seeds=(0, 1, 2), train_size: int = 400, test_size: int = 400,
                meta_steps: int = 200, ft_steps: int = 60) -> str:
  """Table 11 as markdown (gin/runs/table11_metaft.gin)."""
  r = table11(tuple(seeds), train_size, test_size, meta_steps, ft_steps)
  return ("Table 11 (MetaFT with 5/10/20% of each domain's data), accuracy (%), mean ± "
          f"std over seeds {list(seeds)}\n\n" + markdown11(r))


def run_table12(seeds=(0, 1, 2), nli3_size: int = 1500, nli2_size: int = 2000,
                test_size: int = 400, meta_steps: int = 200, ft_steps: int = 60) -> str:
  """Table 12 as markdown (gin/runs/table12_metadtl.gin)."""
  r = table12(tuple(seeds), nli3_size, nli2_size, test_size, meta_steps, ft_steps)
  return ("Table 12 (nli2 target with nli3 for transfer), accuracy (%), mean ± std over "
          f"seeds {list(seeds)}\n\n" + markdown12(r))


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
  parser.add_argument("--nli3_size", type=int, default=1500)
  parser.add_argument("--nli2_size", type=int, default=2000)
  parser.add_argument("--nli_meta_steps", type=int, default=200)
  args = parser.parse_args(argv)
  start = time.time()
  if "10" in args.tables:
    print(run_table10(args.seeds, args.train_size, args.test_size, args.teacher_steps,
                      args.student_steps) + "\n", flush=True)
  if "11" in args.tables:
    print(run_table11(args.seeds, args.train_size, args.test_size, args.meta_steps,
                      args.ft_steps) + "\n", flush=True)
  if "12" in args.tables:
    print(run_table12(args.seeds, args.nli3_size, args.nli2_size, args.test_size,
                      args.nli_meta_steps, args.ft_steps) + "\n", flush=True)
  print(f"Command: python -m etjax.experiments.tl_meta "
        f"{' '.join(argv if argv is not None else sys.argv[1:])}  "
        f"({time.time() - start:.0f} s on {jax.devices()[0].platform})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
