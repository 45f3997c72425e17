"""The `etjax` command line: the one place that defines flags and touches gin.

    etjax train   --gin_file=gin/runs/demo.gin [--gin.train.num_steps=100 ...]
    etjax eval    --gin_file=gin/runs/demo.gin
    etjax predict --gin_file=gin/runs/demo.gin --input=texts.tsv --output=preds.tsv
    etjax demo    --gin_file=gin/runs/demo.gin
    etjax run     --gin_file=gin/runs/table8_feature_tl.gin   (a paper table)
    etjax plan    --model=t5-11b --mesh=data=2,fsdp=4,model=8 ...
    etjax models

Gin binds the plain functions below (`data`, `classifier`, `optimizer`, `mesh`,
`train`, `experiment` and the experiment functions of etjax.experiments) in the t5x
manner; `--gin.NAME=VALUE` overrides a binding. The fully resolved
config is written beside the checkpoints as config.gin.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Optional, Sequence

import gin

from etjax.data import synthetic

# --- gin-configurable job pieces --------------------------------------------------------


@gin.configurable
def data(source: str = "synthetic", *, train_path: Optional[str] = None,
         eval_path: Optional[str] = None, format: Optional[str] = None,  # pylint: disable=redefined-builtin
         text_a="text_a", text_b=None, label="label", domain=None, header: bool = True,
         on_error: str = "raise", synthetic_task: str = "sentiment",
         domains: Sequence[str] = synthetic.DOMAINS, train_size: int = 200,
         eval_size: int = 200, label_noise: float = 0.05, seed: int = 0,
         debian_dir: Optional[str] = None, debian_task: str = "use"):
  """The job's labelled data: 'synthetic', 'files' (CSV/TSV/JSONL) or 'debian'."""
  from etjax.data import readers  # pylint: disable=g-import-not-at-top
  from etjax.train import tasks  # pylint: disable=g-import-not-at-top
  if source == "synthetic":
    return tasks.synthetic_splits(task=synthetic_task, domains=domains,
                                  train_size=train_size, eval_size=eval_size, seed=seed,
                                  label_noise=label_noise)
  if source == "files":
    if not train_path or not eval_path:
      raise ValueError("data.source = 'files' needs data.train_path and data.eval_path")
    schema = readers.Schema(text_a=text_a, label=label, text_b=text_b, domain=domain,
                            header=header)
    return tasks.file_splits(train_path, eval_path, schema, format=format,
                             on_error=on_error)
  if source == "debian":
    if not debian_dir:
      raise ValueError("data.source = 'debian' needs data.debian_dir")
    return tasks.debian_splits(debian_dir, debian_task)
  raise ValueError(f"data.source = {source!r}: expected 'synthetic', 'files' or 'debian'")


@gin.configurable
def classifier(model: Optional[str] = "bert-tiny", pretrained: Optional[str] = None,
               random_init: bool = False, dropout: float = 0.1,
               overrides: Optional[dict] = None, vocab_size: int = 2000):
  """Model settings: a zoo name or a pretrained directory / hub id / 'package:NAME'."""
  return dict(model=model, pretrained=pretrained, random_init=random_init,
              dropout=dropout, overrides=overrides, vocab_size=vocab_size)


@gin.configurable
def optimizer(name: str = "adamw", learning_rate: float = 5e-5,
              warmup_fraction: float = 0.1, weight_decay: float = 0.01,
              max_grad_norm: float = 1.0):
  """Optimizer settings (etjax.algorithms.optim presets)."""
  return dict(name=name, learning_rate=learning_rate, warmup_fraction=warmup_fraction,
              weight_decay=weight_decay, max_grad_norm=max_grad_norm)


@gin.configurable
def mesh(spec: str = "data=-1", rules: str = "dp"):
  """Device mesh (e.g. 'data=2,model=4') and logical-axis rules preset."""
  return spec, rules


