"""Loads an etjax export with jax, numpy and tokenizers alone (no flax, no model code).

    model = load_export('/srv/models/sentiment')          # the newest complete version
    out = model.predict(['a fine film'], [None])
    out['probabilities']   # float32 [1, classes]; out['truncated'] bool [1]

An export directory holds versions 1, 2, ... (etjax.serving.export); a version counts
once its manifest.json exists, and loading checks every file the manifest lists (size
and sha256), so a partial or corrupted version is refused with an `ExportError` that
names the file. This module must not import flax or etjax model code: a test checks
its imports in a fresh interpreter.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional, Sequence

import jax
import numpy as np
import tokenizers
from jax import export as jax_export

FORMAT = "etjax-classifier-export"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_REQUIRED = ("format", "format_version", "functions", "length_buckets", "max_length",
             "weights", "tokenizer", "label_names", "files")


class ExportError(ValueError):
  """An export directory that is missing, incomplete, corrupted or of another format."""


def sha256_of(path: str) -> str:
  """The hex sha256 of a file's bytes."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      digest.update(chunk)
  return digest.hexdigest()


def complete_versions(export_dir: str) -> list[int]:
  """Version numbers under `export_dir` whose manifest.json exists, ascending (files
  are not verified here; `load_export` does that)."""
  if not os.path.isdir(export_dir):
    raise ExportError(f"{export_dir}: no such export directory")
  return sorted(int(n) for n in os.listdir(export_dir)
                if n.isdigit() and os.path.isfile(os.path.join(export_dir, n, MANIFEST)))


def _read_manifest(directory: str) -> dict:
  path = os.path.join(directory, MANIFEST)
  if not os.path.isfile(path):
    raise ExportError(f"{directory}: no {MANIFEST}; not a complete export (a version "
                      "is published only once its manifest is written)")
  try:
    with open(path, encoding="utf-8") as f:
      manifest = json.load(f)
  except json.JSONDecodeError as e:
    raise ExportError(f"{path}:{e.lineno}: bad JSON: {e.msg}") from e
  missing = [k for k in _REQUIRED if k not in manifest]
  if missing:
    raise ExportError(f"{path}: lacks field(s) {missing}")
  if manifest["format"] != FORMAT or manifest["format_version"] != FORMAT_VERSION:
    raise ExportError(f"{path}: format {manifest['format']!r} version "
                      f"{manifest['format_version']}, expected {FORMAT!r} version "
                      f"{FORMAT_VERSION}")
  return manifest


def verify_files(directory: str, manifest: dict) -> None:
  """Raises ExportError naming the first file that is missing or differs from the
  manifest's record of it."""
  for rel, record in manifest["files"].items():
    full = os.path.join(directory, rel)
    if not os.path.isfile(full):
      raise ExportError(f"{directory}: file {rel} is missing")
    size = os.path.getsize(full)
    if size != record["size"]:
      raise ExportError(f"{directory}: file {rel} has {size} bytes, the manifest says "
                        f"{record['size']}")
    if sha256_of(full) != record["sha256"]:
      raise ExportError(f"{directory}: file {rel} fails its sha256 check (corrupted)")


def unflatten_params(flat: dict[str, np.ndarray]) -> dict:
  """Nested dicts from {'a/b/c': array}."""
  tree: dict = {}
  for key, value in flat.items():
    *parents, leaf = key.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def _platform() -> str:
  platform = jax.devices()[0].platform
  if platform == "gpu":  # jax.export names GPU platforms by vendor
    return "rocm" if "rocm" in jax.devices()[0].client.platform_version.lower() else "cuda"
  return platform


