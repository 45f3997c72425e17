"""Parameter-efficient transfer: LoRA, Houlsby adapters and prompt tuning as a transform
of a (model, optimizer) pair, from which any algorithm builds its TrainStep.

    model, tx = peft.transform(classifier, tx, peft.PeftConfig("lora", lora_rank=8))
    step = algorithms.finetune(model, tx, pretrained={"encoder": params})

`PeftModel` runs the wrapped Linen module under the method's interceptor (see
peft_sites: LoRA factors beside the targeted Dense kernels, adapters after attention
and MLP sublayers, a soft prompt before the encoder's layers) and stops gradients at
every parameter that is not trainable; `freeze` runs the optimizer on the trainable
leaves only, so frozen parameters carry no optimizer state and never move (not even
by weight decay). The pair is a transform rather than a TrainStep transform because
a TrainStep has its optimizer state built in; algorithms that take a model and an
optimizer accept the pair (fine-tuning is what the tests and the command line cover;
distillation students and MetaFT take the same arguments).

Trainable: the method's parameters plus the leaves matched by `train` (default: the
new classification head, and for adapters the layer norms, as Houlsby et al. train
them). `trainable_params` / `save_trainable` / `load_trainable` keep only that part;
`merge_lora` folds LoRA into the base weights for `models.save_pretrained` and export.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from etjax.algorithms import peft_sites
from etjax.algorithms.finetune import (classifier_loss, init_params, model_inputs,
                                       step_from_loss, with_pretrained)
from etjax.algorithms.step import TrainStep
from etjax.models.config import raise_failed
from etjax.models.layers import ACTIVATIONS

METHODS = ("lora", "adapter", "prompt")
# Leaves trained besides each method's own: the head, and adapters' layer norms.
HEAD = r"(^|/)classifier/"
NORMS = r"(?i)(^|/)[^/]*norm[^/]*/[^/]+$"
DEFAULT_TRAIN = {"lora": (HEAD,), "adapter": (HEAD, NORMS), "prompt": (HEAD,)}
OWN_PARAMS = {"lora": r"/lora_[ab]$", "adapter": r"(^|/)adapter/", "prompt": r"(^|/)prompt$"}


@dataclasses.dataclass(frozen=True)
class PeftConfig:
  """One parameter-efficient method and its settings.

  Attributes:
    method: 'lora', 'adapter' or 'prompt'.
    lora_rank, lora_alpha, lora_dropout: r, alpha (the update is scaled by alpha / r)
      and the dropout rate on the LoRA branch's input.
    lora_targets: Dense modules to adapt, by name or path suffix (regexes matched at a
      '/' boundary): ('query', 'value') is every attention query and value projection.
    adapter_size: bottleneck width of each adapter.
    adapter_activation: its nonlinearity (an etjax.models.layers activation name).
    adapter_targets: MultiHeadAttention / MLP modules that get an adapter after them.
    prompt_length: soft prompt vectors prepended to the encoder's input.
    prompt_init: 'tokens' (embedded real tokens of the init batch) or 'normal'.
    prompt_init_stddev: the stddev of the 'normal' init.
    prompt_target: the LayerStack (by name or path suffix) the prompt goes before.
    train: regexes (searched in '/'-joined parameter paths) of base parameters to
      train as well; None: DEFAULT_TRAIN of the method.
  """
  method: str = "lora"
  lora_rank: int = 8
  lora_alpha: float = 16.0
  lora_dropout: float = 0.0
  lora_targets: tuple[str, ...] = ("query", "value")
  adapter_size: int = 64
  adapter_activation: str = "gelu"
  adapter_targets: tuple[str, ...] = ("attention", "mlp")
  prompt_length: int = 20
  prompt_init: str = "tokens"
  prompt_init_stddev: float = 0.5
  prompt_target: str = "encoder"
  train: Optional[tuple[str, ...]] = None

  def __post_init__(self):
    for name in ("lora_targets", "adapter_targets", "train"):
      value = getattr(self, name)
      if isinstance(value, str):
        object.__setattr__(self, name, (value,))
      elif value is not None:
        object.__setattr__(self, name, tuple(value))
    raise_failed(self, [
        (self.method in METHODS, "method", f"one of {METHODS}"),
        (self.lora_rank >= 1, "lora_rank", "a positive integer"),
        (0.0 <= self.lora_dropout < 1.0, "lora_dropout", "in [0, 1)"),
        (bool(self.lora_targets), "lora_targets", "at least one module name"),
        (self.adapter_size >= 1, "adapter_size", "a positive integer"),
        (self.adapter_activation in ACTIVATIONS, "adapter_activation",
         f"one of {sorted(ACTIVATIONS)}"),
        (bool(self.adapter_targets), "adapter_targets", "at least one module name"),
        (self.prompt_length >= 1, "prompt_length", "a positive integer"),
        (self.prompt_init in ("tokens", "normal"), "prompt_init", "'tokens' or 'normal'"),
    ])
    for pattern in (self.lora_targets + self.adapter_targets + (self.prompt_target,) +
                    (self.train or ())):
      try:
        re.compile(pattern)
      except re.error as e:
        raise ValueError(f"PeftConfig: {pattern!r} is not a valid regex: {e}") from e

  @property
  def lora_scale(self) -> float:
    return self.lora_alpha / self.lora_rank

  def trainable(self) -> Callable[[str], bool]:
    """path ('/'-joined) -> whether that parameter is trained."""
    train = DEFAULT_TRAIN[self.method] if self.train is None else self.train
    patterns = [re.compile(p) for p in (OWN_PARAMS[self.method],) + tuple(train)]
    return lambda path: any(p.search(path) for p in patterns)


class PeftModel:
  """A Linen module with a PEFT method attached; `init` and `apply` as Linen's.

  Other attributes (`encoder`, `num_labels`, ...) are the wrapped module's.
  """

  def __init__(self, module: nn.Module, config: PeftConfig):
    self.module, self.config = module, config
    self.is_trainable = config.trainable()

  def __getattr__(self, name):
    if name in ("module", "config", "is_trainable"):
      raise AttributeError(name)
    return getattr(self.module, name)

  def _interceptor(self, deterministic: bool, sites: list):
    cfg = self.config
    if cfg.method == "lora":
      return peft_sites.lora_interceptor(cfg.lora_targets, cfg.lora_rank,
                                         cfg.lora_alpha, cfg.lora_dropout,
                                         deterministic, sites)
    if cfg.method == "adapter":
      return peft_sites.adapter_interceptor(cfg.adapter_targets, cfg.adapter_size,
                                            cfg.adapter_activation, sites)
    return peft_sites.prompt_interceptor(cfg.prompt_target, cfg.prompt_length,
                                         cfg.prompt_init, cfg.prompt_init_stddev, sites)

  def init(self, rngs, *args, **kwargs):
    """Linen's init, with the method's parameters added.

    Raises:
      ValueError: the method's targets matched no module of the model (naming them).
    """
    sites: list = []
    with nn.intercept_methods(self._interceptor(True, sites)):
      variables = self.module.init(rngs, *args, **kwargs)
    if not sites:
      cfg = self.config
      targets = {"lora": cfg.lora_targets, "adapter": cfg.adapter_targets,
                 "prompt": (cfg.prompt_target,)}[cfg.method]
      raise ValueError(f"PEFT {cfg.method!r}: targets {list(targets)} match no module "
                       f"of {type(self.module).__name__}; parameter paths: "
                       f"{sorted(peft_sites.flatten(nn.meta.unbox(variables['params'])))}")
    return variables

  def apply(self, variables, *args, **kwargs):
    """Linen's apply; gradients stop at the frozen parameters."""
    params = peft_sites.stop_gradient_where(variables["params"],
                                            lambda p: not self.is_trainable(p))
    deterministic = kwargs.get("deterministic", True)
    with nn.intercept_methods(self._interceptor(deterministic, [])):
      return self.module.apply({**variables, "params": params}, *args, **kwargs)


  def init_prompt(self, params: Any, rng: jax.Array, batch: Any) -> Any:
    """`params` with the soft prompt drawn anew from the inputs the encoder's layers
    see for `batch` under these params (init 'tokens'), e.g. once pretrained weights
    are in: `init` runs on fresh random weights, whose embeddings are not the ones
    the prompt should start from."""
    flat = peft_sites.flatten(params)
    prompt_keys = [k for k in flat if re.search(OWN_PARAMS["prompt"], k)]
    rest = peft_sites.unflatten({k: v for k, v in flat.items() if k not in prompt_keys})
    with nn.intercept_methods(self._interceptor(True, [])):
      _, fresh = self.module.apply({"params": rest}, *model_inputs(batch),
                                   rngs={"params": rng}, mutable=["params"])
    fresh = peft_sites.flatten(fresh["params"])
    return peft_sites.unflatten({**flat, **{k: fresh[k] for k in prompt_keys}})