@gin.configurable
def train(workdir: str = gin.REQUIRED, num_steps: int = 100, batch_size: int = 32,
          eval_batch_size: int = 64, max_length: int = 64, seed: int = 0,
          eval_every: int = 0, checkpoint_every: int = 0,
          keep_best_metric: Optional[str] = "accuracy", log_every: int = 10,
          progress: bool = True):
  """Run settings."""
  return dict(workdir=workdir, num_steps=num_steps, batch_size=batch_size,
              eval_batch_size=eval_batch_size, max_length=max_length, seed=seed,
              eval_every=eval_every, checkpoint_every=checkpoint_every,
              keep_best_metric=keep_best_metric, log_every=log_every, progress=progress)


@gin.configurable
def experiment(fn=gin.REQUIRED):
  """The experiment a run file names (`experiment.fn = @feature_table8`)."""
  return fn()


# Library functions gin files may bind, by gin name: (module, function). The
# experiments are what run files name (`experiment.fn = @...`); the algorithm builders
# are what gin/algorithms/*.gin files configure.
EXPERIMENTS = {
    "feature_table8": ("etjax.experiments.tl_feature_instance", "run_table8"),
    "instance_table9": ("etjax.experiments.tl_feature_instance", "run_table9"),
    "distill_table10": ("etjax.experiments.tl_distill", "run_table10"),
    "meta_table10": ("etjax.experiments.tl_meta", "run_table10"),
    "meta_table11": ("etjax.experiments.tl_meta", "run_table11"),
    "meta_table12": ("etjax.experiments.tl_meta", "run_table12"),
}
ALGORITHMS = {
    "distill": ("etjax.algorithms.distill", "distill"),
    "pkd": ("etjax.algorithms.pkd", "pkd"),
    "distilbert": ("etjax.algorithms.distilbert", "distilbert"),
    "tinybert": ("etjax.algorithms.tinybert", "tinybert"),
    "AdaBertConfig": ("etjax.algorithms.adabert", "AdaBertConfig"),
    "adabert_search": ("etjax.algorithms.adabert", "adabert_search"),
    "feature_tl": ("etjax.algorithms.feature_based", "build_feature_step"),
    "instance_tl": ("etjax.algorithms.instance_based", "build_instance_step"),
    "ruder_plank": ("etjax.algorithms.ruder_plank", "ruder_plank"),
    "metaft": ("etjax.algorithms.metaft", "metaft"),
    "metadtl": ("etjax.algorithms.metadtl", "metadtl"),
    "meta_teacher": ("etjax.algorithms.metakd", "meta_teacher"),
    "metakd": ("etjax.algorithms.metakd", "metakd"),
}


def register_experiments() -> None:
  """Makes the experiment functions and algorithm builders gin configurables (once)."""
  import importlib  # pylint: disable=g-import-not-at-top
  for name, (module, function) in {**EXPERIMENTS, **ALGORITHMS}.items():
    if name not in _REGISTERED:
      gin.external_configurable(getattr(importlib.import_module(module), function),
                                name=name)
      _REGISTERED.add(name)


_REGISTERED: set = set()


# --- commands -----------------------------------------------------------------------------