def padded_rows(n: int) -> int:
  """The batch size `n` rows are padded to: a power of two up to 8, then a multiple
  of 8 (few shapes to compile, at most 7 wasted rows past 8)."""
  return 1 << max(0, (n - 1).bit_length()) if n <= 8 else -(-n // 8) * 8


class Export:
  """One loaded export version.

  Attributes:
    directory: the version directory; version: its number (None if not numeric).
    manifest: the parsed manifest.json.
    label_names: class names (index = class id); lengths: the exported padded lengths,
    ascending; max_length: the longest (inputs are truncated to it).
  """

  def __init__(self, directory: str, manifest: dict, functions: dict, params: Any,
               tokenizer: tokenizers.Tokenizer):
    self.directory = directory
    name = os.path.basename(os.path.normpath(directory))
    self.version = int(name) if name.isdigit() else None
    self.manifest = manifest
    self.label_names = list(manifest["label_names"])
    self.lengths = sorted(int(n) for n in functions)
    self.max_length = int(manifest["max_length"])
    self.pad_id = int(manifest["tokenizer"]["pad_id"])
    self._params = jax.device_put(params)
    # One jit per length; XLA compiles each (batch, length) shape once.
    self._functions = {int(n): jax.jit(e.call) for n, e in functions.items()}
    self._tokenizer = tokenizer
    tokenizer.enable_truncation(self.max_length, strategy="longest_first")
    tokenizer.no_padding()

  def encode(self, texts_a: Sequence[str],
             texts_b: Optional[Sequence[Optional[str]]] = None
             ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Tokenizes N texts (or pairs where texts_b[i] is a string), truncated
    'longest_first' to max_length and padded to the smallest exported length L that
    fits the longest.

    Returns:
      ({input_ids, attention_mask, token_type_ids: int32 [N, L]}, truncated bool [N]).
    """
    texts_b = list(texts_b) if texts_b is not None else [None] * len(texts_a)
    if len(texts_b) != len(texts_a):
      raise ValueError(f"{len(texts_a)} texts_a but {len(texts_b)} texts_b")
    inputs = [a if b is None else (a, b) for a, b in zip(texts_a, texts_b)]
    encodings = self._tokenizer.encode_batch(inputs) if inputs else []
    longest = max((len(e.ids) for e in encodings), default=1)
    length = next(n for n in self.lengths if n >= longest)
    batch = {k: np.zeros((len(inputs), length), np.int32)
             for k in ("input_ids", "attention_mask", "token_type_ids")}
    batch["input_ids"][:] = self.pad_id
    for i, e in enumerate(encodings):
      n = len(e.ids)
      batch["input_ids"][i, :n] = e.ids
      batch["attention_mask"][i, :n] = 1
      batch["token_type_ids"][i, :n] = e.type_ids
    truncated = np.asarray([bool(e.overflowing) for e in encodings], bool)
    return batch, truncated

  def run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The exported function on a batch of one of `lengths`: {'logits',
    'probabilities'} float32 [N, classes]. Rows are padded (`padded_rows`) with
    copies of row 0, bounding the shapes XLA compiles for, and dropped again."""
    ids = batch["input_ids"]
    n, length = ids.shape
    if length not in self._functions:
      raise ValueError(f"length {length} is not an exported length {self.lengths}")
    rows = padded_rows(n)
    padded = [np.concatenate([batch[k], np.repeat(batch[k][:1], rows - n, 0)])
              for k in ("input_ids", "attention_mask", "token_type_ids")]
    out = jax.device_get(self._functions[length](self._params, *padded))
    return {k: np.asarray(v)[:n] for k, v in out.items()}

  def predict(self, texts_a: Sequence[str],
              texts_b: Optional[Sequence[Optional[str]]] = None) -> dict[str, np.ndarray]:
    """{'logits', 'probabilities': float32 [N, C]; 'predictions': int [N];
    'truncated': bool [N]} for N texts (pairs where texts_b[i] is not None)."""
    batch, truncated = self.encode(texts_a, texts_b)
    out = self.run(batch)
    out["predictions"] = np.argmax(out["logits"], axis=-1)
    out["truncated"] = truncated
    return out

  def warm_up(self, max_batch_size: int) -> None:
    """Compiles every (padded batch up to max_batch_size, length) shape now, so that
    no request waits for XLA."""
    for rows in sorted({padded_rows(n) for n in range(1, max_batch_size + 1)}):
      for length in self.lengths:
        zeros = np.zeros((rows, length), np.int32)
        self.run({"input_ids": zeros + self.pad_id, "attention_mask": zeros + 1,
                  "token_type_ids": zeros})


def load_export(path: str) -> Export:
  """Loads a version directory, or the newest complete version of an export root.

  Raises:
    ExportError: nothing to load, or a version that is incomplete, corrupted, of
      another format, or not lowered for this platform; the message names the file.
  """
  if not os.path.isdir(path):
    raise ExportError(f"{path}: no such export directory")
  is_version = os.path.basename(os.path.normpath(path)).isdigit()
  if not is_version and not os.path.exists(os.path.join(path, MANIFEST)):
    versions = complete_versions(path)
    if not versions:
      raise ExportError(f"{path}: no complete export version (no <n>/{MANIFEST})")
    path = os.path.join(path, str(versions[-1]))
  manifest = _read_manifest(path)
  verify_files(path, manifest)
  platform = _platform()
  functions = {}
  for length, name in manifest["functions"].items():
    try:
      with open(os.path.join(path, name), "rb") as f:
        exported = jax_export.deserialize(bytearray(f.read()))
    except Exception as e:  # pylint: disable=broad-except
      raise ExportError(f"{path}: {name} is not a serialized jax.export: {e}") from e
    if platform not in exported.platforms:
      raise ExportError(f"{path}: {name} was lowered for {list(exported.platforms)}, "
                        f"not for this {platform}")
    functions[length] = exported
  with np.load(os.path.join(path, manifest["weights"])) as data:
    params = unflatten_params({k: data[k] for k in data.files})
  any_exported = next(iter(functions.values()))
  token = np.zeros((1, 1), np.int32)
  if jax.tree.structure(((params, token, token, token), {})) != any_exported.in_tree:
    raise ExportError(f"{path}: {manifest['weights']} does not hold the parameters the "
                      "exported functions take")
  for (key_path, leaf), aval in zip(jax.tree_util.tree_leaves_with_path(params),
                                    any_exported.in_avals):
    if tuple(leaf.shape) != tuple(aval.shape) or leaf.dtype != aval.dtype:
      raise ExportError(f"{path}: parameter {jax.tree_util.keystr(key_path)} is "
                        f"{leaf.dtype}{list(leaf.shape)}, the functions take "
                        f"{aval.dtype}{list(aval.shape)}")
  tokenizer_path = os.path.join(path, manifest["tokenizer"]["directory"], "tokenizer.json")
  try:
    tokenizer = tokenizers.Tokenizer.from_file(tokenizer_path)
  except Exception as e:  # the Rust side raises a plain Exception
    raise ExportError(f"{tokenizer_path}: not a tokenizers JSON file: {e}") from e
  return Export(path, manifest, functions, params, tokenizer)
