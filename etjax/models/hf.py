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
  """
  hf_name: str
  flax_path: tuple[str, ...]
  transform: Transform = COPY
  stacked: bool = False
  num_layers: Optional[int] = None
  fallback: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Family:
  """What interop needs to know about one model family (keyed by HF model_type)."""
  model_types: tuple[str, ...]
  config_from_hf: Callable[[Mapping[str, Any]], Any]
  config_to_hf: Callable[[Any], dict]
  rules: Callable[[Any], Sequence[ParamRule]]   # config -> rules
  num_stacked: Callable[[Any], int]             # config -> layers stacked in Flax
  hf_prefixes: tuple[str, ...] = ()             # stripped when loading head models


_FAMILIES: dict[str, Family] = {}
_FAMILY_MODULES = ("etjax.models.bert_hf", "etjax.models.t5_hf", "etjax.models.gpt2_hf")


def register_family(family: Family) -> None:
  for model_type in family.model_types:
    _FAMILIES[model_type] = family


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
                      abstract_params: Mapping, where: str = "") -> Params:
  """Builds Flax params (plain numpy) from HF tensors, shaped like `abstract_params`.

  Raises ValueError naming a missing tensor or a shape mismatch.
  """
  family = _family(_model_type_of(config))
  tensors = _strip_prefixes(tensors, family.hf_prefixes)
  params: dict = {}
  for rule in family.rules(config):
    target = _get(abstract_params, rule.flax_path)
    n = _num_layers(rule, family, config)
    names = [rule.hf_name.format(i=i) for i in range(n)] if rule.stacked else [rule.hf_name]
    per_layer_shape = target.shape[1:] if rule.stacked else target.shape
    arrays = []
    for name in names:
      if name not in tensors and rule.fallback in tensors:
        name = rule.fallback
      if name not in tensors:
        also = f" or {rule.fallback!r}" if rule.fallback else ""
        raise ValueError(f"{where or 'checkpoint'}: missing tensor {name!r}{also} "
                         f"(for {'/'.join(rule.flax_path)})")
      array = rule.transform.to_flax(np.asarray(tensors[name]), tuple(per_layer_shape))
      if array.shape != tuple(per_layer_shape):
        raise ValueError(f"{where or 'checkpoint'}: tensor {name!r} has shape "
                         f"{tensors[name].shape}, which does not fit "
                         f"{'/'.join(rule.flax_path)} of shape {tuple(per_layer_shape)}")
      arrays.append(array.astype(target.dtype))
    _set(params, rule.flax_path, np.stack(arrays) if rule.stacked else arrays[0])
  return params


def params_to_tensors(params: Mapping, config: Any) -> dict:
  """Flax params -> dict of HF tensor name -> float32 numpy array."""
  family = _family(_model_type_of(config))
  params = nn.meta.unbox(params)
  tensors = {}
  for rule in family.rules(config):
    n = _num_layers(rule, family, config)
    value = np.asarray(_get(params, rule.flax_path), dtype=np.float32)
    per_layer = [value[i] for i in range(n)] if rule.stacked else [value]
    for i, array in enumerate(per_layer):
      tensors[rule.hf_name.format(i=i)] = np.ascontiguousarray(rule.transform.to_hf(array))
  return tensors


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


def from_pretrained(path_or_hub_id: str, **overrides) -> tuple[nn.Module, Params]:
  """Loads a Hugging Face model directory (or hub id, where the network allows).

  Args:
    path_or_hub_id: a directory with config.json and *.safetensors, or a hub id.
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
  abstract = abstract_params(module)
  params = tensors_to_params(read_safetensors(directory), config, abstract,
                             where=directory)
  return module, jax.tree.map(np.asarray, params)


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
  tensors = params_to_tensors(params, config)
  tmp = weights + ".tmp"
  save_file(tensors, tmp, metadata={"format": "pt"})
  os.replace(tmp, weights)  # never leave a half-written model.safetensors
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(family.config_to_hf(config), f, indent=2, sort_keys=True)
  return directory