def _job(workdir_suffix: str = "", **classifier_changes):
  """Assembles (trainer, splits, tokenizer, encode) from the gin bindings."""
  from etjax import algorithms  # pylint: disable=g-import-not-at-top
  from etjax.data import pipeline  # pylint: disable=g-import-not-at-top
  from etjax.train import tasks  # pylint: disable=g-import-not-at-top
  from etjax.train.trainer import Trainer  # pylint: disable=g-import-not-at-top
  run, model_cfg, opt = train(), classifier(), optimizer()
  model_cfg.update(classifier_changes)
  splits = data()
  pretrained_dir = (tasks.resolve_pretrained(model_cfg["pretrained"])
                    if model_cfg["pretrained"] else None)
  tokenizer = tasks.make_tokenizer(pretrained_dir, tasks.texts_of(splits.train),
                                   model_cfg["vocab_size"])
  overrides = dict(model_cfg["overrides"] or {})
  if not pretrained_dir:
    overrides.setdefault("vocab_size", tokenizer.vocab_size)
  module, pretrained = tasks.build_classifier(
      len(splits.label_names), model=model_cfg["model"], pretrained_dir=pretrained_dir,
      random_init=model_cfg["random_init"], dropout=model_cfg["dropout"],
      overrides=overrides)
  tx = algorithms.make_optimizer(
      opt["name"], learning_rate=opt["learning_rate"], total_steps=run["num_steps"],
      warmup_steps=int(opt["warmup_fraction"] * run["num_steps"]),
      weight_decay=opt["weight_decay"], max_grad_norm=opt["max_grad_norm"])
  step = algorithms.finetune(module, tx, pretrained=pretrained)
  spec, rules = mesh()
  workdir = os.path.join(run["workdir"], workdir_suffix) if workdir_suffix else run["workdir"]
  config = module.encoder.config
  trainer = Trainer(step, workdir=workdir, num_steps=run["num_steps"], mesh=spec,
                    rules=rules, seed=run["seed"], eval_every=run["eval_every"],
                    checkpoint_every=run["checkpoint_every"],
                    keep_best_metric=run["keep_best_metric"], log_every=run["log_every"],
                    progress=run["progress"],
                    pipeline=(config.pipeline_stages, config.pipeline_microbatches))
  encode = lambda examples: pipeline.encode_examples(examples, tokenizer,
                                                     run["max_length"])
  return trainer, splits, tokenizer, encode, run


def cmd_train(workdir_suffix: str = "", **classifier_changes) -> dict:
  """Trains (resuming when the workdir has checkpoints) and evaluates; returns metrics."""
  from etjax.data import pipeline  # pylint: disable=g-import-not-at-top
  from etjax.train import tasks  # pylint: disable=g-import-not-at-top
  trainer, splits, tokenizer, encode, run = _job(workdir_suffix, **classifier_changes)
  trainer.write_config(gin.config_str())
  tasks.save_job_assets(trainer.workdir, tokenizer, splits.label_names)
  train_iter = pipeline.train_iterator(encode(splits.train), run["batch_size"],
                                       seed=run["seed"])
  eval_data = pipeline.eval_batches(encode(splits.eval), run["eval_batch_size"])
  result = trainer.fit(train_iter, eval_data)
  metrics = result.eval_metrics or trainer.evaluate(result.state, eval_data)
  print(f"[{trainer.workdir}] step {result.step}: " +
        ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                  for k, v in metrics.items()))
  return metrics


def _restored(trainer, encode, examples):
  from etjax.data import pipeline  # pylint: disable=g-import-not-at-top
  example_batch = next(iter(pipeline.eval_batches(encode(examples[:1]), 1)))
  return trainer.restore(example_batch)


