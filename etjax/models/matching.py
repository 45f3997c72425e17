"""Classifiers over word embeddings (TextCNN) and sentence-pair matching models.

All take token ids with masks and return a ClassifierOutput (logits [B, C], features
[B, F]). Pair models take (ids_a, mask_a, ids_b, mask_b).

- TextCNN (Kim, 2014): convolutions of several widths, max over time, dense.
- BiCNN: one TextCNN encoder shared by both sides; [u, v, |u-v|, u*v] -> MLP.
- HCNN (hybrid CNN, Yu et al., 2017): BiCNN's features plus a CNN over the word
  similarity matrix of the two texts.
- DAM (decomposable attention, Parikh et al., 2016): attend, compare, aggregate.
- DAM+: DAM over intra-sentence-attention inputs (Parikh et al.'s intra-attention
  variant with clipped distance biases).
- TwoTower: a shared encoder (BERT) embeds each side (mean over tokens); the vectors
  are outputs too, so they can be indexed for retrieval.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from etjax.models import layers
from etjax.models.heads import ClassifierOutput

NEG = -1e9


def _dense(features: int, name: str) -> layers.Dense:
  return layers.Dense((features,), ("embed",), ("mlp",), name=name, dtype=jnp.float32)


class CNNEncoder(nn.Module):
  """[B, L, E] embeddings -> [B, len(widths) * filters] max-pooled convolutions."""
  widths: Sequence[int] = (2, 3, 4)
  filters: int = 64

  @nn.compact
  def __call__(self, x_ble, mask_bl):
    pooled = []
    for w in self.widths:
      h_blf = nn.relu(nn.Conv(self.filters, (w,), padding="SAME", name=f"conv{w}")(x_ble))
      h_blf = jnp.where(mask_bl[..., None] > 0, h_blf, NEG)
      pooled.append(h_blf.max(axis=1))
    return jnp.concatenate(pooled, axis=-1)


class WordEmbedder(nn.Module):
  vocab_size: int
  embed_dim: int

  @nn.compact
  def __call__(self, ids_bl):
    return layers.Embed(self.vocab_size, self.embed_dim, name="word", init_stddev=0.1)(ids_bl)


def _classify(x_bf, num_labels, dropout, deterministic, hidden=0):
  if hidden:
    x_bf = nn.relu(nn.Dense(hidden, name="hidden")(x_bf))
  x_bf = layers.Dropout(dropout)(x_bf, deterministic=deterministic)
  return nn.Dense(num_labels, name="classifier")(x_bf)


class TextCNN(nn.Module):
  """Text classification: embeddings -> CNNEncoder -> dropout -> dense."""
  vocab_size: int
  num_labels: int
  embed_dim: int = 64
  widths: Sequence[int] = (2, 3, 4)
  filters: int = 64
  dropout_rate: float = 0.1

  @nn.compact
  def __call__(self, input_ids, attention_mask, *, deterministic=True):
    x = WordEmbedder(self.vocab_size, self.embed_dim, name="embed")(input_ids)
    f = CNNEncoder(self.widths, self.filters, name="cnn")(x, attention_mask)
    logits = _classify(f, self.num_labels, self.dropout_rate, deterministic)
    return ClassifierOutput(logits=logits, features=f, encoder=None)


def _match_features(u, v):
  return jnp.concatenate([u, v, jnp.abs(u - v), u * v], axis=-1)


class BiCNN(nn.Module):
  """Siamese CNN matching: a shared CNNEncoder; [u, v, |u-v|, u*v] -> MLP."""
  vocab_size: int
  num_labels: int
  embed_dim: int = 64
  widths: Sequence[int] = (2, 3, 4)
  filters: int = 64
  hidden: int = 64
  dropout_rate: float = 0.1

  def sides(self, ids_a, mask_a, ids_b, mask_b):
    embed = WordEmbedder(self.vocab_size, self.embed_dim, name="embed")
    cnn = CNNEncoder(self.widths, self.filters, name="cnn")
    xa, xb = embed(ids_a), embed(ids_b)
    return xa, xb, _match_features(cnn(xa, mask_a), cnn(xb, mask_b))

  @nn.compact
  def __call__(self, ids_a, mask_a, ids_b, mask_b, *, deterministic=True):
    _, _, f = self.sides(ids_a, mask_a, ids_b, mask_b)
    logits = _classify(f, self.num_labels, self.dropout_rate, deterministic, self.hidden)
    return ClassifierOutput(logits=logits, features=f, encoder=None)


class HCNN(BiCNN):
  """BiCNN features plus a 2-D CNN over the cosine similarity matrix of the words."""
  match_filters: int = 16

  @nn.compact
  def __call__(self, ids_a, mask_a, ids_b, mask_b, *, deterministic=True):
    xa, xb, f = self.sides(ids_a, mask_a, ids_b, mask_b)
    norm = lambda x: x / jnp.sqrt((x * x).sum(-1, keepdims=True) + 1e-6)
    sim_bab = jnp.einsum("bie,bje->bij", norm(xa), norm(xb))[..., None]
    h = nn.relu(nn.Conv(self.match_filters, (3, 3), padding="SAME", name="match_conv")(
        sim_bab))
    valid = (mask_a[:, :, None] * mask_b[:, None, :])[..., None] > 0
    g = jnp.where(valid, h, NEG).max(axis=(1, 2))
    f = jnp.concatenate([f, g], axis=-1)
    logits = _classify(f, self.num_labels, self.dropout_rate, deterministic, self.hidden)
    return ClassifierOutput(logits=logits, features=f, encoder=None)


class MLP2(nn.Module):
  """Two (dropout, dense, relu) layers; one instance is shared where it is reused."""
  hidden: int
  dropout_rate: float

  @nn.compact
  def __call__(self, x, deterministic=True):
    for i in range(2):
      x = layers.Dropout(self.dropout_rate)(x, deterministic=deterministic)
      x = nn.relu(nn.Dense(self.hidden, name=f"dense{i}")(x))
    return x


def _masked_softmax(scores, mask, axis):
  return jax.nn.softmax(jnp.where(mask > 0, scores, NEG), axis=axis)


class DAM(nn.Module):
  """Decomposable attention (Parikh et al., 2016) over word embeddings."""
  vocab_size: int
  num_labels: int
  embed_dim: int = 64
  hidden: int = 64
  dropout_rate: float = 0.1
  intra_attention: bool = False
  max_distance: int = 10

  def _intra(self, x_ble, mask_bl, mlp, bias, deterministic):
    # Intra-sentence attention with a learned bias per clipped distance.
    f = mlp(x_ble, deterministic)
    length = x_ble.shape[1]
    dist = jnp.clip(jnp.arange(length)[None, :] - jnp.arange(length)[:, None],
                    -self.max_distance, self.max_distance) + self.max_distance
    scores = jnp.einsum("bie,bje->bij", f, f) + bias[dist][None]
    attn = _masked_softmax(scores, mask_bl[:, None, :], axis=-1)
    return jnp.concatenate([x_ble, jnp.einsum("bij,bje->bie", attn, x_ble)], axis=-1)

  @nn.compact
  def __call__(self, ids_a, mask_a, ids_b, mask_b, *, deterministic=True):
    embed = WordEmbedder(self.vocab_size, self.embed_dim, name="embed")
    a, b = embed(ids_a), embed(ids_b)
    if self.intra_attention:
      # Both sides share the intra-attention weights.
      mlp = MLP2(self.hidden, self.dropout_rate, name="intra")
      bias = self.param("intra_distance_bias", nn.initializers.zeros,
                        (2 * self.max_distance + 1,))
      a = self._intra(a, mask_a, mlp, bias, deterministic)
      b = self._intra(b, mask_b, mlp, bias, deterministic)
    attend = MLP2(self.hidden, self.dropout_rate, name="attend")
    compare = MLP2(self.hidden, self.dropout_rate, name="compare")
    scores_bij = jnp.einsum("bih,bjh->bij", attend(a, deterministic),
                            attend(b, deterministic))
    beta = jnp.einsum("bij,bje->bie", _masked_softmax(scores_bij, mask_b[:, None, :], -1), b)
    alpha = jnp.einsum("bij,bie->bje", _masked_softmax(scores_bij, mask_a[:, :, None], 1), a)
    v1 = (compare(jnp.concatenate([a, beta], -1), deterministic)
          * mask_a[..., None]).sum(1)
    v2 = (compare(jnp.concatenate([b, alpha], -1), deterministic)
          * mask_b[..., None]).sum(1)
    f = jnp.concatenate([v1, v2], axis=-1)
    h = MLP2(self.hidden, self.dropout_rate, name="aggregate")(f, deterministic)
    logits = nn.Dense(self.num_labels, name="classifier")(h)
    return ClassifierOutput(logits=logits, features=f, encoder=None)


class TwoTower(nn.Module):
  """Siamese BERT matching: shared encoder, mean-pooled vectors, [u, v, |u-v|, u*v]
  -> dense. `features` holds [u; v] ([B, 2H]); `embed` gives one side's vector."""
  encoder: nn.Module
  num_labels: int
  dropout_rate: float = 0.1

  def embed(self, ids, mask, deterministic=True):
    out = self.encoder(ids, mask, jnp.zeros_like(ids), deterministic=deterministic)
    m = mask.astype(jnp.float32)[..., None]
    return (out.last_hidden_state * m).sum(1) / jnp.maximum(m.sum(1), 1.0)

  @nn.compact
  def __call__(self, ids_a, mask_a, ids_b, mask_b, *, deterministic=True):
    u, v = self.embed(ids_a, mask_a, deterministic), self.embed(ids_b, mask_b, deterministic)
    x = layers.Dropout(self.dropout_rate)(_match_features(u, v), deterministic=deterministic)
    logits = nn.Dense(self.num_labels, name="classifier")(x)
    return ClassifierOutput(logits=logits, features=jnp.concatenate([u, v], -1),
                            encoder=None)
