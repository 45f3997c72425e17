"""FashionBERT's encoder and heads against independent references.

The joint text-image encoder is held to transformers' BertModel: its text embeddings
come from BertModel's own embedding layer, the patch embeddings from numpy, and the
joint sequence runs through BertModel's encoder and pooler with the same weights. The
heads, the patch cutting and the conv stem are checked against numpy.
"""

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
import transformers
from transformers.masking_utils import create_bidirectional_mask

from etjax.models import fashionbert as fb
from etjax.models import hf, zoo
from etjax.models.bert_hf import config_to_hf

TOL = 1e-5  # float32, two layers


def _config(**kw):
  base = dict(vocab_size=40, hidden_size=32, num_layers=2, num_heads=4,
              intermediate_size=64, max_position_embeddings=16, hidden_dropout=0.0,
              attention_dropout=0.0, image_input="features", num_patches=6,
              patch_feature_size=10)
  base.update(kw)
  return fb.FashionBertConfig.make(**base)


def _inputs(rng, batch=3, length=7, patches=6, features=10):
  ids = rng.integers(5, 40, (batch, length)).astype(np.int32)
  mask = np.ones((batch, length), np.int32)
  mask[0, 5:] = 0  # padded text
  ids[0, 5:] = 0
  types = np.zeros_like(ids)
  types[1, 3:] = 1
  patch_mask = np.ones((batch, patches), np.int32)
  patch_mask[2, 4:] = 0  # an image with fewer patches
  feats = rng.normal(size=(batch, patches, features)).astype(np.float32)
  return ids, mask, types, patch_mask, feats