def freeze(tx: optax.GradientTransformation,
           is_trainable: Callable[[str], bool]) -> optax.GradientTransformation:
  """Runs `tx` on the trainable leaves only; frozen leaves get zero updates and no
  state (the state is `tx`'s state of the trainable sub-tree, boxes kept)."""
  def init_fn(params):
    return tx.init(trainable_params(params, is_trainable))

  def update_fn(updates, state, params=None):
    sub_params = None if params is None else trainable_params(params, is_trainable)
    sub_updates, state = tx.update(trainable_params(updates, is_trainable), state,
                                   sub_params)
    new = peft_sites.flatten(sub_updates)
    full = {k: new[k] if k in new else jax.tree.map(jnp.zeros_like, v)
            for k, v in peft_sites.flatten(updates).items()}
    return peft_sites.unflatten(full), state

  return optax.GradientTransformation(init_fn, update_fn)


def transform(model: nn.Module, tx: optax.GradientTransformation,
              config: PeftConfig) -> tuple[PeftModel, optax.GradientTransformation]:
  """(model with the method attached, `tx` on its trainable parameters only)."""
  peft_model = PeftModel(model, config)
  return peft_model, freeze(tx, peft_model.is_trainable)


def finetune(model: nn.Module, tx: optax.GradientTransformation, config: PeftConfig,
             *, pretrained: Optional[Mapping[str, Any]] = None,
             label_smoothing: float = 0.0) -> TrainStep:
  """`algorithms.finetune` of the transformed pair; with pretrained weights and a
  prompt initialised from tokens, the prompt is drawn from the pretrained embeddings.

  Returns:
    A TrainStep whose state's params hold base and PEFT parameters (frozen ones
    unchanged by updates) and whose opt_state covers the trainable ones only.
  """
  peft_model, peft_tx = transform(model, tx, config)

  def init_fn(rng, batch):
    params = init_params(peft_model, rng, batch, pretrained)
    if pretrained and config.method == "prompt" and config.prompt_init == "tokens":
      params = peft_model.init_prompt(params, jax.random.fold_in(rng, 1), batch)
    return params

  return step_from_loss(classifier_loss(peft_model, label_smoothing), init_fn, peft_tx)


