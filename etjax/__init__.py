"""etjax: deep transfer learning for NLP in JAX/Flax.

Importing etjax never imports TensorFlow, torch or transformers; subpackages are
imported on first use so that `import etjax` stays cheap.
"""

import importlib

__version__ = "0.1.0"

_SUBPACKAGES = ("models", "sharding", "pallas", "algorithms", "data", "train")


def __getattr__(name):
  if name in _SUBPACKAGES:
    return importlib.import_module(f"etjax.{name}")
  raise AttributeError(f"module 'etjax' has no attribute {name!r}")