def _layer_norm(x, scale, bias, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def _gelu(x):
  return 0.5 * x * (1 + torch.erf(torch.tensor(x / np.sqrt(2.0))).numpy())


@pytest.fixture(scope="module")
def model_and_outputs():
  cfg = _config()
  model = fb.FashionBert(cfg)
  ids, mask, types, patch_mask, feats = _inputs(np.random.default_rng(0))
  params = jax.tree.map(np.asarray, jax.device_get(model.init(
      jax.random.key(1), ids, mask, types, patch_features=feats)["params"]))
  params = jax.tree.map(np.asarray, nn.meta.unbox(params))
  # Non-trivial norms and biases, so the reference would notice a missing term.
  rng = np.random.default_rng(2)
  params = jax.tree_util.tree_map_with_path(
      lambda path, v: v + rng.normal(0, 0.1, v.shape).astype(v.dtype)
      if path[-1].key in ("bias", "scale") else v, params)
  out = model.apply({"params": params}, ids, mask, types, patch_features=feats,
                    patch_mask=patch_mask)
  return cfg, model, params, (ids, mask, types, patch_mask, feats), out


def test_encoder_matches_transformers_bert_on_the_joint_sequence(model_and_outputs):
  cfg, _, params, (ids, mask, types, patch_mask, feats), out = model_and_outputs
  enc_cfg = cfg.encoder
  bert = transformers.BertModel(transformers.BertConfig(**config_to_hf(enc_cfg)),
                                add_pooling_layer=True).eval()
  tensors = hf.params_to_tensors({k: params[k] for k in ("embeddings", "encoder",
                                                         "pooler")}, enc_cfg)
  missing, unexpected = bert.load_state_dict(
      {k: torch.tensor(np.asarray(v)) for k, v in tensors.items()}, strict=False)
  assert not unexpected and not [m for m in missing if "position_ids" not in m]
  pe = params["patch_embeddings"]
  image = (feats @ pe["projection"]["kernel"] + pe["projection"]["bias"]
           + pe["position"]["embedding"][None, :feats.shape[1]]
           + pe["segment"]["embedding"][0])
  image = _layer_norm(image, pe["norm"]["scale"], pe["norm"]["bias"], cfg.encoder.layer_norm_eps)
  with torch.no_grad():
    text = bert.embeddings(input_ids=torch.tensor(ids, dtype=torch.long),
                           token_type_ids=torch.tensor(types, dtype=torch.long)).numpy()
    joint = torch.tensor(np.concatenate([text, image], 1), dtype=torch.float32)
    full_mask = torch.tensor(np.concatenate([mask, patch_mask], 1))
    extended = create_bidirectional_mask(config=bert.config, inputs_embeds=joint,
                                         attention_mask=full_mask)
    hidden = bert.encoder(joint, attention_mask=extended).last_hidden_state
    pooled = bert.pooler(hidden).numpy()
  hidden = hidden.numpy()
  real = np.concatenate([mask, patch_mask], 1).astype(bool)
  np.testing.assert_allclose(np.asarray(out.last_hidden_state)[real], hidden[real],
                             atol=TOL, rtol=TOL)
  np.testing.assert_allclose(out.pooled_output, pooled, atol=TOL, rtol=TOL)


def test_heads_match_numpy_with_mlm_tied_to_word_embeddings(model_and_outputs):
  cfg, _, params, (ids, *_), out = model_and_outputs
  h = np.asarray(out.last_hidden_state, np.float64)
  length = ids.shape[1]
  mlm = params["mlm_head"]
  x = _gelu(h[:, :length] @ mlm["transform"]["kernel"] + mlm["transform"]["bias"])
  x = _layer_norm(x, mlm["norm"]["scale"], mlm["norm"]["bias"], cfg.encoder.layer_norm_eps)
  table = params["embeddings"]["word"]["embedding"]
  np.testing.assert_allclose(out.mlm_logits, x @ table.T + mlm["bias"], atol=TOL,
                             rtol=TOL)
  np.testing.assert_allclose(out.mpm_logits, h[:, length:] @ params["mpm_head"]["kernel"],
                             atol=TOL, rtol=TOL)
  itm = params["itm_head"]
  np.testing.assert_allclose(out.itm_logits, np.asarray(out.pooled_output) @
                             itm["kernel"] + itm["bias"], atol=TOL, rtol=TOL)
  # No decoder matrix of its own: the MLM head's only vocab-sized parameter is the bias.
  assert {k: np.shape(v) for k, v in mlm.items() if k != "transform" and k != "norm"} \
      == {"bias": (cfg.encoder.vocab_size,)}


def test_masked_patches_enter_as_zeros_and_targets_stay_unmasked(model_and_outputs):
  _, model, params, (ids, mask, types, patch_mask, feats), out = model_and_outputs
  masked = np.zeros(patch_mask.shape, np.int32)
  masked[:, [1, 4]] = 1
  zeroed = feats.copy()
  zeroed[:, [1, 4]] = 0
  a = model.apply({"params": params}, ids, mask, types, patch_features=feats,
                  patch_mask=patch_mask, masked_patches=masked)
  b = model.apply({"params": params}, ids, mask, types, patch_features=zeroed,
                  patch_mask=patch_mask)
  np.testing.assert_array_equal(a.last_hidden_state, b.last_hidden_state)
  np.testing.assert_array_equal(a.patch_targets, feats)
  assert not np.allclose(a.last_hidden_state, out.last_hidden_state)


def test_patchify_matches_explicit_loops():
  x = np.random.default_rng(3).normal(size=(2, 8, 12, 3)).astype(np.float32)
  got = np.asarray(fb.patchify(x, 4))
  assert got.shape == (2, 6, 4, 4, 3)
  for b in range(2):
    for i in range(2):
      for j in range(3):
        np.testing.assert_array_equal(got[b, i * 3 + j], x[b, 4 * i:4 * i + 4,
                                                           4 * j:4 * j + 4])


def _conv_same(x, kernel, bias, stride):
  """TF/Flax 'SAME' 2-D convolution by loops: x [H, W, Cin], kernel [3, 3, Cin, Cout]."""
  h, w, _ = x.shape
  out_h, out_w = -(-h // stride), -(-w // stride)
  pad_h = max((out_h - 1) * stride + 3 - h, 0)
  pad_w = max((out_w - 1) * stride + 3 - w, 0)
  xp = np.pad(x, ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2),
                  (0, 0)))
  y = np.zeros((out_h, out_w, kernel.shape[-1]))
  for i in range(out_h):
    for j in range(out_w):
      window = xp[i * stride:i * stride + 3, j * stride:j * stride + 3]
      y[i, j] = np.einsum("xyc,xyco->o", window, kernel) + bias
  return y


