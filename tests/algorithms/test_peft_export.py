"""PEFT beyond one forward pass: merged LoRA saved for transformers, the trainable part
saved and loaded, the pretrained-prompt init, and training through the Trainer on a
sharded mesh with checkpoints."""

import os

import flax.linen as nn
import jax
import numpy as np
import pytest

import etjax.algorithms as algorithms
import etjax.models as models
from etjax.algorithms import peft, peft_sites
from etjax.algorithms.finetune import model_inputs

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "models", "fixtures", "tiny_bert")


def _data(seed=0, batch=4, length=9, vocab=99):
  rng = np.random.default_rng(seed)
  mask = np.ones((batch, length), np.int32)
  mask[2, 5:] = 0
  return {"input_ids": rng.integers(1, vocab, (batch, length)).astype(np.int32),
          "attention_mask": mask, "token_type_ids": np.zeros((batch, length), np.int32),
          "labels": rng.integers(0, 3, batch).astype(np.int32)}


def _randomize_lora(params, seed=1):
  flat = peft_sites.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(flat))
  return peft_sites.unflatten({
      k: 0.3 * jax.random.normal(key, v.shape) if k.endswith("lora_b") else v
      for key, (k, v) in zip(keys, flat.items())})


def test_merged_lora_saved_for_transformers_gives_the_same_logits(tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  encoder, encoder_params = models.from_pretrained(FIXTURE)
  classifier = models.SequenceClassifier(encoder, num_labels=3)
  config = peft.PeftConfig("lora", lora_rank=4, lora_targets=("query", "value", "wo"))
  model = peft.PeftModel(classifier, config)
  data = _data(vocab=encoder.config.vocab_size)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), *model_inputs(data))["params"])
  params = _randomize_lora(algorithms.with_pretrained(params, {"encoder": encoder_params}))
  logits = np.asarray(model.apply({"params": params}, *model_inputs(data)).logits)
  merged = peft.merge_lora(params, config)
  models.save_pretrained(encoder, merged["encoder"], str(tmp_path))
  hf = transformers.AutoModel.from_pretrained(str(tmp_path),
                                              attn_implementation="eager").eval()
  with torch.no_grad():
    pooled = hf(**{k: torch.tensor(data[k]) for k in
                   ("input_ids", "attention_mask", "token_type_ids")}).pooler_output
  head = merged["classifier"]
  hf_logits = pooled.numpy() @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
  np.testing.assert_allclose(hf_logits, logits, rtol=1e-4, atol=1e-5)
  # Without the LoRA update the saved model would differ: the test can fail.
  plain = classifier.apply({"params": peft_sites.unflatten({
      k: v for k, v in peft_sites.flatten(params).items() if "lora_" not in k})},
                           *model_inputs(data)).logits
  assert np.abs(np.asarray(plain) - logits).max() > 1e-3


def test_trainable_part_saves_loads_and_refuses_to_overwrite(tmp_path):
  model = models.SequenceClassifier(models.module_for(models.get_config(
      "bert-tiny", vocab_size=99, num_layers=2)), num_labels=3)
  config = peft.PeftConfig("adapter", adapter_size=8)
  pm = peft.PeftModel(model, config)
  data = _data()
  trained = pm.init(jax.random.PRNGKey(0), *model_inputs(data))["params"]
  trained = jax.tree.map(lambda v: v + 0.01, trained)     # every leaf "trained"
  fresh = pm.init(jax.random.PRNGKey(1), *model_inputs(data))["params"]
  directory = peft.save_trainable(str(tmp_path / "peft"), trained, config)
  with pytest.raises(ValueError, match="exists"):
    peft.save_trainable(directory, trained, config)
  loaded_config, part = peft.load_trainable(directory)
  assert loaded_config == config
  names = set(peft_sites.flatten(part))
  assert names == {k for k in peft_sites.flatten(nn.meta.unbox(trained))
                   if pm.is_trainable(k)}
  assert any("adapter/down/kernel" in k for k in names)
  assert not any(k.endswith("query/kernel") for k in names)
  restored = peft.merge_trainable(fresh, part)
  flat_r = peft_sites.flatten(nn.meta.unbox(restored))
  flat_t = peft_sites.flatten(nn.meta.unbox(trained))
  flat_f = peft_sites.flatten(nn.meta.unbox(fresh))
  for key in flat_r:
    want = flat_t[key] if key in names else flat_f[key]
    np.testing.assert_array_equal(flat_r[key], want, err_msg=key)
  with pytest.raises(ValueError, match="not found"):
    peft.load_trainable(str(tmp_path / "nothing"))
  bad = dict(part, extra={"kernel": np.zeros(2)})
  with pytest.raises(ValueError, match="params/extra"):
    peft.merge_trainable(fresh, bad)


@pytest.mark.slow
def test_lora_trains_through_the_trainer_on_a_sharded_mesh(tmp_path):
  """The Trainer shards the LoRA state by its logical axes (data=2 x fsdp=4, the fsdp
  rules put 'embed' of the factors and their Adam moments on fsdp), trains, and
  restores the checkpoint; frozen weights end exactly where they started."""
  from etjax.train.trainer import Trainer  # pylint: disable=g-import-not-at-top
  model = models.SequenceClassifier(models.module_for(models.get_config(
      "bert-tiny", vocab_size=99, num_layers=2)), num_labels=3)
  tx = algorithms.make_optimizer("adamw", learning_rate=1e-2, total_steps=4)
  step = peft.finetune(model, tx, peft.PeftConfig("lora", lora_rank=4))
  batches = [_data(seed, batch=8) for seed in range(4)]
  trainer = Trainer(step, workdir=str(tmp_path), num_steps=4, mesh="data=2,fsdp=4",
                    rules="fsdp", progress=False, tensorboard=False, log_every=2)
  start = trainer.init_state(batches[0])
  start_flat = peft_sites.flatten(jax.device_get(nn.meta.unbox(start.params)))
  lora_a = start.params["encoder"]["encoder"]["layers"]["attention"]["query"]["lora_a"]
  assert lora_a.names == ("layers", "embed", None)
  assert "fsdp" in str(lora_a.value.sharding.spec)
  result = trainer.fit(iter(batches), None)
  assert result.step == 4
  end = peft_sites.flatten(jax.device_get(nn.meta.unbox(result.state.params)))
  for key, value in start_flat.items():
    if "lora_" in key or key.startswith("classifier/"):
      assert np.abs(end[key] - value).max() > 0, key
    else:
      np.testing.assert_array_equal(end[key], value, err_msg=key)
  restored = trainer.restore(batches[0])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params),
               jax.device_get(result.state.params))
