"""Where parameter-efficient methods attach to a model: Linen method interceptors.

Each method is an interceptor (`flax.linen.intercept_methods`) that wraps the calls of
one kind of ModelZoo module and adds its own parameters to that module's scope, so no
model code is forked and a model without PEFT has exactly its usual parameter tree:

- LoRA (Hu et al. 2021) wraps `layers.Dense` modules whose path matches a target:
  y = x W + b + (alpha / r) * dropout(x) A B, with A [*in, r] and B [r, *out] stored as
  `lora_a` / `lora_b` beside the Dense's `kernel`. B starts at zero, so training starts
  from the base model exactly; inside a scanned stack both carry the 'layers' axis.
- Houlsby adapters (Houlsby et al. 2019) wrap `layers.MultiHeadAttention` and
  `layers.MLP`: their output h becomes h + up(act(down(h))), a bottleneck of
  `adapter_size` features whose up-projection starts at zero (the identity).
- Prompt tuning (Lester et al. 2021) wraps the encoder's `LayerStack`: `prompt_length`
  trainable vectors are prepended to the embedded input the layers see, the attention
  mask is extended with ones for them, and their positions are dropped from the
  stack's output, so heads (pooler, span, tagging) see the original length.

Every interceptor records the module paths it attached to (`sites`), so a target that
matches nothing fails at init instead of training the head alone.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Sequence

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp

from etjax.models import layers
from etjax.models.dropout import dropout
from etjax.models.projection import project
from etjax.models.stack import LayerStack

Interceptor = Callable[..., Any]


def module_path(module: nn.Module) -> str:
  """'encoder/encoder/layers/attention/query' for a bound module."""
  return "/".join(str(p) for p in module.path)


def path_matcher(patterns: Sequence[str]) -> Callable[[str], bool]:
  """True for a '/'-joined path that ends with one of `patterns` at a name boundary:
  'query' matches 'encoder/layers/attention/query', 'attention/(query|value)' too."""
  compiled = [re.compile(rf"(^|/)(?:{p})$") for p in patterns]
  return lambda path: any(c.search(path) for c in compiled)


def _is_call(context, cls) -> bool:
  return isinstance(context.module, cls) and context.method_name == "__call__"


def _lora_a_init(rng, shape, dtype=jnp.float32):
  # PyTorch's kaiming_uniform_(a=sqrt(5)) on A, as Hugging Face PEFT initialises it:
  # U(-1/sqrt(fan_in), 1/sqrt(fan_in)) over the contracted (input) dims.
  bound = 1.0 / math.sqrt(math.prod(shape[:-1]))
  return jax.random.uniform(rng, shape, dtype, -bound, bound)


def lora_interceptor(targets: Sequence[str], rank: int, alpha: float, rate: float,
                     deterministic: bool, sites: list) -> Interceptor:
  """Adds (alpha / rank) * dropout(x) A B to every Dense whose path matches `targets`.

  A: `lora_a` [*in, rank], axes (*in_axes, None); B: `lora_b` [rank, *out], axes
  (None, *out_axes), zero-initialised. Dropout (rate) applies to the LoRA branch's
  input only, and only when not `deterministic`.
  """
  matches = path_matcher(targets)
  scale = alpha / rank

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if not _is_call(context, layers.Dense) or not matches(module_path(module)):
      return next_fun(*args, **kwargs)
    sites.append(module_path(module))
    y = next_fun(*args, **kwargs)
    x = args[0] if args else kwargs["x"]
    n_in = len(module.in_axes)
    a = module.param("lora_a", layers.logical_init(
        _lora_a_init, tuple(module.in_axes) + (None,)),
        tuple(x.shape[x.ndim - n_in:]) + (rank,), module.param_dtype)
    b = module.param("lora_b", layers.logical_init(
        nn.initializers.zeros, (None,) + tuple(module.out_axes)),
        (rank,) + tuple(module.features), module.param_dtype)
    if rate > 0.0 and not deterministic:
      x = dropout(x, rate, module.make_rng("dropout"))
    dtype = module.dtype
    h = project(jnp.asarray(x, dtype), jnp.asarray(a, dtype), n_in)
    delta = project(h.astype(dtype), jnp.asarray(b, dtype), 1)
    return (y.astype(jnp.float32) + scale * delta).astype(y.dtype)

  return intercept


class Adapter(nn.Module):
  """Houlsby bottleneck with a skip: h + up(act(down(h))); [..., embed] -> same.

  The up-projection (weights and bias) starts at zero, so a fresh adapter is the
  identity.
  """
  size: int
  activation: str = "gelu"
  init_stddev: float = 0.02
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h_bld: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    z = layers.Dense((self.size,), ("embed",), (None,), init_stddev=self.init_stddev,
                     name="down", **kw)(h_bld)
    z = layers.activation(self.activation)(z)
    up = layers.Dense((h_bld.shape[-1],), (None,), ("embed",), init_stddev=0.0,
                      name="up", **kw)(z)
    return (h_bld.astype(jnp.float32) + up.astype(jnp.float32)).astype(h_bld.dtype)


def adapter_interceptor(targets: Sequence[str], size: int, activation: str,
                        sites: list) -> Interceptor:
  """Puts an `Adapter` (named 'adapter') after every MultiHeadAttention and MLP whose
  path matches `targets`, before the layer's dropout, residual add and norm."""
  matches = path_matcher(targets)

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    is_attention = _is_call(context, layers.MultiHeadAttention)
    if not (is_attention or _is_call(context, layers.MLP)) or not matches(
        module_path(module)):
      return next_fun(*args, **kwargs)
    sites.append(module_path(module))
    out = next_fun(*args, **kwargs)
    h_bld = out[0] if is_attention else out
    h_bld = Adapter(size, activation, init_stddev=module.init_stddev,
                    dtype=module.dtype, param_dtype=module.param_dtype,
                    name="adapter")(h_bld)
    return (h_bld,) + tuple(out[1:]) if is_attention else h_bld

  return intercept


