"""Tiny Linen modules with logical axes for the sharding tests (no etjax models)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

_INIT = nn.initializers.normal(0.2)


def _param(module, name, shape, names):
  return module.param(name, nn.with_logical_partitioning(_INIT, names), shape)


class TinyClassifier(nn.Module):
  """Embedding, one attention-shaped projection, an MLP and a classifier head.

  Returns logits [batch, classes].
  """
  vocab: int = 16
  embed: int = 8
  heads: int = 2
  kv: int = 4
  mlp: int = 16
  classes: int = 4

  @nn.compact
  def __call__(self, input_ids_bl, deterministic: bool = True):
    table_ve = _param(self, "embedding", (self.vocab, self.embed), ("vocab", "embed"))
    x_bld = jnp.take(table_ve, input_ids_bl, axis=0)
    x_bld = nn.with_logical_constraint(x_bld, ("batch", "length", "embed"))
    wq_dhk = _param(self, "query", (self.embed, self.heads, self.kv),
                    ("embed", "heads", "kv"))
    wo_hkd = _param(self, "out", (self.heads, self.kv, self.embed),
                    ("heads", "kv", "embed"))
    q_blhk = jnp.einsum("bld,dhk->blhk", x_bld, wq_dhk)
    x_bld = x_bld + jnp.einsum("blhk,hkd->bld", jnp.tanh(q_blhk), wo_hkd)
    wi_df = _param(self, "wi", (self.embed, self.mlp), ("embed", "mlp"))
    wo_fd = _param(self, "wo", (self.mlp, self.embed), ("mlp", "embed"))
    x_bld = x_bld + jnp.einsum("blf,fd->bld", jax.nn.gelu(x_bld @ wi_df), wo_fd)
    scale_d = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones,
                                                               ("embed",)), (self.embed,))
    head_dc = _param(self, "head", (self.embed, self.classes), ("embed", "classes"))
    return jnp.mean(x_bld * scale_d, axis=1) @ head_dc


class ResidualMlpLayer(nn.Module):
  """A pipeline-interface layer: residual MLP block plus a masked mean from side_b.

  Call: (x_bld, side_b, shared, deterministic) -> (x_bld, {'pooled_bd': [B, D]}).
  side_b['mask_bl'] is a float [B, L] key mask; shared['bias_d'] a [D] bias added by
  every layer to every example.
  """
  embed: int = 8
  mlp: int = 16
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x_bld, side_b, shared, deterministic: bool):
    wi_df = _param(self, "wi", (self.embed, self.mlp), ("embed", "mlp"))
    wo_fd = _param(self, "wo", (self.mlp, self.embed), ("mlp", "embed"))
    mask_bl = side_b["mask_bl"]
    pooled_bd = (jnp.sum(x_bld * mask_bl[:, :, None], axis=1)
                 / jnp.maximum(jnp.sum(mask_bl, axis=1, keepdims=True), 1.0))
    h_blf = jax.nn.gelu(jnp.einsum("bld,df->blf", x_bld + pooled_bd[:, None, :], wi_df))
    h_blf = nn.with_logical_constraint(h_blf, ("batch", "length", "mlp"))
    h_blf = nn.Dropout(self.dropout_rate)(h_blf, deterministic=deterministic)
    y_bld = x_bld + jnp.einsum("blf,fd->bld", h_blf, wo_fd) + shared["bias_d"]
    y_bld = nn.with_logical_constraint(y_bld, ("batch", "length", "embed"))
    return y_bld, {"pooled_bd": pooled_bd}


def dp_train(num_steps: int = 3, global_batch_size: int = 16, length: int = 6):
  """SGD steps of TinyClassifier on a data-parallel mesh over all global devices.

  Runs the same way in one process or in each process of a multi-process job (each
  process feeds only its own rows). Returns the final parameters as numpy arrays.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from etjax.sharding import distributed, mesh as mesh_lib, partitioning, rules
  model = TinyClassifier()
  mesh = mesh_lib.make_mesh({"data": -1})
  dp = rules.get_rules("dp")
  batch_sh = partitioning.batch_sharding(mesh, dp)

  def init(rng):
    return model.init(rng, jnp.zeros((global_batch_size, length), jnp.int32))["params"]
  abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
  param_sh = partitioning.state_shardings(abstract, mesh, dp)

  def update(params, batch):
    def loss_fn(p):
      logits = model.apply({"params": p}, batch["ids"])
      logp = jax.nn.log_softmax(logits)
      return -jnp.mean(jnp.take_along_axis(logp, batch["labels"][:, None], axis=1))
    grads = jax.grad(loss_fn)(params)
    return jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)

  with jax.set_mesh(mesh):
    params = jax.jit(init, out_shardings=param_sh)(jax.random.PRNGKey(0))
    step = jax.jit(update, in_shardings=(param_sh, batch_sh), out_shardings=param_sh,
                   donate_argnums=0)
    rows = distributed.process_rows(batch_sh, global_batch_size)
    for i in range(num_steps):
      data = np.random.default_rng(i)
      full = {"ids": data.integers(0, 16, (global_batch_size, length), dtype=np.int32),
              "labels": data.integers(0, 4, (global_batch_size,), dtype=np.int32)}
      local = {k: v[rows] for k, v in full.items()}
      params = step(params, distributed.global_batch(local, batch_sh, global_batch_size))
  return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data),
                      nn.meta.unbox(params))