def test_conv_stem_matches_numpy_per_patch():
  cfg = _config(image_input="pixels", image_size=8, patch_size=4, stem_channels=(3, 5))
  rng = np.random.default_rng(4)
  pixels = rng.uniform(size=(2, 8, 8, 3)).astype(np.float32)
  patches = np.asarray(fb.patchify(pixels, 4))
  stem_module = fb.PatchStem(cfg)
  stem = jax.tree.map(np.asarray, nn.meta.unbox(
      stem_module.init(jax.random.key(0), patches)["params"]))
  got = np.asarray(stem_module.apply({"params": stem}, patches))
  assert got.shape == (2, 4, 5)
  for b in range(2):
    for p in range(4):
      h = _gelu(_conv_same(patches[b, p], stem["conv0"]["kernel"], stem["conv0"]["bias"],
                           1))
      h = _gelu(_conv_same(h, stem["conv1"]["kernel"], stem["conv1"]["bias"], 2))
      np.testing.assert_allclose(got[b, p], h.mean((0, 1)), atol=TOL, rtol=TOL)


def test_pixels_are_standardised_into_the_stem_and_targets_are_raw_patches():
  cfg = _config(image_input="pixels", image_size=8, patch_size=4, stem_channels=(3, 5),
                pixel_mean=0.3, pixel_std=0.2)
  model = fb.FashionBert(cfg)
  rng = np.random.default_rng(5)
  pixels = rng.uniform(size=(2, 8, 8, 3)).astype(np.float32)
  ids = rng.integers(5, 40, (2, 4)).astype(np.int32)

  @jax.jit
  def run(key):
    params = model.init(key, ids, pixels=pixels)["params"]
    stem = fb.PatchStem(cfg).apply({"params": params["stem"]},
                                   (fb.patchify(pixels, 4) - 0.3) / 0.2)
    return model.apply({"params": params}, ids, pixels=pixels), stem, params

  out, stem_features, params = run(jax.random.key(0))
  patches = np.asarray(fb.patchify(pixels, 4))
  np.testing.assert_array_equal(out.patch_targets, patches.reshape(2, 4, -1))
  assert out.mpm_logits.shape == (2, 4, cfg.target_size) == (2, 4, 48)
  # The patch embeddings are those of the stem's features of standardised pixels.
  embedded = fb.PatchEmbeddings(cfg).apply({"params": params["patch_embeddings"]},
                                           stem_features)
  again = fb.PatchEmbeddings(cfg).apply(
      {"params": params["patch_embeddings"]},
      fb.PatchStem(cfg).apply({"params": params["stem"]}, fb.patchify(pixels, 4)))
  assert not np.allclose(embedded, again, atol=1e-3)
  assert np.isfinite(np.asarray(out.last_hidden_state)).all()


def test_bad_configs_and_inputs_name_the_field():
  with pytest.raises(ValueError, match="image_size"):
    _config(image_input="pixels", image_size=30, patch_size=8)
  with pytest.raises(ValueError, match="image_input"):
    _config(image_input="rois")
  with pytest.raises(ValueError, match="hidden_size"):
    _config(hidden_size=30)
  model = fb.FashionBert(_config())
  with pytest.raises(ValueError, match="patch_features"):
    model.init(jax.random.key(0), np.ones((1, 4), np.int32),
               patch_features=np.ones((1, 6, 9), np.float32))


def test_zoo_knows_fashionbert():
  assert {"fashionbert-base", "fashionbert-tiny"} <= set(zoo.list_models())
  base = zoo.get_config("fashionbert-base")
  assert (base.encoder.hidden_size, base.encoder.num_layers, base.num_patches,
          base.patch_feature_size) == (768, 12, 64, 2048)
  with pytest.raises(ValueError, match="hidden_sise"):
    base.replace(hidden_sise=3)
  assert base.replace(dtype="bfloat16", image_input="pixels").encoder.dtype == "bfloat16"
  assert isinstance(zoo.create_model("fashionbert-tiny", dtype="bfloat16"),
                    fb.FashionBert)


def test_every_parameter_has_logical_axes_and_no_mesh_names():
  cfg = _config(image_input="pixels", image_size=8, patch_size=4, stem_channels=(3, 5))
  model = fb.FashionBert(cfg)
  variables = jax.eval_shape(lambda: model.init(
      jax.random.key(0), np.ones((2, 4), np.int32), pixels=np.zeros((2, 8, 8, 3))))
  leaves = jax.tree.leaves(variables["params"],
                           is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert len(leaves) > 20
  for leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned)
    assert len(leaf.names) == leaf.value.ndim
    assert not {"data", "fsdp", "model", "stage"} & set(leaf.names)
