"""T5 modules and configs: named sizes, parameter counts, buckets, init, smoke step."""

from __future__ import annotations

import dataclasses
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from etjax.models import config as config_lib
from etjax.models import zoo
from etjax.models.t5 import T5Encoder, T5Model, relative_position_bucket, shift_right
from etjax.models.t5_configs import NAMED_SIZES, T5Config
from t5_testlib import FIXTURES, assert_close, rng_key, tiny_config

IDS = np.array([[5, 9, 3, 17, 2, 1], [4, 4, 8, 1, 0, 0]], np.int32)
MASK = (np.arange(6)[None] < np.array([[6], [4]])).astype(np.int32)
DEC = np.array([[0, 7, 7, 2], [0, 3, 9, 11]], np.int32)


def _count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def closed_form_count(cfg: T5Config) -> int:
  """T5's parameter count from its sizes (Raffel et al.; no biases, RMS scales only)."""
  d, inner, ff = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff
  attention = 4 * d * inner
  feed_forward = (3 if cfg.gated else 2) * d * ff
  relpos = cfg.relative_attention_num_buckets * cfg.num_heads
  encoder = cfg.num_layers * (attention + feed_forward + 2 * d) + d + relpos
  decoder = cfg.decoder_layers * (2 * attention + feed_forward + 3 * d) + d + relpos
  head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * d
  return cfg.vocab_size * d + encoder + decoder + head


def test_named_configs():
  names = set(zoo.list_models())
  assert set(NAMED_SIZES) <= names
  big = zoo.get_config("t5-11b")
  assert (big.num_layers, big.decoder_layers, big.d_model, big.d_ff, big.num_heads,
          big.d_kv) == (24, 24, 1024, 65536, 128, 128)
  assert big.feed_forward_proj == "relu" and big.tie_word_embeddings
  xxl = zoo.get_config("t5.1.1-xxl")
  assert xxl.gated and xxl.activation == "gelu_new" and not xxl.tie_word_embeddings
  assert isinstance(zoo.create_model("t5-small"), T5Model)
  assert isinstance(zoo.create_model("t5-small", encoder_only=True), T5Encoder)


@pytest.mark.parametrize("name", sorted(NAMED_SIZES))
def test_parameter_counts(name):
  cfg = zoo.get_config(name)
  abstract = jax.eval_shape(zoo.module_for(cfg).init, rng_key(0),
                            jnp.zeros((1, 4), jnp.int32))
  assert _count(abstract["params"]) == closed_form_count(cfg)


def test_published_parameter_counts():
  # transformers' num_parameters() of google-t5/t5-small and t5-base, and of t5-11b.
  for name, count in (("t5-small", 60_506_624), ("t5-base", 222_903_552),
                      ("t5-11b", 11_307_321_344)):
    assert closed_form_count(zoo.get_config(name)) == count


def test_relative_position_buckets_match_transformers():
  with np.load(os.path.join(FIXTURES, "t5_buckets.npz")) as tables:
    relative = tables["relative_position"]
    for num_buckets, max_distance in ((8, 16), (32, 128)):
      for bidirectional in (True, False):
        want = tables[f"b{num_buckets}_d{max_distance}_bi{int(bidirectional)}"]
        got = relative_position_bucket(relative, bidirectional=bidirectional,
                                       num_buckets=num_buckets, max_distance=max_distance)
        np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("changes,message", [
    (dict(feed_forward_proj="gated-swish"), "T5Config.feed_forward_proj"),
    (dict(feed_forward_proj="gelu-gated"), "T5Config.feed_forward_proj"),
    (dict(attention="flash"), "T5Config.attention"),
    (dict(num_decoder_layers=3, pipeline_stages=2), "T5Config.pipeline_stages"),
    (dict(eos_token_id=1000), "special token ids"),
    (dict(relative_attention_max_distance=2), "relative_attention_max_distance"),
    (dict(d_kv=0), "T5Config.sizes"),
])
def test_config_validation(changes, message):
  with pytest.raises(ValueError, match=message):
    tiny_config(**changes)


def test_config_from_dict_names_unknown_field():
  with pytest.raises(ValueError, match=r"unknown T5Config field\(s\) \['d_modle'\] in x.gin"):
    config_lib.config_from_dict(T5Config, {"d_modle": 8}, where="x.gin")
  cfg = config_lib.config_from_dict(T5Config, dataclasses.asdict(tiny_config()))
  assert cfg == tiny_config()


@pytest.fixture(scope="module")
def tiny():
  """(module, params) of a tiny T5 1.1-style model, initialised once."""
  module = T5Model(tiny_config())
  return module, jax.jit(module.init)(rng_key(0), IDS)["params"]


