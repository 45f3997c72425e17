"""A tiny classifier with logical axes, its TrainStep, and a resumable batch iterator.

Shared by the trainer and checkpoint tests (imported as `toy_task`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from etjax.algorithms import optim
from etjax.algorithms.step import TrainState, TrainStep, apply_gradients, next_rng

VOCAB, LENGTH, CLASSES = 32, 8, 3


class ToyClassifier(nn.Module):
  """Mean-pooled embeddings -> MLP (embed->mlp->embed, residual) -> class logits."""
  embed: int = 16
  mlp: int = 32
  dropout: float = 0.1

  @nn.compact
  def __call__(self, input_ids_bl, attention_mask_bl, *, deterministic=True):
    lp = nn.with_logical_partitioning
    init = nn.initializers.normal(0.2)
    table = self.param("embedding", lp(init, ("vocab", "embed")), (VOCAB, self.embed))
    x_ble = jnp.take(table, input_ids_bl, axis=0)
    x_ble = nn.with_logical_constraint(x_ble, ("batch", "length", "embed"))
    mask_bl = attention_mask_bl.astype(x_ble.dtype)
    x_be = (x_ble * mask_bl[..., None]).sum(1) / jnp.maximum(mask_bl.sum(1, keepdims=True), 1)
    x_be = nn.with_logical_constraint(x_be, ("batch", "embed"))
    h_bm = nn.Dense(self.mlp, kernel_init=lp(init, ("embed", "mlp")),
                    bias_init=lp(nn.initializers.zeros, ("mlp",)), name="wi")(x_be)
    h_bm = nn.with_logical_constraint(nn.gelu(h_bm), ("batch", "mlp"))
    h_bm = nn.Dropout(self.dropout)(h_bm, deterministic=deterministic)
    y_be = nn.Dense(self.embed, kernel_init=lp(init, ("mlp", "embed")),
                    bias_init=lp(nn.initializers.zeros, ("embed",)), name="wo")(h_bm)
    x_be = nn.LayerNorm(scale_init=lp(nn.initializers.ones, ("embed",)),
                        bias_init=lp(nn.initializers.zeros, ("embed",)))(x_be + y_be)
    return nn.Dense(CLASSES, kernel_init=lp(init, ("embed", "classes")),
                    bias_init=lp(nn.initializers.zeros, ("classes",)), name="head")(x_be)


def make_train_step(total_steps: int = 100, learning_rate: float = 0.05) -> TrainStep:
  """A classification TrainStep over `ToyClassifier` with AdamW."""
  model = ToyClassifier()
  tx = optim.make_optimizer("adamw", learning_rate=learning_rate, warmup_steps=2,
                            total_steps=total_steps, weight_decay=0.01)

  def init(rng, batch):
    params_rng, state_rng = jax.random.split(rng)
    params = model.init(params_rng, batch["input_ids"], batch["attention_mask"])["params"]
    return TrainState(step=jnp.zeros([], jnp.int32), params=params,
                      opt_state=tx.init(params), rng=state_rng)

  def loss_fn(params, batch, dropout_rng):
    logits_bc = model.apply({"params": params}, batch["input_ids"],
                            batch["attention_mask"], deterministic=False,
                            rngs={"dropout": dropout_rng})
    nll_b = optax.softmax_cross_entropy_with_integer_labels(logits_bc, batch["labels"])
    weight_b = batch["weight"]
    return jnp.sum(nll_b * weight_b) / jnp.maximum(jnp.sum(weight_b), 1.0)

  def update(state, batch):
    step_rng, new_rng = next_rng(state)
    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch, step_rng)
    return apply_gradients(state, grads, tx, rng=new_rng), {"loss": loss}

  def predict(state, batch):
    logits_bc = model.apply({"params": state.params}, batch["input_ids"],
                            batch["attention_mask"], deterministic=True)
    return {"logits": logits_bc}

  return TrainStep(init=init, update=update, predict=predict)


def make_examples(num: int, seed: int) -> dict[str, np.ndarray]:
  """Token sequences whose label is which of three token ranges dominates."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, CLASSES, size=num)
  lengths = rng.integers(3, LENGTH + 1, size=num)
  ids = np.zeros((num, LENGTH), np.int32)
  for i in range(num):
    lo = 1 + labels[i] * 10
    cue = rng.integers(lo, lo + 10, size=LENGTH)
    noise = rng.integers(1, VOCAB, size=LENGTH)
    ids[i] = np.where(rng.random(LENGTH) < 0.6, cue, noise)
    ids[i, lengths[i]:] = 0
  mask = (np.arange(LENGTH)[None, :] < lengths[:, None]).astype(np.int32)
  return {"input_ids": ids, "attention_mask": mask,
          "token_type_ids": np.zeros_like(ids), "labels": labels.astype(np.int32),
          "domain": np.zeros(num, np.int32), "weight": np.ones(num, np.float32)}


class ToyIterator:
  """Endless (or one-pass) batches over `make_examples`, reshuffled every epoch by seed.

  The data contract: `next()` gives a dict of numpy arrays; `get_state()` a JSON dict;
  `set_state(d)` goes back to that position.
  """

  def __init__(self, num: int = 64, batch_size: int = 8, seed: int = 0,
               repeat: bool = True):
    self.data = make_examples(num, seed)
    self.num, self.batch_size, self.seed, self.repeat = num, batch_size, seed, repeat
    self.epoch, self.index = 0, 0

  def _order(self):
    return np.random.default_rng([self.seed, self.epoch]).permutation(self.num)

  def __iter__(self):
    return self

  def __next__(self):
    if self.index >= self.num:
      if not self.repeat:
        raise StopIteration
      self.epoch, self.index = self.epoch + 1, 0
    rows = self._order()[self.index:self.index + self.batch_size]
    self.index += self.batch_size
    return {k: v[rows] for k, v in self.data.items()}

  def get_state(self):
    return {"epoch": self.epoch, "index": self.index}

  def set_state(self, state):
    self.epoch, self.index = int(state["epoch"]), int(state["index"])


def eval_batches(num: int = 20, batch_size: int = 8, seed: int = 1):
  """A one-pass list of batches; the last one is short (the trainer pads it)."""
  return list(ToyIterator(num, batch_size, seed, repeat=False))
