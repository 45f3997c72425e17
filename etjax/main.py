"""The `etjax` command line: the one place that defines flags and touches gin.

    etjax train   --gin_file=gin/runs/demo.gin [--gin.train.num_steps=100 ...]
    etjax eval    --gin_file=gin/runs/demo.gin
    etjax predict --gin_file=gin/runs/demo.gin --input=texts.tsv --output=preds.tsv
    etjax demo    --gin_file=gin/runs/demo.gin
    etjax run     --gin_file=gin/runs/table8_feature_tl.gin   (a paper table)
    etjax plan    --model=t5-11b --mesh=data=2,fsdp=4,model=8 ...
    etjax models
    etjax export  --workdir=/tmp/run --output=/srv/models/demo   (jax.export version)
    etjax serve   --export_dir=/srv/models/demo [--port=8080 --api_key_env=NAME]

An absl binary in the t5x manner: flags are absl flags (`etjax --helpfull` lists them
all), `--gin_file` and `--gin_bindings` may repeat, and `--gin.NAME=VALUE` is shorthand
for `--gin_bindings='NAME = VALUE'`. Gin binds the plain functions of
etjax/cli/configurables.py (`data`, `classifier`, `optimizer`, `mesh`, `transfer`,
`train`, `experiment`, `appzoo`) and the experiment functions of etjax.experiments.
Gin files and their includes (`include 'gin/meshes/dp.gin'`) resolve against
--gin_search_paths, the current directory and the gin/ directory shipped with etjax,
from any directory (etjax/cli/gin_config.py). The fully resolved config is written
beside the checkpoints as config.gin.

This module defines the flags and runs a command; the commands are a table
(etjax/cli/commands.py COMMANDS): a new one is a function registered with
`@command(name, help)` that reads its absl flags and the bound gin functions; the run
it trains is assembled by etjax.jobs from plain settings.
"""

from __future__ import annotations

import inspect
import sys
import traceback
from typing import Optional, Sequence

from absl import app
from absl import flags
from absl import logging

from etjax.apps import config as app_config
# algorithm_settings, algorithm_file_bindings, bind_gin and parse_gin_args are also
# etjax.main's library API: tests, benchmarks and notebooks bind gin through them.
from etjax.cli.algorithm_files import algorithm_file_bindings, algorithm_settings  # pylint: disable=unused-import
from etjax.cli.commands import COMMANDS, PROG, app_usage
from etjax.cli.configurables import data
from etjax.cli.gin_config import bind_gin, one_line, parse_gin_args, rewrite_gin_args  # pylint: disable=unused-import

# --- flags --------------------------------------------------------------------------------

FLAGS = flags.FLAGS

flags.DEFINE_multi_string("gin_file", [], "A gin file to parse (repeatable; later files "
                          "override earlier ones), e.g. gin/runs/demo.gin.")
flags.DEFINE_multi_string("gin_bindings", [], "A gin binding 'NAME = VALUE' (repeatable, "
                          "applied after the files). Shorthand: --gin.NAME=VALUE.")
flags.DEFINE_multi_string("gin_search_paths", [], "Extra directories gin files and "
                          "their includes are looked up in (before the current "
                          "directory and etjax's own gin/).")
flags.DEFINE_string("input", None, "predict: the texts to classify (TSV).")
flags.DEFINE_string("output", None, "predict: where to write the predictions TSV; "
                    "export: the export directory (versions OUTPUT/1, OUTPUT/2, ...).")
flags.DEFINE_bool("verbose", False, "Show the traceback of a user error too.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: process 0's host:port "
                    "(default: $JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", None, "Multi-host: processes in the job "
                     "(default: $JAX_NUM_PROCESSES).", lower_bound=1)
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index "
                     "(default: $JAX_PROCESS_ID).", lower_bound=0)
flags.DEFINE_enum("xla_flag_preset", "auto", ["auto", "none", "cpu", "gpu", "tpu"],
                  "XLA performance flags (latency-hiding scheduler, collective "
                  "combining) for the platform; 'auto' detects it.")
