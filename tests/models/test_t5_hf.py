"""T5 <-> Hugging Face: loading and saving, against transformers' outputs.

The fixture tests read outputs stored by fixtures/make_t5_fixtures.py (no torch); the
live tests run transformers itself (installed by `make test`).
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from etjax.models import hf
from etjax.models.t5 import T5Encoder, T5Model
from t5_testlib import (FLAVOURS, assert_close, expected, fixture_dir, rng_key,
                       tiny_config)


SEQ2SEQ_KEYS = ("encoder_last_hidden_state", "last_hidden_state", "logits")


def _seq2seq(module, params, e):
  """Our T5Output on the fixture inputs, as numpy."""
  out = jax.jit(module.apply)({"params": params}, e["input_ids"], e["attention_mask"],
                              e["decoder_input_ids"], e["decoder_attention_mask"])
  return {k: np.asarray(getattr(out, k)) for k in SEQ2SEQ_KEYS}


@pytest.fixture(scope="module", params=FLAVOURS)
def loaded(request):
  """(flavour, module, params, our outputs) for one stored flavour."""
  module, params = hf.from_pretrained(fixture_dir(request.param))
  return request.param, module, params, _seq2seq(module, params, expected(request.param))


def test_load_matches_transformers_outputs(loaded):
  name, module, _, ours = loaded
  want = expected(name)
  assert isinstance(module, T5Model)
  for key in SEQ2SEQ_KEYS:
    assert_close(ours[key], want[key], what=f"{name} {key}")


def test_flavours_are_read_from_config_json():
  v1_0 = hf.config_from_pretrained(fixture_dir("t5_v1_0"))
  assert (v1_0.feed_forward_proj, v1_0.tie_word_embeddings, v1_0.decoder_layers) == (
      "relu", True, 2)
  # transformers 5 writes T5 1.1 as tie_word_embeddings=true, scale_decoder_outputs=false.
  v1_1 = hf.config_from_pretrained(fixture_dir("t5_v1_1"))
  assert (v1_1.gated, v1_1.activation, v1_1.tie_word_embeddings, v1_1.decoder_layers) == (
      True, "gelu_new", False, 3)
  assert not hf.config_from_pretrained(fixture_dir("t5_v1_1")).encoder_only
  assert hf.config_from_pretrained(fixture_dir("t5_encoder")).encoder_only


def test_encoder_model_matches_transformers():
  module, params = hf.from_pretrained(fixture_dir("t5_encoder"))
  assert isinstance(module, T5Encoder)
  want = expected("t5_encoder")
  out = jax.jit(module.apply, static_argnames=("output_hidden_states",
                                               "output_attentions"))(
      {"params": params}, want["input_ids"], want["attention_mask"],
      output_hidden_states=True, output_attentions=True)
  for key in ("last_hidden_state", "hidden_states", "attentions"):
    assert_close(getattr(out, key), want[key], what=key)
  # The encoder of the full checkpoint it was cut from, loaded as encoder-only.
  _, enc_params = hf.from_pretrained(fixture_dir("t5_v1_1"), encoder_only=True)
  for a, b in zip(jax.tree.leaves(enc_params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_save_then_load_round_trips_exactly(loaded, tmp_path):
  name, module, params, ours = loaded
  hf.save_pretrained(module, params, str(tmp_path))
  saved, original = (load_file(os.path.join(d, "model.safetensors"))
                     for d in (str(tmp_path), fixture_dir(name)))
  assert set(saved) == set(original)
  for key, value in original.items():
    np.testing.assert_array_equal(saved[key], value, err_msg=key)
  module2, params2 = hf.from_pretrained(str(tmp_path))
  assert module2.config == module.config
  for a, b in zip(jax.tree.leaves(params2), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_tied_head_saved_once_loads_from_shared(tmp_path):
  # transformers 5 keeps a "tie_word_embeddings=False" T5 tied when it builds one from
  # scratch and then saves shared.weight only, with scale_decoder_outputs false.
  tensors = load_file(os.path.join(fixture_dir("t5_v1_1"), "model.safetensors"))
  del tensors["lm_head.weight"]
  save_file(tensors, str(tmp_path / "model.safetensors"))
  shutil.copy(os.path.join(fixture_dir("t5_v1_1"), "config.json"), tmp_path)
  module, params = hf.from_pretrained(str(tmp_path))
  assert not module.config.tie_word_embeddings
  np.testing.assert_array_equal(params["lm_head"]["kernel"],
                                params["shared"]["embedding"].T)


def test_missing_tensor_is_named(tmp_path):
  tensors = load_file(os.path.join(fixture_dir("t5_v1_0"), "model.safetensors"))
  del tensors["decoder.block.1.layer.1.EncDecAttention.k.weight"]
  save_file(tensors, str(tmp_path / "model.safetensors"))
  shutil.copy(os.path.join(fixture_dir("t5_v1_0"), "config.json"), tmp_path)
  with pytest.raises(ValueError, match=r"missing tensor 'decoder\.block\.1\.layer\.1\."
                                       r"EncDecAttention\.k\.weight'"):
    hf.from_pretrained(str(tmp_path))


def test_config_json_errors_name_the_problem(tmp_path):
  config = json.load(open(os.path.join(fixture_dir("t5_v1_0"), "config.json")))
  config["feed_forward_proj"] = "gated-swish"
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="T5Config.feed_forward_proj = 'gated-swish'"):
    hf.config_from_pretrained(str(tmp_path))


# --- Live: transformers itself ------------------------------------------------------

def _torch_outputs(model, e):
  import torch  # pylint: disable=g-import-not-at-top
  t = {k: torch.tensor(e[k]) for k in ("input_ids", "attention_mask", "decoder_input_ids",
                                       "decoder_attention_mask")}
  with torch.no_grad():
    out = model(**t, output_hidden_states=True)
  return {"encoder_last_hidden_state": out.encoder_last_hidden_state.numpy(),
          "last_hidden_state": out.decoder_hidden_states[-1].numpy(),
          "logits": out.logits.numpy()}


@pytest.mark.parametrize("tied", [True, False])
def test_transformers_loads_what_etjax_saves(tied, tmp_path):
  import transformers  # pylint: disable=g-import-not-at-top
  # A model etjax initialised itself (not one converted from transformers).
  cfg = tiny_config(tie_word_embeddings=tied,
                    feed_forward_proj="relu" if tied else "gated-gelu",
                    num_decoder_layers=3)
  module = T5Model(cfg)
  e = expected("t5_v1_0")
  params = jax.jit(module.init)(rng_key(1), e["input_ids"])["params"]
  hf.save_pretrained(module, params, str(tmp_path))
  model = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
  assert (model.lm_head.weight is model.shared.weight) == tied
  theirs = _torch_outputs(model, e)
  ours = _seq2seq(module, params, e)
  for key in SEQ2SEQ_KEYS:
    assert_close(ours[key], theirs[key], what=key)


def test_transformers_encoder_model_loads_encoder_only_save(tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  module, params = hf.from_pretrained(fixture_dir("t5_v1_1"), encoder_only=True)
  hf.save_pretrained(module, params, str(tmp_path))
  model = transformers.T5EncoderModel.from_pretrained(str(tmp_path)).eval()
  e = expected("t5_encoder")
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(e["input_ids"]),
                   attention_mask=torch.tensor(e["attention_mask"])).last_hidden_state
  assert_close(theirs.numpy(), e["last_hidden_state"], what="encoder")


def test_headless_t5model_checkpoint_loads(tmp_path):
  import transformers  # pylint: disable=g-import-not-at-top
  transformers.T5Model.from_pretrained(fixture_dir("t5_v1_0")).save_pretrained(
      str(tmp_path))
  module, params = hf.from_pretrained(str(tmp_path))
  want = expected("t5_v1_0")
  ours = _seq2seq(module, params, want)
  for key in SEQ2SEQ_KEYS:
    assert_close(ours[key], want[key], what=key)
