"""FashionBERT (Gao et al., SIGIR 2020): a BERT encoder over caption tokens and image
patches, with masked-language, masked-patch and text-image alignment heads.

The sequence is [CLS] text [SEP] followed by the image's patches (a grid of
image_size/patch_size squared). Text tokens are embedded as in BERT (word + position +
token type, LayerNorm); each patch becomes a vector either through a small
convolutional stem run on its pixels (`image_input='pixels'`: 3x3 conv, GELU, 3x3
conv stride 2, GELU, mean over the patch) or from precomputed patch features
(`image_input='features'`, FashionBERT's frozen ResNet vectors), then a projection
to the hidden size plus a patch-position and an image-segment embedding, LayerNorm.
The joint sequence runs through the same post-LN layer stack as etjax.models.bert.

Heads (EasyTransfer's release is the reference for their form):
  - masked language modelling: dense, activation, LayerNorm, then scores against the
    word embedding table (tied) plus a bias: logits [B, L_text, vocab];
  - masked patch modelling: a bias-free dense layer to the patch target's size; the
    target is the patch's feature vector (pixels mode: its flattened pixels), and the
    loss a KL divergence between the softmaxes of target and prediction;
  - alignment: a dense layer on the pooled [CLS] output, 2 logits (0 = mismatched).
A masked patch enters the encoder as zeros (pixels or features), as in EasyTransfer.
Parameters of the heads live under 'mlm_head', 'mpm_head' and 'itm_head'; everything
else is the shared backbone (see HEAD_NAMES).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from etjax.models import layers, zoo
from etjax.models.bert import Embeddings, EncoderLayer, position_ids_for
from etjax.models.config import EncoderConfig, dtype_of, raise_failed
from etjax.models.stack import LayerStack, stack_options

HEAD_NAMES = ("mlm_head", "mpm_head", "itm_head")
IMAGE_INPUTS = ("pixels", "features")


@dataclasses.dataclass(frozen=True)
class FashionBertConfig:
  """FashionBERT: a BERT encoder's config plus the image side.

  image_input 'pixels': images [B, image_size, image_size, channels] cut into
  patch_size squares, standardised by pixel_mean and pixel_std, each through a conv
  stem of `stem_channels`; 'features': precomputed patch vectors [B, <= num_patches,
  patch_feature_size]. `make` builds one from flat fields of both kinds, `replace`
  changes either kind (zoo overrides such as dtype='bfloat16' reach the encoder).
  """
  encoder: EncoderConfig = EncoderConfig()
  image_input: str = "features"
  image_size: int = 64
  patch_size: int = 8
  channels: int = 3
  stem_channels: tuple[int, int] = (32, 64)
  pixel_mean: float = 0.5
  pixel_std: float = 0.25
  num_patches: int = 64
  patch_feature_size: int = 2048

  def __post_init__(self):
    object.__setattr__(self, "stem_channels", tuple(self.stem_channels))
    pixels = self.image_input == "pixels"
    raise_failed(self, [
        (isinstance(self.encoder, EncoderConfig) and self.encoder.model_type == "bert",
         "encoder", "a BERT EncoderConfig"),
        (self.image_input in IMAGE_INPUTS, "image_input", f"one of {IMAGE_INPUTS}"),
        (not pixels or (self.patch_size > 0 and self.image_size % self.patch_size == 0),
         "image_size", f"a multiple of patch_size={self.patch_size}"),
        (not pixels or (len(self.stem_channels) == 2 and min(self.stem_channels) > 0),
         "stem_channels", "two positive channel counts"),
        (self.pixel_std > 0, "pixel_std", "positive"),
        (min(self.num_patches, self.patch_feature_size, self.channels) > 0, "num_patches",
         "num_patches, patch_feature_size and channels positive"),
    ])

  @classmethod
  def make(cls, **fields) -> "FashionBertConfig":
    """A config from flat fields: FashionBertConfig's own and EncoderConfig's."""
    return cls().replace(**fields)

  def replace(self, **changes) -> "FashionBertConfig":
    """Changes fields of this config or of its encoder (by the field's name)."""
    own = {f.name for f in dataclasses.fields(self)} - {"encoder"}
    encoder_fields = {f.name for f in dataclasses.fields(EncoderConfig)} - {"model_type"}
    unknown = sorted(set(changes) - own - encoder_fields)
    if unknown:
      raise ValueError(f"unknown FashionBertConfig field(s) {unknown}; known: "
                       f"{sorted(own | encoder_fields)}")
    encoder = self.encoder.replace(**{k: v for k, v in changes.items()
                                      if k in encoder_fields})
    return dataclasses.replace(self, encoder=encoder,
                               **{k: v for k, v in changes.items() if k in own})

  @property
  def patches_per_image(self) -> int:
    if self.image_input == "pixels":
      return (self.image_size // self.patch_size) ** 2
    return self.num_patches

  @property
  def target_size(self) -> int:
    """Width of a patch's masked-patch-modelling target."""
    if self.image_input == "pixels":
      return self.patch_size * self.patch_size * self.channels
    return self.patch_feature_size

  def build_module(self) -> "FashionBert":
    return FashionBert(self)


@flax.struct.dataclass
class FashionBertOutput:
  """What FashionBert returns.

  Attributes:
    last_hidden_state: [B, L_text + P, hidden] (text positions first).
    pooled_output: [B, hidden], tanh(dense([CLS])).
    mlm_logits: [B, L_text, vocab] (float32).
    mpm_logits: [B, P, target_size] (float32).
    itm_logits: [B, 2] alignment logits, class 1 = matched (float32).
    patch_targets: [B, P, target_size], each patch's unmasked target features.
  """
  last_hidden_state: jax.Array
  pooled_output: jax.Array
  mlm_logits: jax.Array
  mpm_logits: jax.Array
  itm_logits: jax.Array
  patch_targets: jax.Array


def patchify(pixels_bhwc: jax.Array, patch_size: int) -> jax.Array:
  """[B, H, W, C] -> [B, P, patch_size, patch_size, C], patches in row-major order."""
  b, h, w, c = pixels_bhwc.shape
  gh, gw = h // patch_size, w // patch_size
  x = pixels_bhwc.reshape(b, gh, patch_size, gw, patch_size, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, patch_size, patch_size, c)


def _dtypes(cfg: FashionBertConfig) -> dict:
  return dict(dtype=dtype_of(cfg.encoder.dtype),
              param_dtype=dtype_of(cfg.encoder.param_dtype))


class PatchStem(nn.Module):
  """Conv stem over each patch: [B, P, p, p, C] -> features [B, P, stem_channels[1]]."""
  config: FashionBertConfig

  @nn.compact
  def __call__(self, patches_bpxyc: jax.Array) -> jax.Array:
    cfg = self.config
    b, p = patches_bpxyc.shape[:2]
    x = patches_bpxyc.reshape((b * p,) + patches_bpxyc.shape[2:])
    for i, (features, stride) in enumerate(zip(cfg.stem_channels, (1, 2))):
      x = nn.Conv(features, (3, 3), strides=(stride, stride), padding="SAME",
                  kernel_init=layers.logical_init(nn.initializers.lecun_normal(),
                                                  (None, None, None, None)),
                  bias_init=layers.logical_init(nn.initializers.zeros, (None,)),
                  name=f"conv{i}", **_dtypes(cfg))(x)
      x = layers.activation(cfg.encoder.hidden_act)(x)
    return x.mean(axis=(1, 2)).reshape(b, p, -1)


class PatchEmbeddings(nn.Module):
  """Patch vectors -> projection + patch position + image segment, LayerNorm, dropout:
  [B, P, F] -> [B, P, hidden]."""
  config: FashionBertConfig

  @nn.compact
  def __call__(self, features_bpf: jax.Array, deterministic: bool = True) -> jax.Array:
    cfg, enc = self.config, self.config.encoder
    kw = dict(init_stddev=enc.initializer_range, **_dtypes(cfg))
    x_bpd = layers.Dense((enc.hidden_size,), (None,), ("embed",), name="projection",
                         **kw)(features_bpf)
    positions = jnp.arange(features_bpf.shape[1])
    x_bpd = x_bpd + layers.Embed(cfg.patches_per_image, enc.hidden_size, table_axis=None,
                                 name="position", **kw)(positions)[None]
    x_bpd = x_bpd + layers.Embed(1, enc.hidden_size, table_axis=None, name="segment",
                                 **kw)(jnp.zeros((1, 1), jnp.int32))
    x_bpd = layers.LayerNorm(enc.layer_norm_eps, name="norm", **_dtypes(cfg))(x_bpd)
    return layers.Dropout(enc.hidden_dropout)(x_bpd, deterministic=deterministic)


class TiedMLMHead(nn.Module):
  """BERT's MLM head: dense, activation, LayerNorm, scores against the word table
  (tied) plus a bias: [B, L, hidden], table [vocab, hidden] -> logits [B, L, vocab]."""
  config: FashionBertConfig

  @nn.compact
  def __call__(self, x_bld: jax.Array, table_vd: jax.Array) -> jax.Array:
    cfg, enc = self.config, self.config.encoder
    x_bld = layers.Dense((enc.hidden_size,), ("embed",), ("mlp",), name="transform",
                         init_stddev=enc.initializer_range, **_dtypes(cfg))(x_bld)
    x_bld = layers.activation(enc.hidden_act)(x_bld)
    x_bld = layers.LayerNorm(enc.layer_norm_eps, name="norm", **_dtypes(cfg))(x_bld)
    bias = self.param("bias", layers.logical_init(nn.initializers.zeros, ("vocab",)),
                      (enc.vocab_size,), dtype_of(enc.param_dtype))
    logits = jnp.einsum("bld,vd->blv", x_bld, table_vd.astype(x_bld.dtype),
                        preferred_element_type=jnp.float32)
    return logits + bias.astype(jnp.float32)


class FashionBert(nn.Module):
  """The FashionBERT encoder with its three pretraining heads.

  Call: (input_ids [B, L], attention_mask [B, L] = ones, token_type_ids [B, L] = zeros,
  *, pixels [B, H, W, C] or patch_features [B, P, F] (as config.image_input says),
  patch_mask [B, P] = ones (nonzero: the patch exists), masked_patches [B, P] = none
  (nonzero: the patch enters as zeros), deterministic) -> FashionBertOutput.
  """
  config: FashionBertConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None,
               token_type_ids: Optional[jax.Array] = None, *,
               pixels: Optional[jax.Array] = None,
               patch_features: Optional[jax.Array] = None,
               patch_mask: Optional[jax.Array] = None,
               masked_patches: Optional[jax.Array] = None,
               deterministic: bool = True) -> FashionBertOutput:
    cfg = self.config
    enc_cfg = cfg.encoder
    input_ids = layers.constrain(jnp.asarray(input_ids, jnp.int32), ("batch", "length"))
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    patches, targets_bpt = self._patch_inputs(pixels, patch_features)
    num_patches = patches.shape[1]
    if masked_patches is not None:
      keep = (masked_patches == 0).reshape(masked_patches.shape + (1,) * (patches.ndim - 2))
      patches = jnp.where(keep, patches, jnp.zeros_like(patches))
    if cfg.image_input == "pixels":
      # Standardised pixels: raw [0, 1] values make the stem's output nearly the same
      # for every image (its response to overall brightness dominates), and the
      # patch-position embeddings then drown the image content.
      patches = (patches - cfg.pixel_mean) / cfg.pixel_std
      patches = PatchStem(cfg, name="stem")(patches.astype(dtype_of(cfg.encoder.dtype)))
    if patch_mask is None:
      patch_mask = jnp.ones(patches.shape[:2], attention_mask.dtype)
    embeddings = Embeddings(enc_cfg, name="embeddings")
    text_bld = embeddings(input_ids, token_type_ids, position_ids_for(enc_cfg, input_ids),
                          deterministic)
    image_bpd = PatchEmbeddings(cfg, name="patch_embeddings")(patches, deterministic)
    x_bsd = jnp.concatenate([text_bld, image_bpd.astype(text_bld.dtype)], axis=1)
    x_bsd = layers.constrain(x_bsd, ("batch", "length", "embed"))
    mask_bs = jnp.concatenate([attention_mask, patch_mask.astype(attention_mask.dtype)],
                              axis=1)
    x_bsd, _ = LayerStack(layer_cls=EncoderLayer, layer_kwargs=dict(config=enc_cfg),
                          num_layers=cfg.encoder.num_layers, **stack_options(cfg.encoder),
                          name="encoder")(x_bsd, {"attention_mask": mask_bs}, {},
                                          deterministic)
    # A square kernel cannot map both dims to 'embed' (one mesh axis used twice).
    pooled_bd = jnp.tanh(layers.Dense((enc_cfg.hidden_size,), ("embed",), ("mlp",),
                                      init_stddev=enc_cfg.initializer_range, name="pooler",
                                      **_dtypes(cfg))(x_bsd[:, 0]))
    length = input_ids.shape[1]
    table_vd = nn.meta.unbox(embeddings.variables["params"]["word"]["embedding"])
    mlm_logits = TiedMLMHead(cfg, name="mlm_head")(x_bsd[:, :length], table_vd)
    mpm_logits = layers.Dense((cfg.target_size,), ("embed",), (None,), use_bias=False,
                              init_stddev=cfg.encoder.initializer_range, name="mpm_head",
                              **_dtypes(cfg))(x_bsd[:, length:length + num_patches])
    itm_logits = layers.Dense((2,), ("embed",), ("classes",),
                              init_stddev=cfg.encoder.initializer_range, name="itm_head",
                              dtype=jnp.float32)(pooled_bd)
    return FashionBertOutput(
        last_hidden_state=x_bsd, pooled_output=pooled_bd, mlm_logits=mlm_logits,
        mpm_logits=mpm_logits.astype(jnp.float32), itm_logits=itm_logits,
        patch_targets=targets_bpt)

  def _patch_inputs(self, pixels, patch_features):
    """(patches: [B, P, p, p, C] pixels or [B, P, F] features; targets [B, P, T])."""
    cfg = self.config
    if cfg.image_input == "pixels":
      if pixels is None or pixels.ndim != 4 or pixels.shape[1:] != (
          cfg.image_size, cfg.image_size, cfg.channels):
        raise ValueError(f"FashionBert(image_input='pixels') needs pixels [B, "
                         f"{cfg.image_size}, {cfg.image_size}, {cfg.channels}], got "
                         f"{None if pixels is None else pixels.shape}")
      patches = patchify(jnp.asarray(pixels, jnp.float32), cfg.patch_size)
      return patches, patches.reshape(patches.shape[:2] + (-1,))
    if patch_features is None or patch_features.ndim != 3 or (
        patch_features.shape[2] != cfg.patch_feature_size
        or patch_features.shape[1] > cfg.num_patches):
      raise ValueError(f"FashionBert(image_input='features') needs patch_features [B, "
                       f"<= {cfg.num_patches}, {cfg.patch_feature_size}], got "
                       f"{None if patch_features is None else patch_features.shape}")
    patch_features = jnp.asarray(patch_features, jnp.float32)
    return patch_features, patch_features


def _fashionbert(hidden, num_layers, heads, **kw) -> FashionBertConfig:
  return FashionBertConfig.make(hidden_size=hidden, num_layers=num_layers,
                                num_heads=heads, intermediate_size=4 * hidden, **kw)


# The paper's model: BERT-base over 64 patches (an 8x8 grid) of 2048-d ResNet-50
# features; the tiny one renders the synthetic pairs of etjax.data.fashion_synthetic
# (32x32 pixels, 8x8 patches through the conv stem, its 28-token vocabulary).
zoo.register("fashionbert-base", lambda: _fashionbert(768, 12, 12))
zoo.register("fashionbert-tiny", lambda: _fashionbert(
    64, 2, 2, vocab_size=32, max_position_embeddings=32, image_input="pixels",
    image_size=32, patch_size=8, stem_channels=(16, 32), hidden_dropout=0.0,
    attention_dropout=0.0))
