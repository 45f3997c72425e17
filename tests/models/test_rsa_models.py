"""Models with attention='rsa' (Random Sparse Attention) against dense and the
dense block-masked path, and the 'rsa' branch of models.attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from etjax.models import Encoder, EncoderConfig
from etjax.models.attention import dot_product_attention
from etjax.pallas.rsa import expand_layout, make_layout, reference_rsa


def rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / np.abs(want).max())


def _encoder_inputs(seq, batch=2, vocab=97, seed=0):
  rng = np.random.default_rng(seed)
  ids = jnp.asarray(rng.integers(1, vocab, (batch, seq)), jnp.int32)
  mask = np.ones((batch, seq), np.int32)
  mask[1, seq - seq // 3:] = 0                  # padded tail in one example
  return ids, jnp.asarray(mask)


def _tiny(model_type, **kw):
  extra = dict(embedding_size=16, share_layers=True) if model_type == "albert" else {}
  return EncoderConfig(model_type=model_type, vocab_size=97, hidden_size=32,
                       num_layers=2, num_heads=4, intermediate_size=64,
                       max_position_embeddings=128, rsa_block_size=8, **extra, **kw)


@pytest.mark.parametrize("model_type", ["bert", "roberta", "albert"])
def test_rsa_k1_encoder_equals_dense(model_type):
  ids, mask = _encoder_inputs(32)
  dense = Encoder(_tiny(model_type))
  params = dense.init(jax.random.PRNGKey(0), ids, mask)["params"]
  want = dense.apply({"params": params}, ids, mask).last_hidden_state
  got = Encoder(_tiny(model_type, attention="rsa", rsa_k=1)).apply(
      {"params": params}, ids, mask).last_hidden_state
  assert rel_err(got, want) <= 1e-5


def test_rsa_k4_bert_forward_backward_and_attentions_follow_the_layout():
  ids, mask = _encoder_inputs(64)
  model = Encoder(_tiny("bert", attention="rsa", rsa_k=4))
  params = model.init(jax.random.PRNGKey(1), ids, mask)["params"]
  out = model.apply({"params": params}, ids, mask, output_attentions=True)
  plain = model.apply({"params": params}, ids, mask).last_hidden_state
  # output_attentions runs the dense block-masked path; the default runs the
  # block-sparse one: two independent computations of the same layer stack.
  assert rel_err(plain, out.last_hidden_state) <= 1e-5
  block_mask = np.asarray(expand_layout(make_layout(4, 64, 8, 4, 0), 8, 64))
  probs = np.asarray(out.attentions)                       # [layers, B, H, L, L]
  assert np.all(probs[..., ~block_mask] == 0.0)            # broadcast over layers, B
  assert np.any(probs[..., block_mask] > 0.0)

  def loss(params, rng):
    o = model.apply({"params": params}, ids, mask, deterministic=False,
                    rngs={"dropout": rng})
    return jnp.mean(o.last_hidden_state ** 2)

  grads = jax.grad(loss)(params, jax.random.PRNGKey(2))  # dropout: RSA's XLA path
  leaves = jax.tree.leaves(grads)
  assert all(np.all(np.isfinite(g)) for g in leaves)
  q_kernel = grads["encoder"]["layers"]["attention"]["query"]["kernel"]
  assert np.abs(np.asarray(jax.tree.leaves(q_kernel)[0])).sum() > 0


def _qkv(b, lq, lk, h, d, seed):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.standard_normal((b, lq, h, d)), jnp.float32),
          jnp.asarray(rng.standard_normal((b, lk, h, d)), jnp.float32),
          jnp.asarray(rng.standard_normal((b, lk, h, d)), jnp.float32))


@pytest.mark.parametrize("causal", [False, True])
def test_rsa_branch_matches_reference_with_t5_bias_and_probs(causal):
  b, length, h, d, bs = 2, 32, 2, 8, 8
  q, k, v = _qkv(b, length, length, h, d, 3)
  bias = jnp.asarray(np.random.default_rng(4).standard_normal((1, h, length, length)),
                     jnp.float32)
  mask = jnp.asarray(np.arange(length)[None] < np.array([[length], [20]]))
  kw = dict(key_mask_bl=mask, bias_bhqk=bias, causal=causal, scale=1.0,
            backend="rsa", rsa_k=2, rsa_block_size=bs, rsa_seed=5)
  out, probs = dot_product_attention(q, k, v, **kw)
  assert probs is None
  layout = make_layout(h, length, bs, 2, 5, causal=causal)
  want, want_probs = reference_rsa(q, k, v, layout, block_size=bs, mask=mask,
                                   bias=bias, causal=causal, scale=1.0,
                                   return_probs=True)
  assert rel_err(out, want) <= 1e-5
  out2, probs2 = dot_product_attention(q, k, v, return_probs=True, **kw)
  assert rel_err(out2, want) <= 1e-5 and rel_err(probs2, want_probs) <= 1e-5


def test_rsa_decoding_with_a_cache_matches_the_full_sequence():
  b, length, h, d, bs = 1, 32, 2, 8, 8
  q, k, v = _qkv(b, length, length, h, d, 6)
  kw = dict(causal=True, backend="rsa", rsa_k=2, rsa_block_size=bs)
  full, _ = dot_product_attention(q, k, v, **kw)
  last, _ = dot_product_attention(q[:, -3:], k, v, **kw)   # 3 new queries, full cache
  assert rel_err(last, full[:, -3:]) <= 1e-5


def test_rsa_cross_attention_runs_dense_and_bad_length_is_named():
  q, k, v = _qkv(2, 16, 24, 2, 8, 7)
  got, _ = dot_product_attention(q, k, v, backend="rsa", rsa_block_size=8)
  want, _ = dot_product_attention(q, k, v, backend="dense")
  assert rel_err(got, want) <= 1e-5
  q, k, v = _qkv(2, 20, 20, 2, 8, 7)
  with pytest.raises(ValueError, match="rsa_block_size"):
    dot_product_attention(q, k, v, backend="rsa", rsa_block_size=8)


def test_rsa_branch_runs_kernels_per_device_under_a_mesh(monkeypatch):
  # On GPU/TPU the branch runs the Pallas kernels through shard_map when a mesh is
  # set; here the interpret-mode kernels stand in for the compiled ones.
  from etjax.pallas import rsa
  from etjax.sharding.mesh import make_mesh
  calls = []
  real = rsa.rsa_attention_sharded
  monkeypatch.setattr(rsa, "resolve_backend", lambda backend: "interpret")
  monkeypatch.setattr(rsa, "rsa_attention_sharded",
                      lambda *a, **kw: calls.append(1) or real(*a, **kw))
  b, length, h, d, bs = 4, 32, 2, 8, 8
  q, k, v = _qkv(b, length, length, h, d, 8)
  mask = jnp.asarray(np.arange(length)[None] < np.array([[32], [24], [16], [32]]))
  kw = dict(key_mask_bl=mask, causal=True, backend="rsa", rsa_k=2, rsa_block_size=bs)
  with jax.set_mesh(make_mesh({"data": 2, "fsdp": 2, "model": 2})):
    got, _ = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, **kw))(q, k, v)
  assert calls
  want = reference_rsa(q, k, v, make_layout(h, length, bs, 2, 0, causal=True),
                       block_size=bs, mask=mask, causal=True)
  assert rel_err(got, want) <= 1e-5


def _t5_inputs(src=16, tgt=8, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  ids = jnp.asarray(rng.integers(2, 64, (batch, src)), jnp.int32)
  dec = jnp.asarray(rng.integers(2, 64, (batch, tgt)), jnp.int32)
  mask = np.ones((batch, src), np.int32)
  mask[1, src - 5:] = 0
  return ids, jnp.asarray(mask), dec


def test_t5_rsa_k1_equals_dense():
  from etjax.models.t5 import T5Model
  from t5_testlib import tiny_config
  ids, mask, dec = _t5_inputs()
  dense = T5Model(tiny_config())
  params = dense.init(jax.random.PRNGKey(0), ids, mask, dec)["params"]
  want = dense.apply({"params": params}, ids, mask, dec).logits
  got = T5Model(tiny_config(attention="rsa", rsa_k=1, rsa_block_size=4)).apply(
      {"params": params}, ids, mask, dec).logits
  assert rel_err(got, want) <= 1e-5


def test_t5_rsa_k2_kernels_match_xla_path_with_gradients(monkeypatch):
  # Encoder self-attention (relative position bias) and decoder causal
  # self-attention through RSA, fwd + bwd, on two independent implementations: the
  # XLA gather path and the Pallas kernels (interpret mode).
  from etjax.models.t5 import T5Model
  from etjax.pallas import rsa
  from t5_testlib import tiny_config
  ids, mask, dec = _t5_inputs()
  model = T5Model(tiny_config(attention="rsa", rsa_k=2, rsa_block_size=4))
  params = model.init(jax.random.PRNGKey(3), ids, mask, dec)["params"]

  def loss(params):
    out = model.apply({"params": params}, ids, mask, dec)
    return jnp.mean(out.logits ** 2)

  want_loss, want = jax.value_and_grad(loss)(params)
  monkeypatch.setattr(rsa, "resolve_backend", lambda backend: "interpret")
  got_loss, got = jax.value_and_grad(loss)(params)
  assert rel_err(got_loss, want_loss) <= 1e-5
  errs = jax.tree.map(rel_err, got, want)
  for path, err in jax.tree_util.tree_leaves_with_path(errs):
    assert err <= 1e-4, (jax.tree_util.keystr(path), err)   # through the stacks
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(got))
  relpos = [g for p, g in jax.tree_util.tree_leaves_with_path(got)
            if "relpos_bias" in jax.tree_util.keystr(p)]
  assert relpos and all(np.abs(np.asarray(g)).sum() > 0 for g in relpos)


def test_rsa_decoding_step_by_step_with_q_offset_matches_the_full_sequence():
  # As MultiHeadAttention(decode=True) calls it: one query, the whole cache, the
  # written positions as the key mask, causal=False, and the query's position.
  b, length, h, d, bs = 2, 32, 2, 8, 8
  q, k, v = _qkv(b, length, length, h, d, 9)
  common = dict(backend="rsa", rsa_k=2, rsa_block_size=bs, rsa_seed=1)
  full, _ = dot_product_attention(q, k, v, causal=True, **common)

  @jax.jit
  def step(i):
    q_i = jax.lax.dynamic_slice_in_dim(q, i, 1, axis=1)
    written = jnp.broadcast_to(jnp.arange(length) <= i, (b, length))
    out, _ = dot_product_attention(q_i, k, v, key_mask_bl=written, causal=False,
                                   q_offset=i, **common)
    return out[:, 0]

  got = jnp.stack([step(jnp.int32(i)) for i in range(length)], axis=1)
  assert rel_err(got, full) <= 1e-5