# `etjax plan`
flags.DEFINE_string("model", None, "plan: a zoo name (etjax models).")
flags.DEFINE_string("mesh", None, "plan: axis sizes, e.g. data=2,fsdp=4,model=8.")
flags.DEFINE_string("rules", "2d", "plan: dp, fsdp, tp, 2d or 3d.")
flags.DEFINE_integer("batch", 8, "plan: global batch size.")
flags.DEFINE_integer("length", 512, "plan: sequence length.")
flags.DEFINE_integer("target_length", 128, "plan: decoder length (encoder-decoders only).")
flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "plan: precision.")
flags.DEFINE_string("remat", "full", "plan: rematerialization policy.")
flags.DEFINE_string("optimizer", "adamw", "plan: optimizer preset.")
flags.DEFINE_string("pipeline", "1x1", "plan: STAGESxMICROBATCHES.")
flags.DEFINE_float("device_memory_gib", None, "plan: memory per device to check the "
                   "plan against.")
flags.DEFINE_bool("json", False, "plan: print one JSON object.")
# `etjax export` / `etjax serve`
flags.DEFINE_string("workdir", None, "export: the workdir of an `etjax train` run.")
flags.DEFINE_string("export_dir", None, "serve: an export directory (its newest "
                    "complete version is served; newer ones are picked up).")
flags.DEFINE_string("host", "127.0.0.1", "serve: address to bind (loopback unless told "
                    "otherwise).")
flags.DEFINE_integer("port", 8080, "serve: TCP port.", lower_bound=0)
flags.DEFINE_integer("max_batch_size", 32, "serve: instances run together at most.",
                     lower_bound=1)
flags.DEFINE_float("max_wait_ms", 5.0, "serve: how long a batch smaller than "
                   "--max_batch_size waits for more requests.", lower_bound=0)
flags.DEFINE_string("api_key_env", None, "serve: an environment variable holding the "
                    "API key that /v1/* requests must send (Authorization: Bearer KEY).")
# etjax app: EasyTransfer's flag names, parsed and checked by etjax.apps.config.
for _name in app_config.FLAG_NAMES:
  flags.DEFINE_string(_name, None, f"app: {app_config.FLAG_HELP[_name]}.")
app.define_help_flags()  # --help, --helpfull, ... listed with the flags above


# --- running a command ---------------------------------------------------------------------


def _user_error_code(e: BaseException) -> Optional[int]:
  """The exit code of an error the user can fix (bad input, missing file, diverged
  run, locked workdir), or None for a bug (which keeps its traceback)."""
  from etjax.train import checkpoints  # pylint: disable=g-import-not-at-top
  if isinstance(e, FloatingPointError):
    return 3  # training diverged
  if isinstance(e, (ValueError, OSError, SyntaxError, flags.Error,
                    checkpoints.CorruptCheckpointError)):
    return 2
  if isinstance(e, RuntimeError) and "Required bindings" in str(e):
    return 2  # gin: a REQUIRED parameter (say train.workdir) was not bound
  if type(e).__name__ == "WorkdirLockedError":
    return 2
  return None


def usage(full: bool = False) -> str:
  """`etjax --help`: commands, gin usage, data bindings and this binary's flags."""
  names = ", ".join(f"data.{p}" for p in inspect.signature(data).parameters)
  text = [__doc__.split("\n\n")[0].splitlines()[0], "",
          f"usage: {PROG} COMMAND [--gin_file=FILE ...] [--gin.NAME=VALUE ...] "
          "[flags]", "", "commands:"]
  text += [f"  {name:8s} {c.help}" for name, c in COMMANDS.items()]
  text += ["", "configuration (gin, t5x style):",
           "  --gin_file=FILE        a gin file (repeatable), e.g. gin/runs/demo.gin",
           "  --gin.NAME=VALUE       one binding, e.g. --gin.train.num_steps=200 or "
           "--gin.train.workdir=\"'runs/x'\"",
           "                         (VALUE is a Python literal: quote strings and paths)",
           "  --gin_bindings='NAME = VALUE'  the same, long form",
           "  configurables: data, classifier, optimizer, mesh, train, experiment",
           "  your own data: --gin.data.source=\"'files'\" "
           "--gin.data.train_path=\"'train.tsv'\" --gin.data.eval_path=\"'dev.tsv'\"",
           "    data bindings: " + names, ""]
  if full:
    text.append(FLAGS.get_help())
  else:
    text.append(FLAGS.module_help(sys.modules[__name__]))
    text.append("\n(all flags, absl's included: etjax --helpfull)")
  return "\n".join(text)