_STACK_ARGS = ("x_bld", "side_b", "shared", "deterministic")


def prompt_interceptor(target: str, length: int, init: str, init_stddev: float,
                       sites: list) -> Interceptor:
  """Prepends `length` trainable vectors (`prompt` [length, embed], axes (None,
  'embed')) to the input of the LayerStack whose path matches `target`.

  init 'tokens': the prompt starts as the embedded inputs of randomly drawn real
  (unmasked) positions of the example batch given to init (Lester et al. start from
  vocabulary embeddings; these are embeddings of real text, positions and norm
  included); 'normal': N(0, init_stddev^2).

  The stack's 'hidden_states' output loses the prompt positions like its main output;
  'attentions' keep them ([..., prompt + length, prompt + length]).
  """
  matches = path_matcher([target])

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if not _is_call(context, LayerStack) or not matches(module_path(module)):
      return next_fun(*args, **kwargs)
    where = module_path(module)
    sites.append(where)
    call = dict(zip(_STACK_ARGS, args), **kwargs)
    x_bld, side_b = call["x_bld"], dict(call["side_b"])
    if call.get("shared"):
      raise ValueError(f"prompt tuning: the layer stack {where!r} takes shared inputs "
                       f"{sorted(call['shared'])} whose size follows the length (a "
                       "position bias); prompts support stacks without them (BERT, "
                       "RoBERTa, ALBERT encoders)")
    if set(side_b) != {"attention_mask"}:
      raise ValueError(f"prompt tuning: the layer stack {where!r} takes per-example "
                       f"inputs {sorted(side_b)}; prompts support encoder stacks whose "
                       "only one is 'attention_mask'")
    mask_bl = side_b["attention_mask"]
    batch, _, embed = x_bld.shape

    def init_prompt(rng, shape, dtype=jnp.float32):
      if init == "normal":
        return init_stddev * jax.random.normal(rng, shape, dtype)
      flat_xd = x_bld.reshape(-1, embed).astype(dtype)
      weights = (mask_bl.reshape(-1) != 0).astype(jnp.float32)
      picks = jax.random.choice(rng, flat_xd.shape[0], (shape[0],),
                                p=weights / jnp.maximum(weights.sum(), 1.0))
      return flat_xd[picks]

    prompt_pd = module.param("prompt", layers.logical_init(init_prompt, (None, "embed")),
                             (length, embed), jnp.float32)
    prompt_bpd = jnp.broadcast_to(prompt_pd.astype(x_bld.dtype)[None],
                                  (batch, length, embed))
    call["x_bld"] = layers.constrain(jnp.concatenate([prompt_bpd, x_bld], axis=1),
                                     ("batch", "length", "embed"))
    side_b["attention_mask"] = jnp.concatenate(
        [jnp.ones((batch, length), mask_bl.dtype), mask_bl], axis=1)
    call["side_b"] = side_b
    y_bld, outputs = next_fun(**call)
    outputs = dict(outputs)
    if "hidden_states" in outputs:
      outputs["hidden_states"] = outputs["hidden_states"][:, :, length:]
    return y_bld[:, length:], outputs

  return intercept


def merge_lora(params: Any, scale: float) -> Any:
  """Folds every LoRA pair into its kernel: W + scale * A B, and drops `lora_a` /
  `lora_b`. Returns plain (unboxed) params with the base model's tree.

  Shapes: kernel [*prefix, *in, *out], A [*prefix, *in, r], B [*prefix, r, *out]
  (prefix: the scanned 'layers' axis, or nothing). The product runs in float32 (or
  float64 under x64) and is cast to the kernel's dtype.
  """
  flat = flatten(nn.meta.unbox(params))
  merged = {}
  for key, value in flat.items():
    if key.endswith("/lora_a") or key.endswith("/lora_b"):
      continue
    merged[key] = value
    base = key[:-len("kernel")]
    if not key.endswith("/kernel") or base + "lora_a" not in flat:
      continue
    a, b = flat[base + "lora_a"], flat[base + "lora_b"]
    n_out = value.ndim - a.ndim + 1
    prefix = b.shape[:b.ndim - 1 - n_out]
    wide = jnp.promote_types(value.dtype, jnp.float32)
    a2 = jnp.asarray(a, wide).reshape(prefix + (-1, a.shape[-1]))
    b2 = jnp.asarray(b, wide).reshape(prefix + (b.shape[len(prefix)], -1))
    delta = (a2 @ b2).reshape(value.shape)
    merged[key] = (jnp.asarray(value, wide) + scale * delta).astype(value.dtype)
  orphans = [k for k in flat if k.endswith("/lora_a") and
             k[:-len("lora_a")] + "kernel" not in flat]
  if orphans:
    raise ValueError(f"merge_lora: LoRA factors without a kernel beside them: {orphans}")
  return unflatten(merged)


def flatten(tree: Any) -> dict[str, Any]:
  """{'a/b/c': leaf} of nested dicts; logical boxes count as leaves."""
  return traverse_util.flatten_dict(tree, sep="/")


def unflatten(flat: dict[str, Any]) -> dict:
  """The nested dicts of `flatten`'s output."""
  return traverse_util.unflatten_dict(flat, sep="/")


def stop_gradient_where(tree: Any, frozen: Callable[[str], bool]) -> Any:
  """`tree` with jax.lax.stop_gradient on the leaves whose path `frozen` selects."""
  flat = flatten(tree)
  return unflatten({k: jax.tree.map(jax.lax.stop_gradient, v) if frozen(k) else v
                    for k, v in flat.items()})