def cmd_eval() -> dict:
  """Evaluates the latest checkpoint of the workdir on the eval split."""
  from etjax.data import pipeline  # pylint: disable=g-import-not-at-top
  trainer, splits, _, encode, run = _job()
  state = _restored(trainer, encode, splits.eval)
  metrics = trainer.evaluate(state, pipeline.eval_batches(encode(splits.eval),
                                                          run["eval_batch_size"]))
  print(", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                  for k, v in metrics.items()))
  return metrics


def cmd_predict(input_path: str, output_path: str, workdir_suffix: str = "") -> list:
  """Classifies the texts of `input_path` (TSV) and writes a TSV of predictions."""
  from etjax.data import pipeline  # pylint: disable=g-import-not-at-top
  from etjax.train import tasks  # pylint: disable=g-import-not-at-top
  trainer, _, _, _, run = _job(workdir_suffix)
  tokenizer, label_names = tasks.load_job_assets(trainer.workdir)
  encode = lambda examples: pipeline.encode_examples(examples, tokenizer,
                                                     run["max_length"])
  examples = tasks.read_prediction_inputs(input_path)
  state = _restored(trainer, encode, examples)
  out = trainer.predict(state, pipeline.eval_batches(encode(examples),
                                                     run["eval_batch_size"]))
  tasks.write_predictions(output_path, examples, out["predictions"],
                          out["probabilities"], label_names)
  return [label_names[int(p)] for p in out["predictions"]]


DEMO_SENTENCES = (
    "the plot is gripping and the characters are memorable , i love it",
    "the blender is flimsy and broke after a week , a waste of money",
    "the picture quality is sharp and the price is fair , highly recommended",
    "the story is boring and predictable , avoid it",
)


def cmd_demo() -> None:
  """Fine-tunes the pretrained backbone and the same recipe from random weights,
  prints both accuracies, and predicts a few sentences with the fine-tuned model."""
  import tempfile  # pylint: disable=g-import-not-at-top
  pretrained = cmd_train()
  scratch = cmd_train("random_init", random_init=True)
  print("\n| start | accuracy | macro-F1 | AUC |\n|---|---|---|---|")
  for name, m in (("pretrained", pretrained), ("random init", scratch)):
    print(f"| {name} | {m['accuracy']:.4f} | {m['macro_f1']:.4f} | {m['auc']:.4f} |")
  with tempfile.TemporaryDirectory() as tmp:
    inputs, outputs = os.path.join(tmp, "in.tsv"), os.path.join(tmp, "out.tsv")
    with open(inputs, "w") as f:
      f.write("\n".join(DEMO_SENTENCES) + "\n")
    labels = cmd_predict(inputs, outputs)
  print("\nPredictions of the fine-tuned model:")
  for sentence, label in zip(DEMO_SENTENCES, labels):
    print(f"  {label:>9}  {sentence}")


def cmd_run() -> None:
  """Runs the experiment of the gin file (a paper table) and prints its result."""
  result = experiment()
  print(result if isinstance(result, str) else repr(result))


def cmd_models() -> None:
  from etjax.models import list_models  # pylint: disable=g-import-not-at-top
  print("\n".join(list_models()))


def cmd_plan(argv: Sequence[str]) -> int:
  """`etjax plan`: the per-device memory of a model's train step, compiled from shapes."""
  parser = argparse.ArgumentParser(prog="etjax plan", description=cmd_plan.__doc__)
  parser.add_argument("--model", required=True, help="a zoo name (etjax models)")
  parser.add_argument("--mesh", required=True, help="axis sizes, e.g. data=2,fsdp=4,model=8")
  parser.add_argument("--rules", default="2d", help="dp, fsdp, tp, 2d or 3d")
  parser.add_argument("--batch", type=int, default=8, help="global batch size")
  parser.add_argument("--length", type=int, default=512)
  parser.add_argument("--target_length", type=int, default=128,
                      help="decoder length (encoder-decoders only)")
  parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
  parser.add_argument("--remat", default="full")
  parser.add_argument("--optimizer", default="adamw")
  parser.add_argument("--pipeline", default="1x1", help="STAGESxMICROBATCHES")
  parser.add_argument("--device_memory_gib", type=float, default=None)
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  args = parser.parse_args(list(argv))
  import json  # pylint: disable=g-import-not-at-top
  from etjax.sharding import fake_devices  # pylint: disable=g-import-not-at-top
  from etjax.train import planning  # pylint: disable=g-import-not-at-top
  try:
    stages, micro = (int(v) for v in args.pipeline.lower().split("x"))
    spec = planning.PlanSpec(
        args.model, args.mesh, args.rules, args.batch, args.length,
        target_length=args.target_length, dtype=args.dtype, remat=args.remat,
        optimizer=args.optimizer, device_memory_gib=args.device_memory_gib,
        pipeline=(stages, micro))
    fake_devices.ensure_fake_devices(spec.num_devices)
    result = planning.plan_model(spec)
  except ValueError as e:
    print(f"etjax plan: error: {e}", file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps({"spec": dataclasses.asdict(spec), "plan": result.to_dict()}))
  else:
    print(result.format())
  return 0


# --- flags and gin ------------------------------------------------------------------------


def parse_gin_args(argv: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
  """Splits argv into (gin files, gin bindings, other args). `--gin.NAME=VALUE` becomes
  the binding `NAME = VALUE` (t5x style); `--gin_file=F` may repeat."""
  files, bindings, rest = [], [], []
  argv = list(argv)
  while argv:
    arg = argv.pop(0)
    if arg.startswith("--gin_file"):
      files.append(arg.split("=", 1)[1] if "=" in arg else argv.pop(0))
    elif arg.startswith("--gin."):
      name, sep, value = arg[len("--gin."):].partition("=")
      if not sep:
        if not argv:
          raise ValueError(f"{arg}: expected --gin.NAME=VALUE")
        value = argv.pop(0)
      bindings.append(f"{name} = {value}")
    else:
      rest.append(arg)
  return files, bindings, rest


def bind_gin(files: Sequence[str], bindings: Sequence[str]) -> None:
  """Parses gin files and bindings; a misspelt name fails naming it and where."""
  register_experiments()
  gin.clear_config()
  search = [os.getcwd(), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
  for path in search:
    gin.add_config_file_search_path(path)
  for path in files:
    if not any(os.path.exists(os.path.join(p, path)) for p in search + [""]):
      raise ValueError(f"--gin_file {path!r} not found")
  try:
    gin.parse_config_files_and_bindings(list(files), list(bindings))
  except (ValueError, KeyError) as e:
    raise ValueError(f"gin config error: {e}") from e


def _start_runtime(args: argparse.Namespace) -> None:
  """XLA flag presets, then the multi-controller runtime when this is one process of
  many (flags, else the JAX_* environment that launch/ scripts set)."""
  from etjax.sharding import distributed, xla_flags  # pylint: disable=g-import-not-at-top
  if args.xla_flag_preset != "none":
    xla_flags.apply_xla_flags(None if args.xla_flag_preset == "auto"
                              else args.xla_flag_preset)
  distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)


def run(argv: Optional[Sequence[str]] = None) -> int:
  """Entry point of the `etjax` console script."""
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(prog="etjax", description=__doc__.splitlines()[0])
  parser.add_argument("command", choices=["train", "eval", "predict", "demo", "run",
                                          "plan", "models"])
  parser.add_argument("--input", help="predict: TSV of text_a[<TAB>text_b] per line")
  parser.add_argument("--output", help="predict: where to write the predictions TSV")
  parser.add_argument("--coordinator_address", help="multi-host: process 0's host:port "
                      "(default: $JAX_COORDINATOR_ADDRESS)")
  parser.add_argument("--num_processes", type=int,
                      help="multi-host: processes in the job (default: $JAX_NUM_PROCESSES)")
  parser.add_argument("--process_id", type=int,
                      help="multi-host: this process's index (default: $JAX_PROCESS_ID)")
  parser.add_argument("--xla_flag_preset", default="auto",
                      choices=["auto", "none", "cpu", "gpu", "tpu"],
                      help="XLA performance flags (latency-hiding scheduler, collective "
                      "combining) for the platform; 'auto' detects it")
  try:
    files, bindings, rest = parse_gin_args(argv)
  except ValueError as e:
    parser.error(str(e))
  if rest and rest[0] == "plan":
    return cmd_plan(rest[1:])
  args = parser.parse_args(rest)
  if args.command == "models":
    cmd_models()
    return 0
  try:
    _start_runtime(args)
    bind_gin(files, bindings)
    if args.command == "train":
      cmd_train()
    elif args.command == "eval":
      cmd_eval()
    elif args.command == "predict":
      if not args.input or not args.output:
        parser.error("predict needs --input and --output")
      cmd_predict(args.input, args.output)
    elif args.command == "demo":
      cmd_demo()
    elif args.command == "run":
      cmd_run()
  except ValueError as e:
    print(f"etjax {args.command}: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(run())
