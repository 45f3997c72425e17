"""The `etjax` commands as a table (COMMANDS): each is a function registered with
`@command(name, help)` that reads its absl flags (defined in etjax/main.py) and, with
uses_gin, the bound gin configurables.

This module holds the table, the commands that need no job assembly (run, plan,
models, methods, export, serve, app) and `etjax app --help`; train, eval, predict and
demo are in job_commands.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from absl import flags

from etjax.apps import config as app_config
from etjax.cli import algorithm_files, job_commands
from etjax.cli.configurables import appzoo, experiment

FLAGS = flags.FLAGS
PROG = "etjax"


def cmd_run() -> None:
  """Runs the experiment of the gin file (a paper table) and prints its result."""
  result = experiment()
  print(result if isinstance(result, str) else repr(result))


def cmd_models() -> None:
  from etjax.models import list_models  # pylint: disable=g-import-not-at-top
  print("\n".join(list_models()))


def cmd_methods() -> None:
  """`etjax methods`: every transfer.method, one line each, with the settings it takes
  (transfer.method_args) and their defaults from gin/algorithms."""
  from etjax.transfer import methods  # pylint: disable=g-import-not-at-top
  defaults = algorithm_files.algorithm_settings()
  print("transfer.method (bind its settings with --gin.transfer.method_args={...}):")
  for method in methods.METHODS.values():
    print(f"  {method.name:<12} {method.family:<9} {method.summary}")
    if method.settings_file:
      selectors = defaults[method.settings_file]
      shown = "; ".join(
          ", ".join(f"{name + '.' if len(selectors) > 1 else ''}{k}={v!r}"
                    for k, v in settings.items()
                    if k not in ("method", "num_domains", "num_labels"))  # derived
          for name, settings in selectors.items())
      print(f"  {'':<12} {'':<9} gin/algorithms/{method.settings_file}.gin: {shown}")


def cmd_plan() -> int:
  """`etjax plan`: the per-device memory of a model's train step, compiled from shapes."""
  import json  # pylint: disable=g-import-not-at-top
  from etjax.sharding import fake_devices  # pylint: disable=g-import-not-at-top
  from etjax.train import planning  # pylint: disable=g-import-not-at-top
  if not FLAGS.model or not FLAGS.mesh:
    raise ValueError("plan needs --model (a zoo name: etjax models) and --mesh "
                     "(e.g. data=2,fsdp=4,model=8)")
  spec = planning.PlanSpec(
      FLAGS.model, FLAGS.mesh, FLAGS.rules, FLAGS.batch, FLAGS.length,
      target_length=FLAGS.target_length, dtype=FLAGS.dtype, remat=FLAGS.remat,
      optimizer=FLAGS.optimizer, device_memory_gib=FLAGS.device_memory_gib,
      pipeline=planning.parse_pipeline(FLAGS.pipeline))
  fake_devices.ensure_fake_devices(spec.num_devices)
  result = planning.plan_model(spec)
  if FLAGS.json:
    print(json.dumps({"spec": dataclasses.asdict(spec), "plan": result.to_dict()}))
  else:
    print(result.format())
  return 0


@dataclasses.dataclass(frozen=True)
class Command:
  """One `etjax COMMAND`: `fn()` reads absl FLAGS (and, with uses_gin, the bound gin
  functions) and returns an exit code (anything else than an int means 0). `runtime`: start the XLA presets
  and the multi-controller runtime first."""
  fn: Callable[[], Optional[int]]
  help: str
  uses_gin: bool = True
  runtime: bool = True


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, *, uses_gin: bool = True,  # pylint: disable=redefined-builtin
            runtime: bool = True):
  """Registers `fn` as `etjax NAME` (a decorator)."""
  def register(fn):
    COMMANDS[name] = Command(fn, help, uses_gin, runtime)
    return fn
  return register


def _predict_command() -> None:
  if not FLAGS.input or not FLAGS.output:
    raise ValueError("predict needs --input and --output")
  job_commands.cmd_predict(FLAGS.input, FLAGS.output)


command("train", "train (resuming from the workdir's checkpoints) and evaluate")(
    job_commands.cmd_train)
command("eval", "evaluate the workdir's latest checkpoint")(job_commands.cmd_eval)
command("predict", "classify --input into --output with the workdir's model")(
    _predict_command)
command("demo", "pretrained vs random-init fine-tuning, then a few predictions")(
    job_commands.cmd_demo)
command("run", "run the experiment of the gin file (a paper table)")(cmd_run)
command("plan", "per-device memory of a zoo model's train step (no gin)",
        uses_gin=False, runtime=False)(cmd_plan)
command("models", "list the ModelZoo names", uses_gin=False, runtime=False)(cmd_models)
command("methods", "list the transfer methods (transfer.method) and their settings",
        uses_gin=False, runtime=False)(cmd_methods)


@command("export", "the workdir's best (else latest) checkpoint as a new jax.export "
         "version under --output", uses_gin=False)
def cmd_export() -> None:
  from etjax.serving import export  # pylint: disable=g-import-not-at-top
  if not FLAGS.workdir or not FLAGS.output:
    raise ValueError("export needs --workdir and --output")
  print(f"exported {FLAGS.workdir} to {export.export_workdir(FLAGS.workdir, FLAGS.output)}")


@command("serve", "serve --export_dir over HTTP (POST /v1/predict, GET /v1/metadata, "
         "GET /health)", uses_gin=False)
def cmd_serve() -> None:
  from etjax.serving import server  # pylint: disable=g-import-not-at-top
  if not FLAGS.export_dir:
    raise ValueError("serve needs --export_dir")
  config = server.ServerConfig(max_batch_size=FLAGS.max_batch_size,
                               max_wait_ms=FLAGS.max_wait_ms,
                               api_key=server.api_key_from_env(FLAGS.api_key_env))
  server.serve(FLAGS.export_dir, host=FLAGS.host, port=FLAGS.port, config=config)


@command("app", "an AppZoo application with EasyTransfer's flags (etjax app --help)")
def cmd_app() -> None:
  """`etjax app --mode=... --modelName=...`: gin's appzoo bindings, then the flags."""
  import json  # pylint: disable=g-import-not-at-top
  from etjax.apps import runner  # pylint: disable=g-import-not-at-top
  given = {**appzoo(), **{n: FLAGS[n].value for n in app_config.FLAG_NAMES
                          if FLAGS[n].present}}
  result = runner.run_app(given)
  print(result if isinstance(result, str) else json.dumps(result, default=float))


def app_usage() -> str:
  """`etjax app --help`: the apps, one line each, and the app flags."""
  from etjax.apps.registry import describe_apps  # pylint: disable=g-import-not-at-top
  return "\n".join(
      [f"usage: {PROG} app --mode=train|evaluate|predict|export --modelName=APP "
       "[--FLAG=VALUE ...] [--gin_file=gin/runs/apps/APP.gin]", "", "apps:",
       describe_apps(), "", "flags (EasyTransfer's names):"]
      + [f"  --{n:22s} {app_config.FLAG_HELP[n]}" for n in app_config.FLAG_NAMES])
