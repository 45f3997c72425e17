"""Hugging Face interop: load and save transformers-compatible directories.

`from_pretrained(path_or_hub_id)` reads config.json + model.safetensors and returns
`(module, params)`; `save_pretrained(module, params, directory)` writes a directory that
transformers loads. Each model family describes its weights once, as a list of
`ParamRule`s (Hugging Face name <-> Flax path, with a layout transform), and registers a
`Family`; both directions are driven by that one table.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import numpy as np

Params = dict


# --- Layout transforms between torch (Linear: [out, in]) and Flax (kernel: [in..., out...])

@dataclasses.dataclass(frozen=True)
class Transform:
  """How one tensor maps between the two layouts; the two functions are inverses.

  to_flax(hf_array, flax_shape) -> flax array; to_hf(flax_array) -> hf array.
  """
  to_flax: Callable[[np.ndarray, tuple], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


def linear(n_in: int = 1) -> Transform:
  """A torch Linear weight [out, in] <-> a Flax kernel whose first n_in dims are inputs
  (q/k/v kernels [embed, heads, head_dim] have n_in=1; output kernels
  [heads, head_dim, embed] have n_in=2)."""
  return Transform(
      to_flax=lambda w, shape: w.T.reshape(shape),
      to_hf=lambda k: k.reshape(int(np.prod(k.shape[:n_in])), -1).T)


COPY = Transform(lambda a, shape: a, lambda a: a)
# Biases (and norms) that Flax splits, e.g. [heads * head_dim] <-> [heads, head_dim].
FLAT = Transform(lambda a, shape: a.reshape(shape), lambda a: a.reshape(-1))
LINEAR = linear(1)
LINEAR_FROM_HEADS = linear(2)


@dataclasses.dataclass(frozen=True)
class ParamRule:
  """One weight: its Hugging Face name (may contain '{i}' for the layer index), its
  Flax path, and the transform between them. `stacked` rules are per-layer weights that
  Flax keeps stacked on a leading 'layers' axis.

  `num_layers` gives a stacked rule its own layer count (an encoder-decoder's two stacks
  may differ in depth); None means the family's `num_stacked(config)`. `fallback` names
  the tensor to load when `hf_name` is absent (a weight that a checkpoint stores once
  under another name because the two are tied); saving always writes `hf_name`.
  `split=(k, n)` maps the k-th of n equal parts of the tensor's last axis (a fused
  projection such as GPT-2's c_attn, whose query, key and value are three Flax
  kernels); saving concatenates the parts in order. An `optional` weight may be
  absent from a checkpoint (a task head, a pooler that head models drop): loading
  then starts it from the module's own initialisation.
  """
  hf_name: str
  flax_path: tuple[str, ...]
  transform: Transform = COPY
  stacked: bool = False
  num_layers: Optional[int] = None
  fallback: Optional[str] = None
  split: Optional[tuple[int, int]] = None
  optional: bool = False


@dataclasses.dataclass(frozen=True)
class Family:
  """What interop needs to know about one model family (keyed by HF model_type)."""
  model_types: tuple[str, ...]
  config_from_hf: Callable[[Mapping[str, Any]], Any]
  config_to_hf: Callable[[Any], dict]
  rules: Callable[[Any], Sequence[ParamRule]]   # config -> rules
  num_stacked: Callable[[Any], int]             # config -> layers stacked in Flax
  hf_prefixes: tuple[str, ...] = ()             # stripped when loading head models


@dataclasses.dataclass(frozen=True)
class Head:
  """A task head over a family's backbone (e.g. 'mlm' over BERT), as transformers'
  *For<Task> classes: `build(backbone_module)` returns the module with the head (it
  names its head `hf_head` and exposes the backbone's `config`), `rules(config)` every
  weight of it (backbone and head), `architecture(config)` the class name saved in
  config.json."""
  build: Callable[[nn.Module], nn.Module]
  rules: Callable[[Any], Sequence[ParamRule]]
  architecture: Callable[[Any], str]


_FAMILIES: dict[str, Family] = {}
_HEADS: dict[tuple[str, str], Head] = {}
_FAMILY_MODULES = ("etjax.models.bert_hf", "etjax.models.t5_hf", "etjax.models.gpt2_hf",
                   "etjax.models.mlm")


def register_family(family: Family) -> None:
  for model_type in family.model_types:
    _FAMILIES[model_type] = family


def register_head(model_types: Sequence[str], name: str, head: Head) -> None:
  """Makes head `name` loadable and savable for the families of `model_types`."""
  for model_type in model_types:
    _HEADS[(model_type, name)] = head


def _head(family: Family, name: str) -> Head:
  model_type = family.model_types[0]
  if (model_type, name) not in _HEADS:
    known = sorted(h for t, h in _HEADS if t == model_type)
    raise ValueError(f"no head {name!r} for model_type {model_type!r}; known: {known}")
  return _HEADS[(model_type, name)]


def _family(model_type: str) -> Family:
  from etjax.models.zoo import import_present  # pylint: disable=g-import-not-at-top
  import_present(_FAMILY_MODULES)
  if model_type not in _FAMILIES:
    raise ValueError(f"model_type {model_type!r} is not supported; supported: "
                     f"{sorted(_FAMILIES)}")
  return _FAMILIES[model_type]


def _model_type_of(config: Any) -> str:
  return getattr(config, "model_type")


# --- Tensors <-> params ------------------------------------------------------

def _get(tree: Mapping, path: Sequence[str]):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict, path: Sequence[str], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def tensors_to_params(tensors: Mapping[str, np.ndarray], config: Any,
                      abstract_params: Mapping, where: str = "",
                      head: Optional[str] = None, missing: Optional[list] = None
                      ) -> Params:
  """Builds Flax params (plain numpy) from HF tensors, shaped like `abstract_params`.

  `head` names a task head registered for the family (its rules then apply).
  Optional weights absent from `tensors` are left out of the result and their Flax
  paths appended to `missing` (when given). Raises ValueError naming a missing
  tensor or a shape mismatch.
  """
  family = _family(_model_type_of(config))
  tensors = _strip_prefixes(tensors, family.hf_prefixes)
  params: dict = {}
  for rule in _rules(family, config, head):
    target = _get(abstract_params, rule.flax_path)
    n = _num_layers(rule, family, config)
    names = [rule.hf_name.format(i=i) for i in range(n)] if rule.stacked else [rule.hf_name]
    per_layer_shape = target.shape[1:] if rule.stacked else target.shape
    # A stacked rule's fallback names each layer too ('{i}').
    fallbacks = [rule.fallback and rule.fallback.format(i=i) for i in range(len(names))]
    if rule.optional and not any(name in tensors for name in names + fallbacks):
      if missing is not None:
        missing.append(rule.flax_path)
      continue
    arrays = []
    for name, fallback in zip(names, fallbacks):
      if name not in tensors and fallback in tensors:
        name = fallback
      if name not in tensors:
        also = f" or {fallback!r}" if fallback else ""
        raise ValueError(f"{where or 'checkpoint'}: missing tensor {name!r}{also} "
                         f"(for {'/'.join(rule.flax_path)})")
      tensor = np.asarray(tensors[name])
      if rule.split is not None:
        tensor = np.split(tensor, rule.split[1], axis=-1)[rule.split[0]]
      array = rule.transform.to_flax(tensor, tuple(per_layer_shape))
      if array.shape != tuple(per_layer_shape):
        raise ValueError(f"{where or 'checkpoint'}: tensor {name!r} has shape "
                         f"{tensors[name].shape}, which does not fit "
                         f"{'/'.join(rule.flax_path)} of shape {tuple(per_layer_shape)}")
      arrays.append(array.astype(target.dtype))
    _set(params, rule.flax_path, np.stack(arrays) if rule.stacked else arrays[0])
  return params


def params_to_tensors(params: Mapping, config: Any, head: Optional[str] = None) -> dict:
  """Flax params -> dict of HF tensor name -> float32 numpy array."""
  family = _family(_model_type_of(config))
  params = nn.meta.unbox(params)
  tensors, parts = {}, {}
  for rule in _rules(family, config, head):
    n = _num_layers(rule, family, config)
    value = np.asarray(_get(params, rule.flax_path), dtype=np.float32)
    per_layer = [value[i] for i in range(n)] if rule.stacked else [value]
    for i, array in enumerate(per_layer):
      name = rule.hf_name.format(i=i)
      array = rule.transform.to_hf(array)
      if rule.split is None:
        tensors[name] = np.ascontiguousarray(array)
      else:
        parts.setdefault(name, [None] * rule.split[1])[rule.split[0]] = array
  for name, pieces in parts.items():
    if any(p is None for p in pieces):
      raise ValueError(f"the rules give only some parts of the fused tensor {name!r}")
    tensors[name] = np.ascontiguousarray(np.concatenate(pieces, axis=-1))
  return tensors


def _rules(family: Family, config: Any, head: Optional[str]) -> Sequence[ParamRule]:
  if head is None:
    return family.rules(config)
  return _head(family, head).rules(config)


def _num_layers(rule: ParamRule, family: Family, config: Any) -> int:
  return rule.num_layers if rule.num_layers is not None else family.num_stacked(config)


def _strip_prefixes(tensors: Mapping[str, np.ndarray], prefixes: Sequence[str]) -> dict:
  out = {}
  for name, value in tensors.items():
    for prefix in prefixes:
      if name.startswith(prefix):
        name = name[len(prefix):]
        break
    out[name] = value
  return out


# --- Directories ---------------------------------------------------------------

def resolve_directory(path_or_hub_id: str) -> str:
  """A local directory for `path_or_hub_id`: the path itself, or a hub snapshot."""
  if os.path.isdir(path_or_hub_id):
    return path_or_hub_id
  if os.path.exists(path_or_hub_id) or path_or_hub_id.startswith((".", "/")):
    raise ValueError(f"{path_or_hub_id!r} is not a directory with config.json and "
                     "model.safetensors")
  try:
    from huggingface_hub import snapshot_download  # pylint: disable=g-import-not-at-top
    return snapshot_download(path_or_hub_id, allow_patterns=[
        "config.json", "*.safetensors", "*.json", "vocab.txt", "spiece.model"])
  except Exception as e:  # offline, unknown repo, no network: say which and why
    raise ValueError(
        f"{path_or_hub_id!r} is neither a local directory nor a reachable Hugging Face "
        f"hub id ({type(e).__name__}: {e}). Offline, pass a local directory holding "
        "config.json and model.safetensors.") from e


def read_safetensors(directory: str) -> dict[str, np.ndarray]:
  """All tensors of model.safetensors (or its shards) in `directory`, as numpy."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
  if not files:
    if os.path.exists(os.path.join(directory, "pytorch_model.bin")):
      raise ValueError(
          f"{directory} holds only pytorch_model.bin, a pickle that etjax does not "
          "unpickle (it can run arbitrary code). Convert it once with transformers: "
          "AutoModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)")
    raise ValueError(f"{directory} has no *.safetensors weights")
  tensors = {}
  for name in files:
    path = os.path.join(directory, name)
    try:
      tensors.update(load_file(path))
    except Exception as e:
      raise ValueError(f"cannot read {path}: {e}") from e
  return tensors


def read_config(directory: str) -> dict:
  path = os.path.join(directory, "config.json")
  if not os.path.exists(path):
    raise ValueError(f"{directory} has no config.json")
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e


def config_from_pretrained(path_or_hub_id: str, **overrides) -> Any:
  """The etjax config of a Hugging Face directory (fields replaced by `overrides`)."""
  directory = resolve_directory(path_or_hub_id)
  hf_config = read_config(directory)
  model_type = hf_config.get("model_type")
  config = _family(model_type).config_from_hf(hf_config)
  return config.replace(**overrides) if overrides else config


def from_pretrained(path_or_hub_id: str, *, head: Optional[str] = None,
                    **overrides) -> tuple[nn.Module, Params]:
  """Loads a Hugging Face model directory (or hub id, where the network allows).

  Args:
    path_or_hub_id: a directory with config.json and *.safetensors, or a hub id.
    head: a task head registered for the family ('mlm' for BERT, RoBERTa, ALBERT):
      the module then carries it. Head weights absent from the checkpoint (a base
      model's directory) start from the module's initialisation, with a warning.
    **overrides: config fields to change (dtype, attention backend, dropout, ...).

  Returns:
    (module, params): `module.apply({'params': params}, input_ids, ...)` runs it;
    params are plain numpy arrays in the config's param dtype.
  """
  from etjax.models.zoo import module_for  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  directory = resolve_directory(path_or_hub_id)
  config = config_from_pretrained(directory, **overrides)
  module = module_for(config)
  if head is not None:
    module = _head(_family(_model_type_of(config)), head).build(module)
  abstract = abstract_params(module)
  missing: list = []
  params = tensors_to_params(read_safetensors(directory), config, abstract,
                             where=directory, head=head, missing=missing)
  if missing:
    params = _initialise_missing(module, params, missing)
    warnings.warn(f"{directory}: no weights for {['/'.join(p) for p in missing]}; "
                  "they start from a fresh initialisation", UserWarning, stacklevel=2)
  return module, jax.tree.map(np.asarray, params)


def _initialise_missing(module: nn.Module, params: Params, missing: Sequence) -> Params:
  """`params` with the leaves at the `missing` paths taken from module.init (seed 0)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  fresh = nn.meta.unbox(module.init(jax.random.PRNGKey(0),
                                    jnp.zeros((1, 8), jnp.int32))["params"])
  for path in missing:
    _set(params, path, np.asarray(_get(fresh, path)))
  return params


def abstract_params(module: nn.Module) -> Params:
  """Shapes and dtypes of `module`'s params (unboxed), without allocating them."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  ids = jnp.zeros((1, 8), jnp.int32)
  variables = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), ids))
  return nn.meta.unbox(variables["params"])


def save_pretrained(module: nn.Module, params: Params, directory: str, *,
                    overwrite: bool = False) -> str:
  """Writes config.json and model.safetensors that transformers can load.

  Refuses to replace an existing model.safetensors unless overwrite=True.
  Returns the directory.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  config = module.config
  os.makedirs(directory, exist_ok=True)
  weights = os.path.join(directory, "model.safetensors")
  if os.path.exists(weights) and not overwrite:
    raise ValueError(f"{weights} exists; pass overwrite=True to replace it")
  family = _family(_model_type_of(config))
  head = getattr(module, "hf_head", None)
  tensors = params_to_tensors(params, config, head)
  hf_config = family.config_to_hf(config)
  if head is not None:
    hf_config["architectures"] = [_head(family, head).architecture(config)]
  tmp = weights + ".tmp"
  save_file(tensors, tmp, metadata={"format": "pt"})
  os.replace(tmp, weights)  # never leave a half-written model.safetensors
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)
  return directory
