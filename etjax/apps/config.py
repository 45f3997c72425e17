"""The AppZoo's settings: EasyTransfer's flag names parsed into one validated config.

`AppConfig.from_flags({'mode': 'train', 'modelName': 'text_classify_bert', ...})`
takes the flags by their EasyTransfer names (camelCase); an unknown name, a bad value
or an inconsistent combination fails naming the flag. `--inputSchema` is
`name:type:length,...` (type str, int or float; length > 1 for a column holding that
many comma-separated values); `--advancedParameters` is `key=value` pairs separated
by spaces or ';' whose keys each app declares (etjax.apps.base.App.advanced).
"""

from __future__ import annotations

import ast
import dataclasses
from typing import Any, Mapping, Optional

MODES = ("train", "evaluate", "predict", "export")
OPTIMIZERS = ("adam", "adamw", "lamb", "adafactor")
OUTPUT_COLUMNS = ("predictions", "probabilities", "logits")


@dataclasses.dataclass(frozen=True)
class Column:
  """One column of --inputSchema."""
  name: str
  type: str
  length: int


def parse_schema(text: str) -> tuple[Column, ...]:
  """'name:type:length,...' -> Columns; each part named in the error if malformed."""
  columns = []
  for part in (p.strip() for p in text.split(",") if p.strip()):
    pieces = part.split(":")
    if len(pieces) != 3:
      raise ValueError(f"{part!r} is not name:type:length")
    name, type_, length = pieces
    if type_ not in ("str", "int", "float"):
      raise ValueError(f"column {name!r} has type {type_!r}; expected "
                       "str, int or float")
    try:
      size = int(length)
    except ValueError:
      size = 0
    if size < 1:
      raise ValueError(f"column {name!r} has length {length!r}; expected "
                       "a positive integer")
    if name in {c.name for c in columns}:
      raise ValueError(f"column {name!r} appears twice")
    columns.append(Column(name, type_, size))
  if not columns:
    raise ValueError("the schema names no columns")
  return tuple(columns)


def parse_advanced(text: str | Mapping[str, Any] | None) -> dict[str, Any]:
  """'k=v k2=v2' (or ';'-separated) -> {k: python literal or string}."""
  if text is None:
    return {}
  if isinstance(text, Mapping):
    return dict(text)
  out = {}
  for item in text.replace(";", " ").split():
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise ValueError(f"{item!r} is not key=value")
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  return out


def _split_list(value: Any) -> tuple[str, ...]:
  if value is None:
    return ()
  if isinstance(value, str):
    return tuple(v.strip() for v in value.split(",") if v.strip())
  return tuple(str(v) for v in value)


# flag name -> (field, parser). None values mean "not given".
_FLAGS = {
    "mode": ("mode", str),
    "modelName": ("model_name", str),
    "inputTable": ("input_table", _split_list),
    "inputSchema": ("input_schema", parse_schema),
    "firstSequence": ("first_sequence", str),
    "secondSequence": ("second_sequence", str),
    "labelName": ("label_name", str),
    "labelEnumerateValues": ("label_enumerate_values", _split_list),
    "sequenceLength": ("sequence_length", int),
    "batchSize": ("batch_size", int),
    "numEpochs": ("num_epochs", float),
    "learningRate": ("learning_rate", float),
    "optimizerType": ("optimizer_type", str),
    "checkpointDir": ("checkpoint_dir", str),
    "saveCheckpointSteps": ("save_checkpoint_steps", int),
    "pretrainedModel": ("pretrained_model", str),
    "outputTable": ("output_table", str),
    "outputSchema": ("output_schema", _split_list),
    "appendCols": ("append_cols", _split_list),
    "exportDirBase": ("export_dir_base", str),
    "distributionStrategy": ("distribution_strategy", str),
    "advancedParameters": ("advanced_parameters", parse_advanced),
}
FLAG_NAMES = tuple(_FLAGS)
FLAG_HELP = {
    "mode": "train, evaluate, predict or export",
    "modelName": "the app (etjax app --help lists them)",
    "inputTable": "headerless TSV: 'train[,dev]' for train, one file otherwise",
    "inputSchema": "the table's columns: name:type:length,... (type str, int, float)",
    "firstSequence": "the column of the (first) text",
    "secondSequence": "the column of the second text of a pair",
    "labelName": "the column of the label",
    "labelEnumerateValues": "the labels, comma-separated (default: seen in training)",
    "sequenceLength": "tokens per input (default 128)",
    "batchSize": "examples per step (default 32)",
    "numEpochs": "passes over the training table (default 1)",
    "learningRate": "peak learning rate (default 5e-5)",
    "optimizerType": "adam, adamw, lamb or adafactor (default adamw)",
    "checkpointDir": "where train writes checkpoints and what the other modes read",
    "saveCheckpointSteps": "save every this many steps (default: at the end)",
    "pretrainedModel": "a zoo name, a Hugging Face directory or package:NAME",
    "outputTable": "predict: the output TSV (or .npy)",
    "outputSchema": "predict: output columns (default predictions,probabilities,logits)",
    "appendCols": "predict: input columns copied after the outputs",
    "exportDirBase": "export: the root of the versioned export directories",
    "distributionStrategy": "MESH[:RULES], e.g. data=-1:dp or data=2,model=4:tp",
    "advancedParameters": "app settings as 'key=value key=value' (unknown keys fail)",
}