def trainable_params(params: Any, is_trainable: Callable[[str], bool]) -> dict:
  """The nested sub-tree of `params` whose leaf paths `is_trainable` selects (boxes
  kept as they are)."""
  return peft_sites.unflatten({k: v for k, v in peft_sites.flatten(params).items()
                               if is_trainable(k)})


def merge_trainable(params: Any, trainable: Any) -> Any:
  """`params` with the leaves of `trainable` (a sub-tree, e.g. from `load_trainable`)
  put in; shapes are checked and a leaf `params` lacks is an error naming it."""
  return with_pretrained(params, trainable)


def merge_lora(params: Any, config: PeftConfig) -> dict:
  """Plain params of the base model with every LoRA update folded into its kernel."""
  if config.method != "lora":
    raise ValueError(f"merge_lora: method is {config.method!r}; only LoRA merges into "
                     "the base weights (adapters and prompts add computation)")
  return peft_sites.merge_lora(params, config.lora_scale)


TRAINABLE_FILE, CONFIG_FILE = "trainable.safetensors", "peft_config.json"


def save_trainable(directory: str, params: Any, config: PeftConfig, *,
                   overwrite: bool = False) -> str:
  """Writes the trainable part of `params` (safetensors, '/'-joined keys) and the
  PeftConfig (JSON) to `directory`. Refuses to replace a saved one unless overwrite.
  Returns the directory."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, TRAINABLE_FILE)
  if os.path.exists(path) and not overwrite:
    raise ValueError(f"{path} exists; pass overwrite=True to replace it")
  flat = peft_sites.flatten(jax.device_get(nn.meta.unbox(
      trainable_params(params, config.trainable()))))
  save_file({k: np.ascontiguousarray(v) for k, v in flat.items()}, path + ".tmp")
  os.replace(path + ".tmp", path)
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    json.dump(config_json(config), f, indent=2, sort_keys=True)
  return directory


def load_trainable(directory: str) -> tuple[PeftConfig, dict]:
  """(PeftConfig, nested dict of numpy arrays) saved by `save_trainable`; put them into
  a model's params with `merge_trainable`."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  paths = [os.path.join(directory, n) for n in (TRAINABLE_FILE, CONFIG_FILE)]
  for path in paths:
    if not os.path.exists(path):
      raise ValueError(f"{path} not found: not a directory written by save_trainable")
  return read_config(paths[1]), peft_sites.unflatten(load_file(paths[0]))


