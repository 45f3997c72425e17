"""What a trained workdir holds besides checkpoints: tokenizer, label names, input schema.

Written once, by the run that creates the workdir, and read by every later command
(a resumed `train`, `eval`, `predict`, `export`), so all of them encode text exactly as
the checkpoints were trained. The rules that keep a user's model safe:

  * `check` compares what a run would write with what the workdir holds and fails,
    naming the file and the difference, before anything is written;
  * `save` writes only files that are missing, each atomically (temporary file, then
    rename), and never replaces an existing one.

Layout: tokenizer/tokenizer.json, tokenizer/special_tokens_map.json, labels.json,
schema.json (how `predict` reads its input: text columns, header, pairs or not),
roles.json (a transfer job's method, the training file's domains, the target ones).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional, Sequence

from etjax.data import tokenizers
from etjax.train import workdir as workdir_lib

TOKENIZER_JSON = os.path.join("tokenizer", "tokenizer.json")
SPECIAL_TOKENS = os.path.join("tokenizer", "special_tokens_map.json")
LABELS = "labels.json"
SCHEMA = "schema.json"
ROLES = "roles.json"  # a transfer job's method, domains and target domains


class AssetMismatchError(ValueError):
  """A workdir's saved asset differs from what this run would use."""


def _tokenizer_json(tokenizer: tokenizers.Tokenizer) -> dict:
  # Padding and truncation are per-call settings (Tokenizer._configure), not the model.
  spec = json.loads(tokenizer.backend.to_str())
  spec["padding"] = spec["truncation"] = None
  return spec


def job_files(tokenizer: tokenizers.Tokenizer, label_names: Sequence[str],
              schema: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
  """{relative path: JSON value} of a job's assets."""
  files = {TOKENIZER_JSON: _tokenizer_json(tokenizer),
           SPECIAL_TOKENS: dict(tokenizer.special_tokens), LABELS: list(label_names)}
  if schema is not None:
    files[SCHEMA] = dict(schema)
  return files


def _read(path: str) -> Any:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not readable JSON ({e}); the workdir's assets are "
                     "damaged") from None


def _difference(rel: str, old: Any, new: Any) -> str:
  """A short description of how `new` differs from `old` (JSON values)."""
  if rel == TOKENIZER_JSON:
    old_vocab = (old.get("model") or {}).get("vocab") or {}
    new_vocab = (new.get("model") or {}).get("vocab") or {}
    if old_vocab != new_vocab:
      by_id = lambda v: {i: t for t, i in v.items()}  # pylint: disable=unnecessary-lambda-assignment
      old_ids, new_ids = by_id(old_vocab), by_id(new_vocab)
      first = next((i for i in sorted(set(old_ids) | set(new_ids))
                    if old_ids.get(i) != new_ids.get(i)), None)
      return (f"vocabulary of {len(old_vocab)} tokens saved, {len(new_vocab)} now; id "
              f"{first} is {old_ids.get(first)!r} saved, {new_ids.get(first)!r} now")
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return f"tokenizer settings differ in {keys}"
  if isinstance(old, dict) and isinstance(new, dict):
    changed = _changed_fields(old, new)
    shown = "; ".join(f"{k}: {json.dumps(a)} saved, {json.dumps(b)} now"
                      for k, a, b in changed[:3])
    return shown + (f" (and {len(changed) - 3} more)" if len(changed) > 3 else "")
  return f"saved {json.dumps(old)[:200]}, now {json.dumps(new)[:200]}"


def _changed_fields(old: dict, new: dict, prefix: str = "") -> list[tuple]:
  """(dotted key, old value, new value) of every differing leaf of two JSON objects."""
  out = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key), new.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      out += _changed_fields(a, b, f"{prefix}{key}.")
    elif a != b:
      out.append((f"{prefix}{key}", a, b))
  return out


def check(workdir: str, files: Mapping[str, Any]) -> None:
  """Raises AssetMismatchError naming the first file of `files` that `workdir` holds
  with other content (missing files are fine: `save` adds them)."""
  for rel, value in files.items():
    path = os.path.join(workdir, rel)
    if not os.path.exists(path):
      continue
    saved = _read(path)
    if rel == TOKENIZER_JSON:
      saved = dict(saved, padding=None, truncation=None)
    if saved != value:
      raise AssetMismatchError(
          f"{path} differs from this run's: {_difference(rel, saved, value)}. The "
          "workdir belongs to another job; use a new workdir (its files are left "
          "as they are)")


def save(workdir: str, files: Mapping[str, Any]) -> list[str]:
  """Checks `files` against `workdir`, then writes the missing ones atomically.
  Returns the paths written."""
  check(workdir, files)
  written = []
  for rel, value in files.items():
    path = os.path.join(workdir, rel)
    if os.path.exists(path):
      continue
    os.makedirs(os.path.dirname(path), exist_ok=True)
    written.append(workdir_lib.write_atomic(
        path, json.dumps(value, indent=1, sort_keys=True, ensure_ascii=False)))
  return written


def has_tokenizer(workdir: str) -> bool:
  return os.path.exists(os.path.join(workdir, TOKENIZER_JSON))


def load_tokenizer(workdir: str) -> tokenizers.Tokenizer:
  """The tokenizer a run saved in `workdir`."""
  if not has_tokenizer(workdir):
    raise FileNotFoundError(f"{workdir} has no saved tokenizer ({TOKENIZER_JSON}): was "
                            "a model trained there?")
  return tokenizers.load_tokenizer(os.path.join(workdir, "tokenizer"))


def load_labels(workdir: str) -> list[str]:
  path = os.path.join(workdir, LABELS)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{workdir} has no {LABELS}: was a model trained there?")
  labels = _read(path)
  if not isinstance(labels, list) or not all(isinstance(l, str) for l in labels):
    raise ValueError(f"{path}: expected a JSON list of label names")
  return labels


def load_schema(workdir: str) -> Optional[dict]:
  """The saved input schema, or None (a workdir from before schemas were saved)."""
  path = os.path.join(workdir, SCHEMA)
  return _read(path) if os.path.exists(path) else None


def load_roles(workdir: str) -> dict:
  """roles.json of a transfer job: {'method', 'domains', 'target_domains',
  'domain_column'}.

  Raises:
    ValueError: the workdir has none (it was not trained with transfer.method).
  """
  path = os.path.join(workdir, ROLES)
  if not os.path.exists(path):
    raise ValueError(f"{workdir} has no {ROLES}: it was not trained with "
                     "transfer.method (drop the transfer.method binding to use it)")
  return _read(path)