# What evaluate/predict/export take from train_config.json when not given again.
MODEL_FLAGS = ("modelName", "pretrainedModel", "sequenceLength", "firstSequence",
               "secondSequence", "labelName", "labelEnumerateValues",
               "advancedParameters", "distributionStrategy", "inputSchema",
               "optimizerType")


@dataclasses.dataclass(frozen=True)
class AppConfig:
  """One `etjax app` invocation (fields are the flags in snake_case)."""
  mode: str
  model_name: str
  checkpoint_dir: Optional[str] = None
  input_table: tuple[str, ...] = ()
  input_schema: tuple[Column, ...] = ()
  first_sequence: Optional[str] = None
  second_sequence: Optional[str] = None
  label_name: Optional[str] = None
  label_enumerate_values: tuple[str, ...] = ()
  sequence_length: int = 128
  batch_size: int = 32
  num_epochs: float = 1.0
  learning_rate: float = 5e-5
  optimizer_type: str = "adamw"
  save_checkpoint_steps: int = 0
  pretrained_model: Optional[str] = None
  output_table: Optional[str] = None
  output_schema: tuple[str, ...] = ()   # () = the app's default columns
  append_cols: tuple[str, ...] = ()
  export_dir_base: Optional[str] = None
  distribution_strategy: str = "data=-1:dp"
  advanced_parameters: dict = dataclasses.field(default_factory=dict)

  @classmethod
  def from_flags(cls, flags: Mapping[str, Any]) -> "AppConfig":
    """Parses EasyTransfer-named flags (None = not given) and validates them."""
    unknown = sorted(set(flags) - set(_FLAGS))
    if unknown:
      raise ValueError(f"unknown app flags {unknown}; known: {', '.join(FLAG_NAMES)}")
    values = {}
    for flag, value in flags.items():
      if value is None:
        continue
      field, parse = _FLAGS[flag]
      try:
        values[field] = parse(value)
      except ValueError as e:
        raise ValueError(f"--{flag}={value!r}: {e}") from e
    for flag in ("mode", "modelName"):
      if _FLAGS[flag][0] not in values:
        raise ValueError(f"--{flag} is required")
    config = cls(**values)
    config.validate()
    return config

  @property
  def mesh_and_rules(self) -> tuple[str, str]:
    """(mesh spec, rules preset) of --distributionStrategy 'SPEC[:RULES]'."""
    spec, _, rules = self.distribution_strategy.partition(":")
    return spec, rules or "dp"

  def column(self, name: str, flag: str) -> Column:
    """The schema column `name`, or an error naming the flag and the schema."""
    for c in self.input_schema:
      if c.name == name:
        return c
    raise ValueError(f"--{flag}={name!r} is not a column of --inputSchema "
                     f"({', '.join(c.name for c in self.input_schema)})")

  def validate(self) -> None:
    """Checks values and combinations; raises ValueError naming the flag."""
    if self.mode not in MODES:
      raise ValueError(f"--mode={self.mode!r}; expected one of {', '.join(MODES)}")
    if self.optimizer_type not in OPTIMIZERS:
      raise ValueError(f"--optimizerType={self.optimizer_type!r}; expected one of "
                       f"{', '.join(OPTIMIZERS)}")
    for flag, value in (("sequenceLength", self.sequence_length),
                        ("batchSize", self.batch_size)):
      if value < 1:
        raise ValueError(f"--{flag} must be positive, got {value}")
    if self.num_epochs <= 0 or self.learning_rate <= 0:
      raise ValueError("--numEpochs and --learningRate must be positive")
    if self.save_checkpoint_steps < 0:
      raise ValueError("--saveCheckpointSteps must be >= 0")
    if self.mode != "export":
      if not self.input_table:
        raise ValueError(f"--mode={self.mode} needs --inputTable")
      if not self.input_schema:
        raise ValueError(f"--mode={self.mode} needs --inputSchema")
      if self.mode == "train" and len(self.input_table) > 2:
        raise ValueError("--inputTable for training is 'train[,dev]', got "
                         f"{len(self.input_table)} files")
      if self.mode != "train" and len(self.input_table) != 1:
        raise ValueError(f"--inputTable for --mode={self.mode} is one file, got "
                         f"{list(self.input_table)}")
      for flag, name in (("firstSequence", self.first_sequence),
                         ("secondSequence", self.second_sequence)):
        if name is not None:
          self.column(name, flag)
      for name in self.append_cols:
        self.column(name, "appendCols")
    if self.mode == "predict" and not self.output_table:
      raise ValueError("--mode=predict needs --outputTable")
    if self.mode == "export" and not self.export_dir_base:
      raise ValueError("--mode=export needs --exportDirBase")

  def to_flags(self) -> dict:
    """The flags that reproduce this config (JSON-serialisable)."""
    out = {}
    for flag, (field, _) in _FLAGS.items():
      value = getattr(self, field)
      if field == "input_schema":
        value = ",".join(f"{c.name}:{c.type}:{c.length}" for c in value)
      elif isinstance(value, tuple):
        value = ",".join(value)
      out[flag] = None if value == "" else value
    return out
