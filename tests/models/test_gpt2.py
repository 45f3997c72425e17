"""GPT-2 against transformers, both directions; zoo sizes; classification backbone.

The fixture (tests/models/fixtures/tiny_gpt2) is a tiny random GPT2LMHeadModel saved
by transformers with its outputs (make_gpt2_fixtures.py regenerates it). The live
tests run transformers itself.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import etjax.models as models
from etjax.models import gpt2_hf, hf
from etjax.models.gpt2_configs import GPT2Config

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "tiny_gpt2")
TOL = 1e-4  # float32 max abs error through the stack (DESIGN.md tolerance policy)

# Parameter counts of the public checkpoints (GPT2LMHeadModel(...).num_parameters()).
PUBLIC_SIZES = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168,
                "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}


def _expected():
  return dict(np.load(os.path.join(FIXTURE, "expected.npz")))


def _count(module):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(hf.abstract_params(module)))


def test_load_matches_transformers_outputs():
  module, params = models.from_pretrained(FIXTURE)
  e = _expected()
  out = module.apply({"params": params}, e["input_ids"], e["attention_mask"],
                     output_hidden_states=True, output_attentions=True)
  np.testing.assert_allclose(out.logits, e["logits"], atol=TOL, rtol=0)
  np.testing.assert_allclose(out.hidden_states, e["hidden_states"], atol=TOL, rtol=0)
  np.testing.assert_allclose(out.attentions, e["attentions"], atol=TOL, rtol=0)


def test_save_then_load_round_trips_exactly(tmp_path):
  module, params = models.from_pretrained(FIXTURE)
  models.save_pretrained(module, params, str(tmp_path))
  module2, params2 = models.from_pretrained(str(tmp_path))
  assert module2.config == module.config
  jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_transformers_loads_what_etjax_saves(tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  module, _ = models.from_pretrained(FIXTURE)
  e = _expected()
  # Fresh random etjax weights (not the fixture's), so nothing is copied through.
  variables = module.init(jax.random.PRNGKey(7), e["input_ids"])
  params = jax.tree.map(np.asarray, hf.nn.meta.unbox(variables["params"]))
  models.save_pretrained(module, params, str(tmp_path))
  hf_model = transformers.GPT2LMHeadModel.from_pretrained(
      str(tmp_path), attn_implementation="eager").eval()
  with torch.no_grad():
    ref = hf_model(input_ids=torch.tensor(e["input_ids"]),
                   attention_mask=torch.tensor(e["attention_mask"]))
  out = module.apply({"params": params}, e["input_ids"], e["attention_mask"])
  np.testing.assert_allclose(out.logits, ref.logits.numpy(), atol=TOL, rtol=0)


@pytest.mark.parametrize("name", sorted(PUBLIC_SIZES))
def test_zoo_sizes_have_the_public_parameter_counts(name):
  config = models.get_config(name)
  assert config.num_params() == PUBLIC_SIZES[name]
  assert _count(models.create_model(name)) == PUBLIC_SIZES[name]


def test_zoo_sizes_match_transformers_configs():
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  for name in ("gpt2", "gpt2-medium"):
    config = models.get_config(name)
    hf_config = transformers.GPT2Config(**gpt2_hf.config_to_hf(config))
    with torch.device("meta"):
      hf_model = transformers.GPT2LMHeadModel(hf_config)
    assert hf_model.num_parameters() == config.num_params()


def test_classifier_backbone_matches_gpt2_for_sequence_classification():
  """SequenceClassifier over GPT2 pools the last non-padding token, as transformers'
  GPT2ForSequenceClassification (whose score layer has no bias: ours is zero)."""
  module, params = models.from_pretrained(FIXTURE)
  e = _expected()
  score = np.load(os.path.join(FIXTURE, "score.npy"))  # [classes, embed]
  classifier = models.SequenceClassifier(module, num_labels=score.shape[0])
  full = {"encoder": params, "classifier": {"kernel": score.T,
                                            "bias": np.zeros(score.shape[0], np.float32)}}
  # Zero token types (as every etjax batch has) are ignored by default.
  out = classifier.apply({"params": full}, e["input_ids"], e["attention_mask"],
                         np.zeros_like(e["input_ids"]))
  np.testing.assert_allclose(out.logits, e["class_logits"], atol=TOL, rtol=0)


def test_token_types_add_the_token_embedding_when_enabled():
  module, params = models.from_pretrained(FIXTURE, use_token_types=True)
  e = _expected()
  ids = e["input_ids"][:1]
  types = np.ones_like(ids)
  out = module.apply({"params": params}, ids, None, types, output_hidden_states=True)
  wte = params["wte"]["embedding"]
  np.testing.assert_allclose(out.hidden_states[0],
                             wte[ids] + wte[types] + params["wpe"]["embedding"][:12],
                             atol=1e-6, rtol=0)


def test_bfloat16_compute_stays_close_to_float32():
  # GPT-2's own initialisation (the fixture's is 15x wider, far from trained weights).
  sizes = dict(n_layer=3, n_embd=64, n_head=4, vocab_size=100, n_positions=16,
               bos_token_id=1, eos_token_id=1)
  module = models.create_model("gpt2", **sizes)
  bf16 = models.create_model("gpt2", dtype="bfloat16", **sizes)
  e = _expected()
  params = module.init(jax.random.PRNGKey(0), e["input_ids"])["params"]
  ref = module.apply({"params": params}, e["input_ids"], e["attention_mask"]).logits
  out = bf16.apply({"params": params}, e["input_ids"], e["attention_mask"]).logits
  assert out.dtype == jnp.float32
  rel = np.abs(np.asarray(out) - np.asarray(ref)).max() / np.abs(np.asarray(ref)).max()
  assert rel <= 1e-2, rel


def test_remat_keeps_gradients():
  module, params = models.from_pretrained(FIXTURE)
  other, _ = models.from_pretrained(FIXTURE, remat_policy="full")
  e = _expected()

  def loss(m, p):
    return m.apply({"params": p}, e["input_ids"], e["attention_mask"]).logits.mean()

  g1 = jax.grad(lambda p: loss(module, p))(params)
  g2 = jax.grad(lambda p: loss(other, p))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5),
               g1, g2)


def test_logical_axes_on_parameters():
  module = models.create_model("gpt2", n_layer=2, n_embd=64, n_head=4, vocab_size=100,
                               n_positions=16, bos_token_id=1, eos_token_id=1)
  boxed = jax.eval_shape(module.init, jax.random.PRNGKey(0),
                         jnp.zeros((1, 8), jnp.int32))["params"]
  axes = lambda *path: hf._get(boxed, path).names
  assert axes("wte", "embedding") == ("vocab", "embed")
  assert axes("h", "layers", "attention", "query", "kernel") == ("layers", "embed",
                                                                 "heads", "kv")
  assert axes("h", "layers", "mlp", "wi", "kernel") == ("layers", "embed", "mlp")


def test_unsupported_transformers_options_are_named():
  with pytest.raises(ValueError, match="reorder_and_upcast_attn=True is not supported"):
    gpt2_hf.config_from_hf({"model_type": "gpt2", "reorder_and_upcast_attn": True})
  with pytest.raises(ValueError, match="n_embd"):
    GPT2Config(n_embd=30, n_head=4)


def test_gpt2_fine_tunes_through_the_classifier_path():
  """The zoo name goes through jobs.tasks.build_classifier and finetune unchanged."""
  import optax  # pylint: disable=g-import-not-at-top
  from etjax import algorithms  # pylint: disable=g-import-not-at-top
  from etjax.jobs import tasks  # pylint: disable=g-import-not-at-top
  module, pretrained = tasks.build_classifier(
      3, model="gpt2", overrides=dict(n_layer=1, n_embd=32, n_head=2, vocab_size=64,
                                      n_positions=16, bos_token_id=1, eos_token_id=1))
  assert pretrained is None
  step = algorithms.finetune(module, optax.sgd(0.1))
  ids = np.arange(24, dtype=np.int32).reshape(2, 12) % 64
  batch = {"input_ids": ids, "attention_mask": np.ones_like(ids),
           "token_type_ids": np.zeros_like(ids), "labels": np.array([0, 2], np.int32)}
  state = step.init(jax.random.PRNGKey(0), batch)
  state, metrics = jax.jit(step.update)(state, batch)
  assert np.isfinite(float(metrics["loss"])) and int(state.step) == 1
