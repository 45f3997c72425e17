"""`etjax app --mode=export`: the trained app as a versioned directory.

Classifiers whose model is a SequenceClassifier over (input_ids, attention_mask,
token_type_ids) go through etjax.serving's exporter (jax.export functions, weights,
tokenizer, labels, manifest) when that package is present. Every other app (and
classifiers without etjax.serving) is written as <exportDirBase>/<n>/ holding
weights.npz (flat 'a/b/c' keys), tokenizer/, label_mapping.json, train_config.json
and manifest.json (written last; a version without it is incomplete). Versions are
built in a hidden temporary directory and renamed into place, never overwritten.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile

import jax
import numpy as np

from etjax import models
from etjax.apps import base

MANIFEST = "manifest.json"


def example_batch(spec: dict) -> dict:
  """A one-row batch of zeros with the saved per-row shapes and dtypes."""
  return {k: np.zeros([1] + list(shape), dtype) for k, (shape, dtype) in spec.items()}


def batch_spec(data: dict) -> dict:
  """{key: (per-row shape, dtype name)} of encoded data (what example_batch needs)."""
  return {k: (list(np.shape(v)[1:]), np.asarray(v).dtype.name) for k, v in data.items()
          if np.asarray(v).dtype.kind not in "OUSV"}


def flatten(params, prefix: str = "") -> dict:
  out = {}
  for key, value in params.items():
    name = f"{prefix}/{key}" if prefix else str(key)
    if isinstance(value, dict):
      out.update(flatten(value, name))
    else:
      out[name] = np.asarray(value)
  return out


def _next_version(root: str) -> int:
  versions = [int(d) for d in os.listdir(root) if d.isdigit()]
  return max(versions, default=0) + 1


def export_app(job, ctx: base.Context, module, trainer) -> str:
  """Writes a new export version of the job's latest checkpoint; returns its path."""
  cfg = job.config
  state = trainer.restore(example_batch(job.saved["batch_spec"]))
  params = base.unboxed(state.params)
  step = int(jax.device_get(state.step))
  source = {"workdir": os.path.abspath(cfg.checkpoint_dir), "checkpoint_step": step,
            "app": cfg.model_name}
  try:
    from etjax.serving import export as serving  # pylint: disable=g-import-not-at-top
  except ImportError:
    serving = None
  if (serving is not None and isinstance(module, models.SequenceClassifier)
      and job.app.name == "text_classify_bert"):
    return serving.export_classifier(module, params, ctx.tokenizer, ctx.labels,
                                     cfg.export_dir_base,
                                     max_length=cfg.sequence_length,
                                     model_name=cfg.model_name, source=source)
  root = cfg.export_dir_base
  os.makedirs(root, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-export-", dir=root)
  try:
    np.savez(os.path.join(tmp, "weights.npz"), **flatten(params))
    ctx.tokenizer.save(os.path.join(tmp, "tokenizer"))
    for name in ("label_mapping.json", "train_config.json"):
      shutil.copy(os.path.join(cfg.checkpoint_dir, name), os.path.join(tmp, name))
    manifest = {"format": "etjax-app", "app": cfg.model_name, "source": source,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                "weights": "weights.npz", "tokenizer": "tokenizer",
                "labels": list(ctx.labels), "sequence_length": cfg.sequence_length,
                "num_parameters": int(sum(np.size(x) for x in jax.tree.leaves(params)))}
    with open(os.path.join(tmp, MANIFEST), "w") as f:
      json.dump(manifest, f, indent=1)
    os.chmod(tmp, 0o755)
    while True:
      target = os.path.join(root, str(_next_version(root)))
      try:
        os.rename(tmp, target)
        return target
      except OSError:
        if not os.path.exists(target):
          raise
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)
