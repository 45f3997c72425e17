"""Export (jax.export) and the flax-free loader: the exported function's probabilities
equal the Trainer's predict; partial or corrupted versions are refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from etjax.serving import export, loader
from tests.serving.serving_testlib import MAX_LENGTH, TEXTS

PAIRS = [(TEXTS[0], TEXTS[1]), (TEXTS[3], TEXTS[2]), (TEXTS[2], TEXTS[4])]


def _untruncated_length(trained, text_a, text_b=None):
  encoded = trained.tokenizer.encode(text_a, text_b, max_length=4096, padding="longest")
  return int(encoded["attention_mask"].sum())


def _trainer_probabilities(trained, step, texts_a, texts_b):
  """Probabilities of the Trainer's own predict on the checkpoint `step`."""
  from etjax.data import pipeline, readers
  examples = [readers.Example(a, b, 0, 0, "") for a, b in zip(texts_a, texts_b)]
  data = pipeline.encode_examples(examples, trained.tokenizer, MAX_LENGTH)
  state = trained.trainer.restore(next(iter(pipeline.eval_batches(data, 8))), step=step)
  return trained.trainer.predict(state, pipeline.eval_batches(data, 8))["probabilities"]


def test_exported_probabilities_equal_trainer_predict(trained, tmp_path):
  version_dir = export.export_workdir(trained.workdir, str(tmp_path))
  assert version_dir == str(tmp_path / "1")
  with open(os.path.join(version_dir, "manifest.json")) as f:
    manifest = json.load(f)
  step = manifest["source"]["checkpoint_step"]
  assert manifest["source"]["checkpoint_choice"] == "best accuracy"
  assert step == trained.trainer.checkpointer.best_step()
  # jax lowers the dense model for every platform here, so none may be missing.
  assert manifest["platforms"] == ["cpu", "cuda", "tpu"]
  assert manifest["platforms_not_lowered"] == {}
  assert manifest["length_buckets"] == [16, MAX_LENGTH]
  assert manifest["model_name"] == "bert-tiny"
  assert manifest["label_names"] == list(trained.label_names)
  assert manifest["inputs"][0] == {"name": "input_ids", "dtype": "int32",
                                   "shape": ["batch", "length"]}
  assert manifest["outputs"][1]["shape"] == ["batch", len(trained.label_names)]
  model = loader.load_export(str(tmp_path))
  assert model.version == 1
  singles = model.predict(list(TEXTS))
  want = _trainer_probabilities(trained, step, list(TEXTS), [None] * len(TEXTS))
  np.testing.assert_allclose(singles["probabilities"], want, rtol=1e-5, atol=1e-6)
  too_long = [_untruncated_length(trained, t) > MAX_LENGTH for t in TEXTS]
  assert singles["truncated"].tolist() == too_long
  assert too_long[3] and not too_long[2]
  a, b = zip(*PAIRS)
  pairs = model.predict(list(a), list(b))
  np.testing.assert_allclose(pairs["probabilities"], _trainer_probabilities(
      trained, step, a, b), rtol=1e-5, atol=1e-6)
  # A short batch runs at the 16-token bucket and still agrees with the full length.
  batch, _ = model.encode([TEXTS[2], TEXTS[1]])
  assert batch["input_ids"].shape == (2, 16)
  np.testing.assert_allclose(model.run(batch)["probabilities"], want[[2, 1]],
                             rtol=1e-5, atol=1e-6)


def test_loader_encoding_equals_the_training_tokenizer(trained, exported):
  model = loader.load_export(exported)
  texts_b = [None, TEXTS[0], None, TEXTS[1], TEXTS[3]]
  batch, truncated = model.encode(list(TEXTS), texts_b)
  assert batch["input_ids"].shape == (5, MAX_LENGTH)
  for i, (a, b) in enumerate(zip(TEXTS, texts_b)):
    want = trained.tokenizer.encode(a, b, max_length=MAX_LENGTH)
    for key in ("input_ids", "attention_mask", "token_type_ids"):
      np.testing.assert_array_equal(batch[key][i], want[key], err_msg=f"{key} row {i}")
    assert truncated[i] == (_untruncated_length(trained, a, b) > MAX_LENGTH)


def test_batched_rows_equal_single_rows(exported):
  model = loader.load_export(exported)
  together = model.predict(list(TEXTS))["probabilities"]
  for i, text in enumerate(TEXTS):
    alone = model.predict([text])["probabilities"][0]
    np.testing.assert_allclose(alone, together[i], rtol=1e-5, atol=1e-6)


def _copy_version(exported, tmp_path):
  root = tmp_path / "root"
  shutil.copytree(os.path.join(exported, "1"), root / "1")
  return root, root / "1"