def _parse_flags(argv: Sequence[str]) -> list[str]:
  """absl flags of `argv` (program name first), after `--help`/`--helpfull`, which
  print the usage and exit 0. A bad flag exits 2 with one line."""
  argv = list(argv)
  FLAGS.unparse_flags()  # a second run in one process starts from the defaults
  if any(a in ("-h", "-help", "--help", "--helpshort", "-?", "--helpfull")
         for a in argv[1:]):
    print(app_usage() if "app" in argv[1:] else usage(full="--helpfull" in argv))
    raise SystemExit(0)
  try:
    return FLAGS(argv)
  except flags.Error as e:
    print(f"{PROG}: error: {one_line(e)} (see {PROG} --help)", file=sys.stderr)
    raise SystemExit(2) from None


def _start_runtime() -> None:
  """XLA flag presets, then the multi-controller runtime when this is one process of
  many (flags, else the JAX_* environment that launch/ scripts set)."""
  from etjax.sharding import distributed, xla_flags  # pylint: disable=g-import-not-at-top
  if FLAGS.xla_flag_preset != "none":
    xla_flags.apply_xla_flags(None if FLAGS.xla_flag_preset == "auto"
                              else FLAGS.xla_flag_preset)
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                         FLAGS.process_id)


def _explicit_verbosity(argv: Sequence[str]) -> bool:
  del argv  # absl removed the flags; FLAGS remembers whether they were given
  return any(FLAGS[name].present for name in ("verbosity", "v") if name in FLAGS)


def _main(argv: Sequence[str]) -> int:
  """Runs the command named by the positional arguments left after absl's parse."""
  if len(argv) < 2 or argv[1] not in COMMANDS:
    got = f"unknown command {argv[1]!r}" if len(argv) > 1 else "no command given"
    print(f"{PROG}: error: {got}; expected one of {', '.join(COMMANDS)} "
          f"(see {PROG} --help)", file=sys.stderr)
    return 2
  name, extra = argv[1], argv[2:]
  if extra:
    print(f"{PROG} {name}: error: unexpected arguments {extra} (flags are --NAME=VALUE)",
          file=sys.stderr)
    return 2
  cmd = COMMANDS[name]
  if not _explicit_verbosity(argv):
    # absl.app turns INFO on; the libraries' INFO lines (orbax's per save) would bury
    # the command's own output, so only warnings show unless -v/--verbosity says.
    logging.set_verbosity(logging.WARNING)
  try:
    if cmd.runtime:
      _start_runtime()
    if cmd.uses_gin:
      bind_gin(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.gin_search_paths)
    result = cmd.fn()
    return result if isinstance(result, int) else 0
  except Exception as e:  # pylint: disable=broad-except
    code = _user_error_code(e)
    if code is None:
      raise  # a bug: keep the traceback
    if FLAGS.verbose:
      traceback.print_exc()
    logging.debug("etjax %s failed", name, exc_info=True)
    print(f"{PROG} {name}: error: {one_line(e)}", file=sys.stderr)
    return code


def run(argv: Optional[Sequence[str]] = None) -> int:
  """Entry point of the `etjax` console script (argv None: through absl.app.run, which
  sets up absl logging) and of tests (an argv list: the same parse and dispatch in this
  process, which absl.app allows only once). Returns the exit code."""
  try:
    args = [PROG] + rewrite_gin_args(sys.argv[1:] if argv is None else argv)
  except flags.Error as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return 2
  try:
    if argv is None:
      app.run(_main, argv=args, flags_parser=_parse_flags)
      return 0
    return _main(_parse_flags(args))
  except SystemExit as e:
    return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)


if __name__ == "__main__":
  sys.exit(run())
