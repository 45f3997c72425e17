"""`import etjax` (and every subpackage) must not pull in TensorFlow, torch or transformers."""

import subprocess
import sys

HEAVY = ("torch", "tensorflow", "transformers")


def test_importing_etjax_imports_no_heavy_framework():
  code = ("import sys, importlib\n"
          "for name in ['etjax', 'etjax.models', 'etjax.algorithms', 'etjax.data',\n"
          "             'etjax.sharding', 'etjax.pallas', 'etjax.train',\n"
          "             'etjax.train.trainer', 'etjax.main']:\n"
          "  importlib.import_module(name)\n"
          f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True)
  assert out.stdout.strip() == "[]", out.stdout + out.stderr
