"""Masked-LM heads of BERT / RoBERTa / ALBERT against transformers' *ForMaskedLM.

Fixtures (tests/models/fixtures/tiny_*_mlm) are tiny random *ForMaskedLM models saved
by transformers with their logits (make_mlm_fixtures.py regenerates them).
"""

import os

import jax
import numpy as np
import pytest

import etjax.models as models
from etjax.models import hf
from etjax.models.mlm import MaskedLM

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
FAMILIES = ["bert", "roberta", "albert"]
TOL = 1e-4  # float32 max abs error through the stack (DESIGN.md tolerance policy)
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _fixture(name):
  directory = os.path.join(FIXTURES, f"tiny_{name}_mlm")
  return directory, dict(np.load(os.path.join(directory, "expected.npz")))


def _load(directory, **kw):
  # *ForMaskedLM checkpoints have no pooler: loading says it starts fresh.
  with pytest.warns(UserWarning, match="pooler"):
    return models.from_pretrained(directory, head="mlm", **kw)


@pytest.mark.parametrize("name", FAMILIES)
def test_load_matches_transformers_logits(name):
  directory, data = _fixture(name)
  module, params = _load(directory)
  assert isinstance(module, MaskedLM)
  out = module.apply({"params": params}, *(data[k] for k in INPUTS))
  np.testing.assert_allclose(out.logits, data["logits"], atol=TOL, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_transformers_loads_what_etjax_saves(name, tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  directory, data = _fixture(name)
  module, _ = _load(directory)
  # Fresh random weights (not the fixture's), a random head bias and norm.
  variables = module.init(jax.random.PRNGKey(7), data["input_ids"])
  params = jax.tree.map(np.asarray, hf.nn.meta.unbox(variables["params"]))
  rng = np.random.default_rng(0)
  for leaf in ("bias",):
    params["lm_head"][leaf] = rng.normal(size=params["lm_head"][leaf].shape).astype(
        np.float32)
  params["lm_head"]["norm"]["bias"] = rng.normal(size=params["lm_head"]["norm"][
      "bias"].shape).astype(np.float32)
  models.save_pretrained(module, params, str(tmp_path))
  hf_model = transformers.AutoModelForMaskedLM.from_pretrained(str(tmp_path)).eval()
  assert type(hf_model).__name__.endswith("ForMaskedLM")
  with torch.no_grad():
    ref = hf_model(**{k: torch.tensor(data[k]) for k in INPUTS}).logits.numpy()
  out = module.apply({"params": params}, *(data[k] for k in INPUTS))
  np.testing.assert_allclose(out.logits, ref, atol=TOL, rtol=0)
  # And back: etjax reads its own directory (pooler included) exactly.
  module2, params2 = models.from_pretrained(str(tmp_path), head="mlm")
  assert module2.config == module.config
  jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_base_model_directory_gets_a_fresh_head():
  """A BertModel directory (no head) loads as a masked LM: the encoder's weights are
  the checkpoint's, the head starts fresh and the warning names it."""
  directory = os.path.join(FIXTURES, "tiny_bert")
  with pytest.warns(UserWarning, match="lm_head/transform/kernel"):
    module, params = models.from_pretrained(directory, head="mlm")
  encoder, encoder_params = models.from_pretrained(directory)
  jax.tree.map(np.testing.assert_array_equal, params["encoder"], encoder_params)
  assert set(params["lm_head"]) == {"transform", "norm", "bias"}
  data = dict(np.load(os.path.join(directory, "expected.npz")))
  out = module.apply({"params": params}, *(data[k] for k in INPUTS))
  np.testing.assert_allclose(out.encoder.last_hidden_state, data["last_hidden_state"],
                             atol=TOL, rtol=0)
  assert out.logits.shape == data["input_ids"].shape + (encoder.config.vocab_size,)


def test_decoder_is_tied_to_the_word_embeddings():
  directory, data = _fixture("bert")
  module, params = _load(directory)
  ids = data["input_ids"]
  out = module.apply({"params": params}, ids)
  grads = jax.grad(lambda p: module.apply({"params": p}, ids).logits[0, 0, 5])(params)
  # The logit of token 5 reads row 5 of the table as its decoder weight.
  assert np.abs(grads["encoder"]["embeddings"]["word"]["embedding"][5]).sum() > 0
  assert "decoder" not in params["lm_head"]
  assert out.logits.shape[-1] == params["encoder"]["embeddings"]["word"][
      "embedding"].shape[0]


def test_unknown_head_is_named():
  directory, _ = _fixture("bert")
  with pytest.raises(ValueError, match="no head 'qa' for model_type 'bert'; known: "
                                       r"\['mlm'\]"):
    models.from_pretrained(directory, head="qa")
