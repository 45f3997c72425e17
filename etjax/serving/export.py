"""Export of a trained classifier for serving: `jax.export` StableHLO plus what serves it.

    version_dir = export_workdir('/tmp/run', '/srv/models/sentiment')   # -> .../<n>

A version directory holds:

  predict_L<length>.jaxexport  one serialized `jax.export.Exported` per padded length,
                               batch dimension symbolic ('batch'), lowered for cpu and
                               for cuda / tpu where jax can lower them here
  weights.npz                  the parameters, flat 'a/b/c' keys (passed as arguments so
                               that the several lengths share one copy)
  tokenizer/                   tokenizer.json + special_tokens_map.json
  labels.json                  label names, index = class id
  manifest.json                inputs, outputs, shapes, dtypes, model name, etjax and jax
                               versions, source checkpoint step, and every other file's
                               size and sha256 (written last: its presence marks a
                               complete export)

Versions are written into a hidden temporary directory beside them and renamed to the
next free number, so a reader (etjax.serving.loader) never sees half an export.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
import warnings
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import export as jax_export

import etjax
from etjax import models
from etjax.algorithms import peft
from etjax.jobs.trained import load_classifier
from etjax.serving.loader import FORMAT, FORMAT_VERSION, MANIFEST, sha256_of

WEIGHTS = "weights.npz"
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


def length_buckets(max_length: int, smallest: int = 16) -> list[int]:
  """Padded lengths to serve at: powers of two from `smallest` below `max_length`, and
  `max_length` itself (the trained length, the longest input)."""
  if max_length < 3:
    raise ValueError(f"max_length must be >= 3, got {max_length}")
  buckets, length = [], smallest
  while length < max_length:
    buckets.append(length)
    length *= 2
  return buckets + [max_length]


def predict_function(module: nn.Module):
  """(params, input_ids, attention_mask, token_type_ids) -> {'logits', 'probabilities'}
  (float32 [batch, classes]): the classifier in inference mode (no dropout)."""
  def predict(params, input_ids, attention_mask, token_type_ids):
    out = module.apply({"params": params}, input_ids, attention_mask, token_type_ids,
                       deterministic=True)
    logits_bc = out.logits.astype(jnp.float32)
    return {"logits": logits_bc, "probabilities": jax.nn.softmax(logits_bc, axis=-1)}
  return predict


def _lower(fn, params_spec, length: int, platforms: Sequence[str]
           ) -> tuple[jax_export.Exported, dict[str, str]]:
  """Exports `fn` at [batch, length] for as many of `platforms` as lower here; returns
  (exported, {platform: why it failed})."""
  batch, = jax_export.symbolic_shape("batch")
  token_spec = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  args = (params_spec, token_spec, token_spec, token_spec)
  try:
    return jax_export.export(jax.jit(fn), platforms=tuple(platforms))(*args), {}
  except Exception:  # pylint: disable=broad-except
    pass
  # One platform failed the joint lowering: find which, keep the others.
  kept, failed = [], {}
  for platform in platforms:
    try:
      jax_export.export(jax.jit(fn), platforms=(platform,))(*args)
      kept.append(platform)
    except Exception as e:  # pylint: disable=broad-except
      failed[platform] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
  if "cpu" not in kept:
    raise ValueError(f"the predict function does not lower for cpu at length {length}: "
                     f"{failed.get('cpu')}")
  return jax_export.export(jax.jit(fn), platforms=tuple(kept))(*args), failed


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
  """{'a/b/c': array} of a nested dict of arrays."""
  flat = {}
  for key, value in params.items():
    if "/" in key:
      raise ValueError(f"parameter name {prefix}{key!r} contains '/'")
    if isinstance(value, Mapping):
      flat.update(flatten_params(value, f"{prefix}{key}/"))
    else:
      flat[f"{prefix}{key}"] = np.asarray(value)
  return flat


def _file_records(directory: str) -> dict[str, dict]:
  records = {}
  for root, _, names in os.walk(directory):
    for name in sorted(names):
      full = os.path.join(root, name)
      rel = os.path.relpath(full, directory).replace(os.sep, "/")
      records[rel] = {"size": os.path.getsize(full), "sha256": sha256_of(full)}
  return records


def _publish(tmp_dir: str, output_dir: str) -> str:
  """Renames the finished `tmp_dir` to output_dir/<next free number>; returns it."""
  while True:
    versions = [int(n) for n in os.listdir(output_dir) if n.isdigit()]
    target = os.path.join(output_dir, str(max(versions, default=0) + 1))
    try:
      os.rename(tmp_dir, target)  # atomic; fails if another writer took the number
      return target
    except OSError:
      if not os.path.exists(target):
        raise


def export_classifier(module: nn.Module, params: Mapping[str, Any], tokenizer: Any,
                      label_names: Sequence[str], output_dir: str, *, max_length: int,
                      model_name: str, lengths: Optional[Sequence[int]] = None,
                      platforms: Sequence[str] = DEFAULT_PLATFORMS,
                      source: Optional[dict] = None) -> str:
  """Writes a new version of `module` with `params` under `output_dir`.

  Args:
    module: the classifier (a SequenceClassifier, or a peft.PeftModel of one: logits
      [batch, classes]).
    params: its plain (unboxed) parameters.
    tokenizer: an etjax.data.Tokenizer (saved beside the functions).
    label_names: one name per class.
    output_dir: the export root; the version goes to output_dir/<n>.
    max_length: the longest input in tokens (longer texts are truncated to it).
    model_name: recorded in the manifest.
    lengths: padded lengths to export (default `length_buckets(max_length)`).
    platforms: platforms to lower for; those jax cannot lower for here are left out
      with a warning and recorded in the manifest.
    source: where the parameters came from (workdir, checkpoint step, ...).

  Returns:
    The new version directory.
  """
  lengths = sorted(set(int(n) for n in (lengths or length_buckets(max_length))))
  if lengths[-1] != max_length or lengths[0] < 3:
    raise ValueError(f"lengths {lengths}: each must be >= 3 and the longest must be "
                     f"max_length={max_length}")
  num_classes = module.num_labels
  if len(label_names) != num_classes:
    raise ValueError(f"{len(label_names)} label names for a {num_classes}-class model")
  params = jax.tree.map(np.asarray, nn.meta.unbox(params))
  params_spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  fn = predict_function(module)
  os.makedirs(output_dir, exist_ok=True)
  tmp_dir = tempfile.mkdtemp(prefix=".tmp-export-", dir=output_dir)
  try:
    functions, failed = {}, {}
    for length in lengths:
      exported, failures = _lower(fn, params_spec, length, platforms)
      failed.update(failures)
      name = f"predict_L{length}.jaxexport"
      with open(os.path.join(tmp_dir, name), "wb") as f:
        f.write(exported.serialize())
      functions[str(length)] = name
    for platform, why in failed.items():
      warnings.warn(f"export: not lowered for {platform}: {why}", RuntimeWarning,
                    stacklevel=2)
    np.savez(os.path.join(tmp_dir, WEIGHTS), **flatten_params(params))
    tokenizer.save(os.path.join(tmp_dir, "tokenizer"))
    with open(os.path.join(tmp_dir, "labels.json"), "w") as f:
      json.dump(list(label_names), f)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "model_name": model_name,
        "etjax_version": etjax.__version__, "jax_version": jax.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "source": dict(source or {}),
        "platforms": list(exported.platforms), "platforms_not_lowered": failed,
        "max_length": max_length, "length_buckets": lengths, "functions": functions,
        "inputs": [{"name": n, "dtype": "int32", "shape": ["batch", "length"]}
                   for n in INPUT_NAMES],
        "outputs": [{"name": n, "dtype": "float32", "shape": ["batch", num_classes]}
                    for n in ("logits", "probabilities")],
        "weights": WEIGHTS,
        "num_parameters": int(sum(np.size(x) for x in jax.tree.leaves(params))),
        "tokenizer": {"directory": "tokenizer", "pad_id": tokenizer.pad_id,
                      "truncation": "longest_first"},
        "labels": "labels.json", "label_names": list(label_names),
        "files": _file_records(tmp_dir),
    }
    with open(os.path.join(tmp_dir, MANIFEST), "w") as f:
      json.dump(manifest, f, indent=1)
    os.chmod(tmp_dir, 0o755)  # mkdtemp makes it owner-only
    return _publish(tmp_dir, output_dir)
  finally:
    if os.path.exists(tmp_dir):
      shutil.rmtree(tmp_dir)


def export_workdir(workdir: str, output_dir: str, *, step: Optional[int] = None,
                   best_metric: Optional[str] = "accuracy",
                   lengths: Optional[Sequence[int]] = None,
                   platforms: Sequence[str] = DEFAULT_PLATFORMS,
                   dtype: Optional[str] = None) -> str:
  """Exports the classifier an `etjax train` run left in `workdir` (its model.json,
  tokenizer, labels.json and checkpoints): the given step, else the best by
  `best_metric`, else the latest. `dtype` ('float32', 'bfloat16') changes the compute
  dtype from the trained one (the parameters keep theirs). A transfer.peft run exports
  the model that trained (jobs.trained.load_classifier: LoRA merged into the kernels,
  adapters and prompts in the function). Returns the new version directory."""
  trained = load_classifier(workdir, step=step, best_metric=best_metric)
  module = trained.module
  if dtype is not None:
    config = module.encoder.config.replace(dtype=dtype)
    if isinstance(module, peft.PeftModel):  # adapters, prompts: re-wrap the classifier
      module = peft.PeftModel(module.module.clone(encoder=models.module_for(config)),
                              module.config)
    else:
      module = module.clone(encoder=models.module_for(config))
  source = {"workdir": os.path.abspath(workdir), "checkpoint_step": trained.step,
            "checkpoint_choice": trained.chosen,
            "compute_dtype": module.encoder.config.dtype,
            "peft": trained.peft.method if trained.peft else None}
  params, tokenizer, label_names, spec = (trained.params, trained.tokenizer,
                                          trained.label_names, trained.spec)
  return export_classifier(module, params, tokenizer, label_names, output_dir,
                           max_length=spec["max_length"], model_name=spec["name"],
                           lengths=lengths, platforms=platforms, source=source)