def test_initialisation_scales(tiny):
  # transformers' T5 init: fan-in scaled projections, unit-variance embeddings.
  module, params = tiny
  cfg = module.config
  params = nn.meta.unbox(params)
  layer = params["decoder"]["stack"]["layers"]
  d, inner = cfg.d_model, cfg.num_heads * cfg.d_kv
  want = {
      "query": (layer["self_attention"]["query"]["kernel"], (d * cfg.d_kv) ** -0.5),
      "key": (layer["cross_attention"]["key"]["kernel"], d ** -0.5),
      "out": (layer["self_attention"]["out"]["kernel"], inner ** -0.5),
      "wi_0": (layer["mlp"]["wi_0"]["kernel"], d ** -0.5),
      "wo": (layer["mlp"]["wo"]["kernel"], cfg.d_ff ** -0.5),
      "shared": (params["shared"]["embedding"], 1.0),
      "lm_head": (params["lm_head"]["kernel"], 1.0),
  }
  for name, (value, stddev) in want.items():
    # At least 2048 samples each: the estimate's own error is under 2%.
    assert value.size >= 2048 and abs(float(np.std(value)) / stddev - 1.0) < 0.1, name


def test_encoder_only_shares_the_encoder_params(tiny):
  module, params = tiny
  enc_params = {"shared": params["shared"], "encoder": params["encoder"]}
  encoder = T5Encoder(module.config.replace(encoder_only=True))
  assert (jax.tree.map(jnp.shape, nn.meta.unbox(enc_params)) == jax.tree.map(
      jnp.shape, nn.meta.unbox(jax.eval_shape(encoder.init, rng_key(1),
                                              IDS)["params"])))

  @jax.jit
  def both(params, enc_params):
    return (encoder.apply({"params": enc_params}, IDS, MASK),
            module.apply({"params": params}, IDS, MASK, method=T5Model.encode))

  out, want = both(params, enc_params)
  assert_close(out.last_hidden_state, want, what="encoder")
  hidden = np.asarray(out.last_hidden_state)
  mask = MASK[:, :, None].astype(np.float32)
  assert_close(out.pooled_output, (hidden * mask).sum(1) / mask.sum(1), what="pooled")
  with pytest.raises(ValueError, match="T5 has no token types"):
    jax.eval_shape(lambda p: encoder.apply({"params": p}, IDS, MASK, np.zeros_like(IDS)),
                   enc_params)


def test_decoder_is_causal(tiny):
  module, params = tiny
  changed = DEC.copy()
  changed[:, 2:] = 13
  # Both decoder inputs in one batch (one compilation).
  logits = jax.jit(module.apply)({"params": params}, np.concatenate([IDS, IDS]),
                                 np.concatenate([MASK, MASK]),
                                 np.concatenate([DEC, changed])).logits
  assert_close(logits[2:, :2], logits[:2, :2], what="prefix logits")
  assert float(jnp.abs(logits[2:, 2:] - logits[:2, 2:]).max()) > 1e-3


def _loss_fn(module):
  def loss(params, rng):
    out = module.apply({"params": params}, IDS, MASK, DEC, deterministic=False,
                       rngs={"dropout": rng})
    targets = jnp.concatenate([DEC[:, 1:], jnp.ones((2, 1), jnp.int32)], axis=1)
    return optax.softmax_cross_entropy_with_integer_labels(out.logits, targets).mean()
  return loss


def test_one_training_step_with_dropout_lowers_the_loss():
  module = T5Model(tiny_config(dropout_rate=0.1, feed_forward_proj="relu",
                               tie_word_embeddings=True, num_layers=1,
                               num_decoder_layers=1))
  params = jax.jit(module.init)(rng_key(0), IDS)["params"]
  value_and_grad = jax.jit(jax.value_and_grad(_loss_fn(module)))
  rng = rng_key(3)  # the same dropout masks before and after the step
  before, grads = value_and_grad(params, rng)
  after, _ = value_and_grad(jax.tree.map(lambda p, g: p - 0.5 * g, params, grads), rng)
  assert np.isfinite(float(before)) and float(after) < float(before)


def test_every_parameter_has_logical_axes():
  variables = jax.eval_shape(T5Model(tiny_config()).init, rng_key(0), IDS)
  boxes = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert len(boxes) == len(jax.tree.leaves(variables))
  for box in boxes:
    assert isinstance(box, nn.LogicallyPartitioned) and len(box.names) == box.value.ndim
  params = variables["params"]
  assert params["decoder"]["stack"]["layers"]["cross_attention"]["query"][
      "kernel"].names == ("layers", "embed", "heads", "kv")
  assert params["encoder"]["relpos_bias"]["embedding"].names == ("relpos_buckets", "heads")
  assert params["lm_head"]["kernel"].names == ("embed", "vocab")


def test_shift_right_builds_teacher_forcing_inputs():
  labels = np.array([[5, 6, 1, -100], [7, -100, -100, -100]])
  np.testing.assert_array_equal(np.asarray(shift_right(labels, 0, 0)),
                                [[0, 5, 6, 1], [0, 7, 0, 0]])
  np.testing.assert_array_equal(np.asarray(shift_right(labels, 3, 2)),
                                [[3, 5, 6, 1], [3, 7, 2, 2]])


def test_bfloat16_compute_runs_with_float32_params(tiny):
  module, params = tiny
  out = jax.jit(T5Model(module.config.replace(dtype="bfloat16")).apply)(
      {"params": params}, IDS, MASK, DEC)
  assert out.logits.dtype == jnp.bfloat16 and out.last_hidden_state.dtype == jnp.bfloat16
  assert jax.tree.leaves(params)[0].dtype == jnp.float32
  assert np.isfinite(np.asarray(out.logits, np.float32)).all()
