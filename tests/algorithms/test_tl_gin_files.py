"""The gin files of the feature- and instance-based TL methods and their Table 8/9
runs: parsed with gin's own parser, each binding accepted by the function it binds,
and every algorithm file builds a step whose init traces."""

from __future__ import annotations

import inspect
import pathlib

import jax
import numpy as np
import optax
import pytest

from etjax import main
from etjax.algorithms import feature_based as fb
from etjax.algorithms import instance_based as ib
from etjax.algorithms import metadtl as md
from etjax.algorithms import metaft as mf
from etjax.algorithms.settings import settings_from
from etjax.models.bag import BagOfEmbeddings
from etjax.models import SequenceClassifier
from etjax.train import ruder_plank as rp

ROOT = pathlib.Path(__file__).resolve().parents[2]
FEATURE_FILES = ("fully_shared", "shared_private", "shared_private_adv", "drss",
                 "drss_adv")


def _bindings(relative: str) -> dict[str, dict]:
  """{selector: {arg: value}} of one gin file, read as `etjax run` reads it."""
  return main.algorithm_file_bindings(str(ROOT / relative))


def _batch(n=4, length=6, vocab=20):
  ids = np.random.default_rng(0).integers(1, vocab, (n, length)).astype(np.int32)
  return {"input_ids": ids, "attention_mask": np.ones_like(ids),
          "token_type_ids": np.zeros_like(ids), "labels": np.zeros(n, np.int32),
          "domain": (np.arange(n) % 3).astype(np.int32),
          "weight": np.ones(n, np.float32)}


@pytest.mark.parametrize("name", FEATURE_FILES)
def test_feature_gin_files_build_their_method(name):
  bindings = _bindings(f"gin/algorithms/{name}.gin")
  assert set(bindings) == {"feature_tl"}
  kwargs = bindings["feature_tl"]
  assert kwargs["method"] == name
  step = fb.build_feature_step(make_encoder=lambda: BagOfEmbeddings(20, 8),
                               tx=optax.sgd(0.1), num_domains=3, **kwargs)
  state = jax.eval_shape(step.init, jax.random.PRNGKey(0), _batch())
  assert (state.omega is not None) == name.startswith("drss")


@pytest.mark.parametrize("name", ["rtl", "mgtl"])
def test_instance_gin_files_build_their_method(name):
  kwargs = _bindings(f"gin/algorithms/{name}.gin")["instance_tl"]
  assert kwargs["method"] == name
  clf = SequenceClassifier(BagOfEmbeddings(20, 8), 2, dropout_rate=0.0)
  step = ib.build_instance_step(classifier=clf, tx=optax.sgd(0.1), **kwargs)
  state = jax.eval_shape(step.init, jax.random.PRNGKey(0), _batch())
  assert ("discriminator" in state.params) == (name == "mgtl")


@pytest.mark.parametrize("name,cls", [("metaft", mf.MetaFTSettings),
                                      ("metadtl", md.MetaDTLSettings)])
def test_meta_gin_files_are_valid_settings(name, cls):
  """metaft / metadtl take **settings (gin accepts any name for them), so each file's
  bindings are checked here against the settings dataclass, and a misspelt name
  fails naming it."""
  kwargs = _bindings(f"gin/algorithms/{name}.gin")[name]
  settings = settings_from(cls, name, kwargs)
  assert {k: getattr(settings, k) for k in kwargs} == kwargs
  with pytest.raises(ValueError, match=rf"{name}: unknown setting\(s\) \['temprature'\]"):
    settings_from(cls, name, {**kwargs, "temprature": 0.5})
  with pytest.raises(ValueError, match="unknown setting"):
    (mf.metaft if name == "metaft" else md.metadtl)(None, None, temprature=0.5)


def _accepts(fn, kwargs, where):
  params = inspect.signature(fn).parameters
  unknown = set(kwargs) - set(params)
  assert not unknown, f"{where} binds {unknown}, which {fn.__name__} does not take"


def test_ruder_plank_file_binds_existing_parameters():
  # The run files (gin/runs/table8_feature_tl.gin, table9_instance_tl.gin) are parsed
  # by gin itself, against the registered experiment functions, in tests/test_main.py.
  _accepts(rp.search, _bindings("gin/algorithms/ruder_plank.gin")["ruder_plank"],
           "ruder_plank.gin")
  with pytest.raises(ValueError, match="unknown feature-based method 'ss'"):
    fb.build_feature_step("ss", lambda: BagOfEmbeddings(20, 8), optax.sgd(0.1))
  with pytest.raises(ValueError, match="unknown instance-based method"):
    ib.build_instance_step("l2tl", None, optax.sgd(0.1))


def test_algorithm_settings_read_every_file_and_name_a_bad_line(tmp_path):
  settings = main.algorithm_settings()
  files = sorted(p.stem for p in (ROOT / "gin" / "algorithms").glob("*.gin"))
  assert sorted(settings) == files
  assert settings["drss"]["feature_tl"]["drss_weight"] == 1e-3
  assert settings["metakd"]["metakd"]["own_domain_weight"] == 0.5
  (tmp_path / "good.gin").write_text("kd.temperature = 2.0\n")
  (tmp_path / "bad.gin").write_text("# a comment\nkd.temperature = 2.0\nkd.losses = @x\n")
  with pytest.raises(ValueError, match=r"bad.gin: unexpected configurable reference @x"):
    main.algorithm_settings(str(tmp_path))
  (tmp_path / "bad.gin").write_text("kd.temperature = 2.0\nscope/kd.temperature = 1.0\n")
  with pytest.raises(ValueError, match=r"bad.gin:2: algorithm files hold plain bindings"):
    main.algorithm_settings(str(tmp_path))