def config_json(config: PeftConfig) -> dict:
  """`config` as the JSON object CONFIG_FILE holds (tuples as lists, so that it
  equals the file read back)."""
  return json.loads(json.dumps(dataclasses.asdict(config)))


def read_config(path: str) -> PeftConfig:
  """The PeftConfig of a CONFIG_FILE (`save_trainable`'s, or a trained workdir's).

  Raises:
    ValueError: not readable JSON, or fields PeftConfig rejects (naming `path`).
  """
  try:
    with open(path, encoding="utf-8") as f:
      fields = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not readable JSON ({e})") from None
  if not isinstance(fields, dict):
    raise ValueError(f"{path}: expected a JSON object of PeftConfig fields")
  try:
    return PeftConfig(**fields)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{path}: bad PeftConfig fields: {e}") from e


def count_params(params: Any, is_trainable: Optional[Callable[[str], bool]] = None
                 ) -> int:
  """Number of scalars in `params` (only the trainable ones when `is_trainable`)."""
  flat = peft_sites.flatten(nn.meta.unbox(params))
  return int(sum(math.prod(np.shape(v)) for k, v in flat.items()
                 if is_trainable is None or is_trainable(k)))


def tree_bytes(tree: Any) -> int:
  """Bytes of every array leaf of `tree` (e.g. an optimizer state)."""
  return int(sum(math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(nn.meta.unbox(tree))))


def trainable_summary(params: Any, config: PeftConfig) -> dict:
  """{'total', 'trainable', 'fraction'} parameter counts."""
  total = count_params(params)
  trainable = count_params(params, config.trainable())
  return {"total": total, "trainable": trainable, "fraction": trainable / total}


def config_from_flags(method: str, **settings) -> Optional[PeftConfig]:
  """A PeftConfig from command-line style settings; None for method 'none' / ''."""
  if not method or method == "none":
    return None
  known = {f.name for f in dataclasses.fields(PeftConfig)}
  unknown = sorted(set(settings) - known)
  if unknown:
    raise ValueError(f"unknown PEFT setting(s) {unknown}; known: {sorted(known)}")
  return PeftConfig(method=method, **settings)


__all__: Sequence[str] = (
    "PeftConfig", "PeftModel", "freeze", "transform", "finetune", "trainable_params",
    "merge_trainable", "merge_lora", "save_trainable", "load_trainable", "config_json",
    "read_config", "count_params",
    "tree_bytes", "trainable_summary", "config_from_flags", "METHODS")
