"""The ModelZoo's names, config validation and logical-axis metadata."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import etjax.models as models
from etjax.models.config import EncoderConfig


def _param_count(config):
  module = models.module_for(config)
  variables = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0),
                                                 jnp.zeros((1, 8), jnp.int32)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(variables)))


def test_names_include_the_papers_models():
  names = models.list_models()
  for name in ["bert-tiny", "bert-mini", "bert-small", "bert-base", "bert-large",
               "roberta-base", "roberta-large", "albert-base", "albert-large",
               "albert-xlarge", "albert-xxlarge"]:
    assert name in names


@pytest.mark.parametrize("name,hidden,layers,heads", [
    ("bert-base", 768, 12, 12), ("bert-large", 1024, 24, 16),
    ("albert-xlarge", 2048, 24, 32), ("albert-xxlarge", 4096, 12, 64)])
def test_paper_sizes(name, hidden, layers, heads):
  config = models.get_config(name)
  assert (config.hidden_size, config.num_layers, config.num_heads) == (hidden, layers, heads)


@pytest.mark.parametrize("name,expected_millions", [
    # Public parameter counts of the base models (transformers' BertModel etc.).
    ("bert-base", 109.48), ("roberta-base", 124.65), ("albert-base", 11.68)])
def test_parameter_counts_match_the_public_models(name, expected_millions):
  assert _param_count(models.get_config(name)) / 1e6 == pytest.approx(expected_millions,
                                                                       abs=0.01)


def test_unknown_name_lists_known_models():
  with pytest.raises(ValueError, match="known models: .*bert-base"):
    models.get_config("bert-gigantic")


def test_config_rejects_bad_fields():
  with pytest.raises(ValueError, match="hidden_size"):
    EncoderConfig(hidden_size=30, num_heads=4)
  with pytest.raises(ValueError, match="attention"):
    EncoderConfig(attention="sparse")
  with pytest.raises(ValueError, match=r"unknown EncoderConfig field\(s\) \['hiden_size'\]"
                                       r" in my.gin"):
    models.config_from_dict(EncoderConfig, {"hiden_size": 8}, where="my.gin")


def test_every_parameter_has_logical_axes():
  module = models.create_model("bert-tiny", num_layers=2)
  variables = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
  boxes = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert boxes and all(isinstance(b, nn.LogicallyPartitioned) for b in boxes)
  for box in boxes:
    assert len(box.names) == box.value.ndim
  layer_kernel = variables["params"]["encoder"]["layers"]["attention"]["query"]["kernel"]
  assert layer_kernel.names == ("layers", "embed", "heads", "kv")


def test_bfloat16_compute_with_float32_params_stays_close():
  config = models.get_config("bert-tiny", num_layers=2, vocab_size=50)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 50, (2, 16)), jnp.int32)
  f32 = models.module_for(config)
  params = f32.init(jax.random.PRNGKey(0), ids)["params"]
  bf16 = models.module_for(config.replace(dtype="bfloat16"))
  out32 = f32.apply({"params": params}, ids).last_hidden_state
  out16 = bf16.apply({"params": params}, ids).last_hidden_state
  assert out16.dtype == jnp.bfloat16
  assert jax.tree.leaves(params)[0].dtype == jnp.float32
  rel = jnp.linalg.norm(out16.astype(jnp.float32) - out32) / jnp.linalg.norm(out32)
  assert rel < 1e-2


def test_remat_gives_the_same_gradients():
  config = models.get_config("bert-tiny", num_layers=2, vocab_size=50)
  ids = jnp.asarray(np.random.default_rng(1).integers(0, 50, (2, 8)), jnp.int32)
  plain = models.module_for(config)
  params = plain.init(jax.random.PRNGKey(0), ids)["params"]
  grads = {}
  for policy in ("none", "full", "dots"):
    module = models.module_for(config.replace(remat_policy=policy))
    loss = lambda p, m=module: m.apply({"params": p}, ids).last_hidden_state.sum()
    grads[policy] = jax.grad(loss)(params)
  for policy in ("full", "dots"):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 nn.meta.unbox(grads["none"]), nn.meta.unbox(grads[policy]))
