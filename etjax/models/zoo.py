"""The ModelZoo: model names -> configs and modules.

Sizes follow the EasyTransfer paper (Table 2 text: base 768/12/12, large 1024/24/16,
ALBERT xlarge 2048/24/32, xxlarge 4096/12/64) and the public checkpoints.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import flax.linen as nn

from etjax.models.config import EncoderConfig

_BERT_VOCAB, _ROBERTA_VOCAB, _ALBERT_VOCAB = 30522, 50265, 30000


def _bert(hidden, layers, heads, **kw) -> EncoderConfig:
  return EncoderConfig(model_type="bert", vocab_size=_BERT_VOCAB, hidden_size=hidden,
                       num_layers=layers, num_heads=heads, intermediate_size=4 * hidden,
                       **kw)


def _roberta(hidden, layers, heads) -> EncoderConfig:
  return EncoderConfig(model_type="roberta", vocab_size=_ROBERTA_VOCAB, hidden_size=hidden,
                       num_layers=layers, num_heads=heads, intermediate_size=4 * hidden,
                       max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                       layer_norm_eps=1e-5)


def _albert(hidden, layers, heads) -> EncoderConfig:
  return EncoderConfig(model_type="albert", vocab_size=_ALBERT_VOCAB, hidden_size=hidden,
                       num_layers=layers, num_heads=heads, intermediate_size=4 * hidden,
                       embedding_size=128, share_layers=True, hidden_act="gelu_new",
                       hidden_dropout=0.0, attention_dropout=0.0, layer_norm_eps=1e-12)


# name -> zero-argument factory of a config. Other model families register theirs
# through `register` (see _FAMILY_MODULES).
_CONFIGS: dict[str, Callable[[], Any]] = {
    "bert-tiny": lambda: _bert(128, 2, 2),
    "bert-mini": lambda: _bert(256, 4, 4),
    "bert-small": lambda: _bert(512, 4, 8),
    "bert-base": lambda: _bert(768, 12, 12),
    "bert-large": lambda: _bert(1024, 24, 16),
    "roberta-base": lambda: _roberta(768, 12, 12),
    "roberta-large": lambda: _roberta(1024, 24, 16),
    "albert-base": lambda: _albert(768, 12, 12),
    "albert-large": lambda: _albert(1024, 24, 16),
    "albert-xlarge": lambda: _albert(2048, 24, 32),
    "albert-xxlarge": lambda: _albert(4096, 12, 64),
}

# Modules that call `register` for their model family when imported.
_FAMILY_MODULES = ("etjax.models.t5_configs", "etjax.models.gpt2_configs",
                   "etjax.models.fashionbert")
_loaded_families = False


def register(name: str, factory: Callable[[], Any]) -> None:
  """Adds a named config factory to the zoo."""
  _CONFIGS[name] = factory


def import_present(modules) -> None:
  """Imports each module that exists (model families register themselves on import);
  a module that is absent is skipped, an error inside one is raised."""
  for module in modules:
    try:
      importlib.import_module(module)
    except ModuleNotFoundError as e:
      if e.name != module:
        raise


def _load_families() -> None:
  global _loaded_families
  if not _loaded_families:
    _loaded_families = True
    import_present(_FAMILY_MODULES)


def list_models() -> list[str]:
  """Every model name the zoo knows, sorted."""
  _load_families()
  return sorted(_CONFIGS)


def get_config(name: str, **overrides) -> Any:
  """The config of model `name`, with fields replaced by `overrides`."""
  _load_families()
  if name not in _CONFIGS:
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(_CONFIGS))}")
  config = _CONFIGS[name]()
  return config.replace(**overrides) if overrides else config


def module_for(config: Any) -> nn.Module:
  """The Linen module that runs `config`."""
  if isinstance(config, EncoderConfig):
    from etjax.models.bert import Encoder  # pylint: disable=g-import-not-at-top
    return Encoder(config)
  builder = getattr(config, "build_module", None)
  if builder is None:
    raise ValueError(f"no module known for config type {type(config).__name__}")
  return builder()


def create_model(name: str, **overrides) -> nn.Module:
  """The module of model `name` (randomly initialised by `module.init`)."""
  return module_for(get_config(name, **overrides))
