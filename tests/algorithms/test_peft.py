"""LoRA, adapters and prompt tuning: outputs against independent references, what
trains and what does not, parameter counts and optimizer-state bytes in closed form."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import etjax.algorithms as algorithms
import etjax.models as models
from etjax.algorithms import peft, peft_sites
from etjax.algorithms.finetune import model_inputs
from etjax.models import bert

VOCAB, CLASSES, LAYERS, HIDDEN, MLP = 60, 3, 2, 128, 512


def _classifier(hidden_dropout=0.0):
  config = models.get_config("bert-tiny", vocab_size=VOCAB, num_layers=LAYERS,
                             hidden_dropout=hidden_dropout, attention_dropout=0.0)
  return models.SequenceClassifier(models.module_for(config), num_labels=CLASSES,
                                   dropout_rate=0.0)


def _batch(seed=0, batch=4, length=10):
  rng = np.random.default_rng(seed)
  mask = np.ones((batch, length), np.int32)
  mask[1, 7:] = 0
  mask[3, 4:] = 0
  return {"input_ids": rng.integers(1, VOCAB, (batch, length)).astype(np.int32),
          "attention_mask": mask, "token_type_ids": np.zeros((batch, length), np.int32),
          "labels": rng.integers(0, CLASSES, batch).astype(np.int32)}


def _inputs(batch):
  return model_inputs(batch)


def _init(model, batch, seed=0):
  return nn.meta.unbox(jax.jit(lambda: model.init(jax.random.PRNGKey(seed),
                                                  *_inputs(batch))["params"])())


def _shapes(model, batch):
  return nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                                         *_inputs(batch))["params"]))


def _without(params, pattern):
  flat = peft_sites.flatten(params)
  return peft_sites.unflatten({k: v for k, v in flat.items() if pattern not in k})


def _randomize(params, suffix, seed=1, scale=0.3):
  flat = peft_sites.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(flat))
  return peft_sites.unflatten({
      k: (scale * jax.random.normal(key, v.shape) if k.endswith(suffix) else v)
      for key, (k, v) in zip(keys, flat.items())})


def test_lora_dense_matches_numpy():
  """One Dense with LoRA against x W + b + (alpha / r) (x A) B in float64 numpy."""
  dense = models.layers.Dense((3, 4), ("embed",), ("heads", "kv"))
  model = peft.PeftModel(dense, peft.PeftConfig("lora", lora_rank=2, lora_alpha=6.0,
                                                lora_targets=("Dense_0|.*",)))
  x = np.random.default_rng(0).normal(size=(2, 5, 7)).astype(np.float32)
  params = _randomize(_init_plain(model, x), "lora_b")
  got = model.apply({"params": params}, x)
  p = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
  want = (np.einsum("bld,dhk->blhk", x, p["kernel"]) + p["bias"] +
          3.0 * np.einsum("blr,rhk->blhk", x @ p["lora_a"], p["lora_b"]))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert params["lora_a"].shape == (7, 2) and params["lora_b"].shape == (2, 3, 4)


def _init_plain(model, x):
  return nn.meta.unbox(model.init(jax.random.PRNGKey(0), x)["params"])


def test_lora_with_zero_b_is_the_base_model_and_merges_to_1e5():
  model = _classifier()
  lora = peft.PeftModel(model, peft.PeftConfig("lora", lora_rank=4, lora_alpha=8.0))
  batch = _batch()
  params = _init(lora, batch)
  qa = params["encoder"]["encoder"]["layers"]["attention"]["query"]
  assert qa["lora_a"].shape == (LAYERS, HIDDEN, 4)           # inside the scanned stack
  assert qa["lora_b"].shape == (LAYERS, 4, 2, 64)
  boxed = lora.init(jax.random.PRNGKey(0), *_inputs(batch))["params"]
  assert boxed["encoder"]["encoder"]["layers"]["attention"]["value"]["lora_a"].names == (
      "layers", "embed", None)
  base_params = _without(params, "lora_")
  run = lambda m, p: m.apply({"params": p}, *_inputs(batch))
  base = run(model, base_params)
  np.testing.assert_array_equal(run(lora, params).logits, base.logits)
  np.testing.assert_array_equal(run(lora, params).features, base.features)
  # Trained-looking factors: merged weights in the plain model give the same outputs.
  params = _randomize(params, "lora_b")
  unmerged = run(lora, params)
  merged = run(model, peft.merge_lora(params, lora.config))
  assert np.abs(np.asarray(unmerged.features - base.features)).max() > 0.1  # LoRA acts
  np.testing.assert_allclose(merged.features, unmerged.features, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(merged.logits, unmerged.logits, rtol=1e-5, atol=1e-6)
  assert jax.tree.structure(peft.merge_lora(params, lora.config)) == jax.tree.structure(
      base_params)


def test_merge_lora_is_exact_in_float64():
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    kernel, a, b = (rng.normal(size=s) for s in ((2, 5, 3, 4), (2, 5, 2), (2, 2, 3, 4)))
    merged = peft_sites.merge_lora({"q": {"kernel": kernel, "lora_a": a,
                                          "lora_b": b}}, 0.5)
    want = kernel + 0.5 * np.einsum("lir,lrhk->lihk", a, b)
    np.testing.assert_allclose(merged["q"]["kernel"], want, rtol=1e-13)
    assert set(merged["q"]) == {"kernel"}


def test_lora_dropout_acts_on_the_lora_branch_only():
  model = _classifier()
  lora = peft.PeftModel(model, peft.PeftConfig("lora", lora_dropout=0.5))
  batch = _batch()
  params = _init(lora, batch)
  run = lambda p, det: lora.apply({"params": p}, *_inputs(batch), deterministic=det,
                                  rngs={"dropout": jax.random.PRNGKey(3)}).logits
  # B = 0: the branch adds nothing, so dropout inside it changes nothing.
  np.testing.assert_array_equal(run(params, False), run(params, True))
  params = _randomize(params, "lora_b")
  assert np.abs(np.asarray(run(params, False)) - np.asarray(run(params, True))).max() > 1e-3


def test_adapter_with_zero_up_projection_is_the_base_model():
  model = _classifier()
  adapter = peft.PeftModel(model, peft.PeftConfig("adapter", adapter_size=16))
  batch = _batch()
  params = _init(adapter, batch)
  layer = params["encoder"]["encoder"]["layers"]
  assert layer["attention"]["adapter"]["down"]["kernel"].shape == (LAYERS, HIDDEN, 16)
  assert layer["mlp"]["adapter"]["up"]["kernel"].shape == (LAYERS, 16, HIDDEN)
  base = model.apply({"params": _without(params, "adapter")}, *_inputs(batch)).logits
  np.testing.assert_array_equal(adapter.apply({"params": params}, *_inputs(batch)).logits,
                                base)
  params = _randomize(params, "up/kernel")
  assert np.abs(np.asarray(adapter.apply({"params": params}, *_inputs(batch)).logits)
                - np.asarray(base)).max() > 1e-3


def test_adapter_matches_a_numpy_bottleneck():
  adapter = peft_sites.Adapter(size=3, activation="relu")
  h = np.random.default_rng(0).normal(size=(2, 4, 6)).astype(np.float32)
  params = _randomize(nn.meta.unbox(adapter.init(jax.random.PRNGKey(0), h)["params"]),
                      "kernel")
  p = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
  z = np.maximum(h @ p["down"]["kernel"] + p["down"]["bias"], 0)
  np.testing.assert_allclose(adapter.apply({"params": params}, h),
                             h + z @ p["up"]["kernel"] + p["up"]["bias"], rtol=1e-5,
                             atol=1e-6)


def test_prompt_equals_prepending_the_tokens_it_embeds():
  """Prompt vectors set to the embeddings of real tokens (at chosen positions) give the
  outputs the plain encoder gives when those tokens are prepended at those positions."""
  model = _classifier()
  length = 3
  prompt = peft.PeftModel(model, peft.PeftConfig("prompt", prompt_length=length))
  batch = _batch()
  params = _init(prompt, batch)
  assert params["encoder"]["encoder"]["prompt"].shape == (length, HIDDEN)
  config = model.encoder.config
  tokens, positions = np.array([[5, 17, 42]], np.int32), np.array([[0, 9, 3]], np.int32)
  embedded = bert.Embeddings(config).apply(
      {"params": params["encoder"]["embeddings"]}, tokens, np.zeros_like(tokens),
      positions)
  params["encoder"]["encoder"]["prompt"] = embedded[0]
  out = prompt.apply({"params": params}, *_inputs(batch), output_hidden_states=True)
  b, n = batch["input_ids"].shape
  ids = np.concatenate([np.repeat(tokens, b, 0), batch["input_ids"]], 1)
  mask = np.concatenate([np.ones((b, length), np.int32), batch["attention_mask"]], 1)
  pos = np.concatenate([np.repeat(positions, b, 0),
                        np.broadcast_to(np.arange(n, dtype=np.int32), (b, n))], 1)
  ref = model.encoder.apply({"params": _without(params, "prompt")["encoder"]}, ids, mask,
                            np.zeros_like(ids), pos, output_hidden_states=True)
  np.testing.assert_allclose(out.encoder.last_hidden_state,
                             ref.last_hidden_state[:, length:], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.encoder.hidden_states[1:],
                             ref.hidden_states[1:, :, length:], rtol=1e-5, atol=1e-5)
  assert out.encoder.last_hidden_state.shape == (b, n, HIDDEN)


def test_prompt_init_from_tokens_uses_embedded_unmasked_positions():
  model = _classifier()
  prompt = peft.PeftModel(model, peft.PeftConfig("prompt", prompt_length=6))
  batch = _batch()
  params = _init(prompt, batch)
  embedded = bert.Embeddings(model.encoder.config).apply(
      {"params": params["encoder"]["embeddings"]}, batch["input_ids"],
      batch["token_type_ids"], bert.position_ids_for(model.encoder.config,
                                                     batch["input_ids"]))
  real = np.asarray(embedded)[batch["attention_mask"] != 0]
  for row in np.asarray(params["encoder"]["encoder"]["prompt"]):
    assert np.abs(real - row).max(-1).min() < 1e-6


@pytest.mark.parametrize("method", peft.METHODS)
def test_only_trainable_parameters_move_and_carry_optimizer_state(method):
  model = _classifier()
  tx = algorithms.make_optimizer("adamw", learning_rate=1e-2, total_steps=10,
                                 weight_decay=0.1)
  pm, ptx = peft.transform(model, tx, peft.PeftConfig(method, adapter_size=8,
                                                      prompt_length=4))
  step = algorithms.finetune(pm, ptx)
  batch = _batch()
  state = step.init(jax.random.PRNGKey(0), batch)
  before = peft_sites.flatten(nn.meta.unbox(state.params))
  trainable = {k for k in before if pm.is_trainable(k)}
  # The state of Adam's moments covers exactly the trainable leaves.
  mu = optax.tree.get(state.opt_state, "mu")
  assert set(peft_sites.flatten(nn.meta.unbox(mu))) == trainable
  n = peft.count_params(state.params, pm.is_trainable)
  # adamw = clip (no state) + adam (int32 count, mu, nu) + decay (none) + lr schedule
  # (int32 count): 8 bytes per trainable float32 plus two counters.
  assert peft.tree_bytes(state.opt_state) == 8 * n + 8
  update = jax.jit(step.update)
  for _ in range(3):
    state, _ = update(state, batch)
  after = peft_sites.flatten(nn.meta.unbox(state.params))
  for key, value in before.items():
    if key in trainable:
      assert np.abs(np.asarray(after[key]) - np.asarray(value)).max() > 0, key
    else:
      np.testing.assert_array_equal(after[key], value, err_msg=key)
  grads = jax.jit(jax.grad(lambda p: algorithms.classifier_loss(pm)(
      p, batch, jax.random.PRNGKey(0), True)[0]))(state.params)
  for key, g in peft_sites.flatten(nn.meta.unbox(grads)).items():
    if key not in trainable:
      assert not np.any(np.asarray(g)), key


def test_parameter_counts_match_closed_forms():
  model = _classifier()
  batch = _batch()
  base = peft.count_params(_shapes(model, batch))
  head = HIDDEN * CLASSES + CLASSES
  rank, size, length = 4, 16, 5
  # LoRA on query and value: per layer and target r * (in + heads * head_dim).
  cfg = peft.PeftConfig("lora", lora_rank=rank)
  params = _shapes(peft.PeftModel(model, cfg), batch)
  lora = LAYERS * 2 * rank * (HIDDEN + HIDDEN)
  assert peft.trainable_summary(params, cfg) == {
      "total": base + lora, "trainable": lora + head, "fraction": (lora + head) / (
          base + lora)}
  # Adapters after attention and MLP: down E*m + m, up m*E + E; plus the layer norms
  # (two per layer and the embeddings', scale and bias each).
  cfg = peft.PeftConfig("adapter", adapter_size=size)
  params = _shapes(peft.PeftModel(model, cfg), batch)
  adapters = LAYERS * 2 * (2 * HIDDEN * size + size + HIDDEN)
  norms = (2 * LAYERS + 1) * 2 * HIDDEN
  assert peft.count_params(params) == base + adapters
  assert peft.count_params(params, cfg.trainable()) == adapters + norms + head
  cfg = peft.PeftConfig("prompt", prompt_length=length)
  params = _shapes(peft.PeftModel(model, cfg), batch)
  assert peft.count_params(params, cfg.trainable()) == length * HIDDEN + head
  # LoRA on every projection of a layer: q, k, v, out (E -> E) and wi, wo (E <-> MLP).
  cfg = peft.PeftConfig("lora", lora_rank=rank,
                        lora_targets=("query", "key", "value", "out", "wi", "wo"))
  params = _shapes(peft.PeftModel(model, cfg), batch)
  assert peft.count_params(params) - base == LAYERS * rank * (
      4 * 2 * HIDDEN + 2 * (HIDDEN + MLP))


def test_bad_settings_fail_naming_them():
  with pytest.raises(ValueError, match="PeftConfig.method"):
    peft.PeftConfig("bitfit")
  with pytest.raises(ValueError, match="PeftConfig.lora_rank"):
    peft.PeftConfig("lora", lora_rank=0)
  with pytest.raises(ValueError, match="unknown PEFT setting.*lora_rnak"):
    peft.config_from_flags("lora", lora_rnak=4)
  assert peft.config_from_flags("none") is None
  model = peft.PeftModel(_classifier(), peft.PeftConfig("lora", lora_targets=("qkv",)))
  with pytest.raises(ValueError, match=r"targets \['qkv'\] match no module.*query"):
    _init(model, _batch())
  with pytest.raises(ValueError, match="only LoRA merges"):
    peft.merge_lora({}, peft.PeftConfig("adapter"))


def test_prompt_refuses_a_stack_with_a_length_dependent_bias():
  config = models.get_config("t5-small", num_layers=1, num_heads=2, d_model=16, d_kv=8,
                             d_ff=32, vocab_size=50)
  model = peft.PeftModel(models.T5Encoder(config),
                         peft.PeftConfig("prompt", prompt_length=2, prompt_target="stack"))
  with pytest.raises(ValueError, match="position bias"):
    model.init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))