@pytest.mark.parametrize("damage, message", [
    ("no_manifest", "no manifest.json; not a complete export"),
    ("bad_manifest", "manifest.json:1: bad JSON"),
    ("flip_weights", "weights.npz fails its sha256 check"),
    ("truncate_function", "predict_L16.jaxexport has"),
    ("delete_tokenizer", "tokenizer/tokenizer.json is missing"),
])
def test_partial_or_corrupted_version_is_refused(exported, tmp_path, damage, message):
  root, version = _copy_version(exported, tmp_path)
  if damage == "no_manifest":
    os.remove(version / "manifest.json")
  elif damage == "bad_manifest":
    (version / "manifest.json").write_text("{not json")
  elif damage == "flip_weights":
    data = bytearray((version / "weights.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (version / "weights.npz").write_bytes(bytes(data))
  elif damage == "truncate_function":
    path = version / "predict_L16.jaxexport"
    path.write_bytes(path.read_bytes()[:100])
  else:
    os.remove(version / "tokenizer" / "tokenizer.json")
  with pytest.raises(loader.ExportError, match=message.replace(".", r"\.")):
    loader.load_export(str(version))


def test_newest_complete_version_is_chosen_and_half_written_ones_ignored(exported,
                                                                         tmp_path):
  root, _ = _copy_version(exported, tmp_path)
  shutil.copytree(root / "1", root / "2")
  os.remove(root / "2" / "manifest.json")         # a version still being written
  shutil.copytree(root / "1", root / ".tmp-export-x")  # an export's temporary dir
  assert loader.complete_versions(str(root)) == [1]
  assert loader.load_export(str(root)).version == 1
  with pytest.raises(loader.ExportError, match="no complete export version"):
    loader.load_export(str(tmp_path))


def test_versions_count_up_and_a_failed_export_leaves_nothing(trained, tmp_path,
                                                              monkeypatch):
  first = export.export_workdir(trained.workdir, str(tmp_path), platforms=("cpu",),
                                step=2)
  second = export.export_workdir(trained.workdir, str(tmp_path), platforms=("cpu",))
  assert (os.path.basename(first), os.path.basename(second)) == ("1", "2")
  with open(os.path.join(first, "manifest.json")) as f:
    assert json.load(f)["source"]["checkpoint_step"] == 2

  def broken_save(self, directory):
    raise OSError("disk full")
  monkeypatch.setattr(type(trained.tokenizer), "save", broken_save)
  with pytest.raises(OSError, match="disk full"):
    export.export_workdir(trained.workdir, str(tmp_path), platforms=("cpu",))
  assert sorted(os.listdir(tmp_path)) == ["1", "2"]


def test_export_of_a_workdir_without_a_model_says_so(tmp_path):
  (tmp_path / "checkpoints").mkdir()
  with pytest.raises(ValueError, match="has no model.json"):
    export.export_workdir(str(tmp_path), str(tmp_path / "out"))
  with pytest.raises(ValueError, match="has no checkpoints/"):
    export.export_workdir(str(tmp_path / "nothing"), str(tmp_path / "out"))


def test_loader_needs_neither_flax_nor_model_code(exported):
  code = (
      "import sys\n"
      "from etjax.serving import loader\n"
      f"m = loader.load_export({exported!r})\n"
      f"p = m.predict({list(TEXTS[:2])!r})['probabilities']\n"
      "assert p.shape == (2, len(m.label_names)), p.shape\n"
      "heavy = ('flax', 'optax', 'orbax', 'gin', 'grain', 'etjax.models', 'etjax.train',\n"
      "         'etjax.data', 'etjax.algorithms', 'etjax.serving.export')\n"
      "print(sorted(h for h in heavy if h in sys.modules))\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=env, check=False)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "[]", out.stdout


def test_batch_rows_are_padded_to_few_shapes():
  assert [loader.padded_rows(n) for n in (1, 2, 3, 5, 8, 9, 16, 17, 33)] == [
      1, 2, 4, 8, 8, 16, 16, 24, 40]


def test_export_in_bfloat16_compute_stays_within_bf16_tolerance(trained, exported,
                                                                tmp_path):
  version = export.export_workdir(trained.workdir, str(tmp_path), platforms=("cpu",),
                                  dtype="bfloat16")
  model = loader.load_export(version)
  assert model.manifest["source"]["compute_dtype"] == "bfloat16"
  fp32 = loader.load_export(exported).predict(list(TEXTS))["probabilities"]
  bf16 = model.predict(list(TEXTS))["probabilities"]
  np.testing.assert_allclose(bf16, fp32, atol=1e-2)
  assert not np.array_equal(bf16, fp32)  # the compute dtype did change
