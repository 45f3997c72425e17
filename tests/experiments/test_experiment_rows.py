"""Row selection of the paper-table experiments (one row as its own gin job), the
cross-task pairs of Table 12, and a tiny Table 12 row run through `etjax run`."""

from __future__ import annotations

import numpy as np
import pytest

from etjax import main
from etjax.experiments import (cross_task, rows, tl_distill, tl_feature_instance,
                               tl_meta)


def test_select_orders_checks_and_lists_the_known_names():
  known = ("single", "metaft", "metadtl")
  assert rows.select("t.methods", ["metadtl", "single", "single"], known) == (
      "single", "metadtl")
  assert rows.select("t.percents", (20, 1), (1, 2, 5, 10, 20)) == (1, 20)
  with pytest.raises(ValueError, match=r"t.methods: unknown \['mdtl'\]; known: "
                                       r"\['single', 'metaft', 'metadtl'\]"):
    rows.select("t.methods", ["mdtl"], known)
  with pytest.raises(ValueError, match="give a list of names"):
    rows.select("t.methods", "metaft", known)
  with pytest.raises(ValueError, match="nothing selected"):
    rows.select("t.methods", [], known)


@pytest.mark.parametrize("run, kwargs, message", [
    (tl_feature_instance.run_table8, {"rows": ["SA"], "settings": {}},
     r"feature_table8.rows: unknown"),
    (tl_feature_instance.run_table8, {"overrides": {"dann": {}}, "settings": {}},
     r"feature_table8.overrides: unknown \['dann'\]"),
    (tl_feature_instance.run_table9, {"rows": ["L2TL"], "settings": {}},
     r"instance_table9.rows: unknown"),
    (tl_feature_instance.run_table9, {"overrides": {"drss": {}}, "settings": {}},
     r"instance_table9.overrides: unknown \['drss'\]"),
    (tl_distill.run_table10, {"rows": ["tinybert"], "settings": {}},
     r"distill_table10.rows: unknown"),
    (tl_distill.run_table10, {"overrides": {"adabert": {}}, "settings": {}},
     r"distill_table10.overrides: unknown \['adabert'\]"),
    (tl_distill.run_adabert, {"overrides": {"tinybert": {}}, "settings": {}},
     r"distill_adabert.overrides: unknown \['tinybert'\]"),
    (tl_meta.run_table10, {"rows": ["student"], "settings": {}},
     r"meta_table10.rows: unknown"),
    (tl_meta.run_table11, {"domains": ["toys"], "settings": {}},
     r"meta_table11.domains: unknown"),
    (tl_meta.run_table11, {"percents": [50], "settings": {}},
     r"meta_table11.percents: unknown"),
    (tl_meta.run_table11, {"methods": ["no"], "settings": {}},
     r"meta_table11.methods: unknown"),
    (tl_meta.run_table12, {"methods": ["mdtl"], "settings": {}},
     r"meta_table12.methods: unknown"),
    (tl_meta.run_table12, {"percents": [3], "settings": {}},
     r"meta_table12.percents: unknown"),
    (tl_meta.run_table12, {"encoder": "lstm", "settings": {}},
     r"meta_table12.encoder: unknown"),
])
def test_unknown_rows_fail_before_training(run, kwargs, message):
  with pytest.raises(ValueError, match=message + r".*known"):
    run(seeds=(0,), **kwargs)


def test_table12_data_arguments_are_checked():
  run = lambda **kwargs: tl_meta.run_table12(seeds=(0,), settings={}, **kwargs)
  with pytest.raises(ValueError, match=r"unknown data 'mnli'; expected one of"):
    run(data="mnli")
  with pytest.raises(ValueError, match="the Debian files fix their sizes"):
    run(data="debian", target_size=100)
  with pytest.raises(ValueError, match="debian_dir is for kind 'debian'"):
    run(debian_dir="/tmp")
  with pytest.raises(ValueError, match="evaluation split must be 'dev' or 'test'"):
    run(split="train")
  with pytest.raises(ValueError, match="Debian data folder '/nonexistent' does not"):
    run(data="debian", debian_dir="/nonexistent")


def test_debian_pair_is_use_to_network():
  pair = cross_task.load("debian", 3, split="test")
  assert pair.num_labels == (8, 2)
  assert pair.source["input_ids"].shape == (1276, cross_task.DEBIAN_LENGTH)
  assert len(pair.evaluation["labels"]) == 115  # network's test split
  assert pair.source["input_ids"].max() < cross_task.DEBIAN_VOCAB
  assert pair.target["domain"].max() < pair.num_domains
  # Shares are nested prefixes of one seeded order of network's 525 train rows.
  one, five = pair.share(1), pair.share(5)
  assert len(one["labels"]) == 5 and len(five["labels"]) == 26
  np.testing.assert_array_equal(one["input_ids"], five["input_ids"][:5])
  other = cross_task.load("debian", 4, split="dev")
  assert len(other.evaluation["labels"]) == 111
  assert not np.array_equal(other.share(5)["input_ids"], five["input_ids"])
  np.testing.assert_array_equal(np.sort(other.target["labels"]),
                                np.sort(pair.target["labels"]))


def test_synthetic_pair_is_sentiment3_to_polarity():
  pair = cross_task.load("synthetic", 0, sizes=(30, 50, 10), split="dev")
  assert pair.num_labels == (3, 2) and pair.num_domains == 4
  assert set(pair.source["labels"]) == {0, 1, 2}
  assert set(pair.source["domain"]) == {0, 1} and set(pair.target["domain"]) == {2, 3}
  assert len(pair.evaluation["labels"]) == 10 and len(pair.share(10)["labels"]) == 5


def test_markdown12_shows_the_selected_columns_only():
  results = {5: {"single": [50.0, 60.0], "metadtl": [70.0, 70.0]}}
  table = tl_meta.markdown12(results)
  assert "| Percentage | Single-task | MetaDTL | MetaDTL - single |" in table
  assert "| 5% | 55.0 ± 5.0 | 70.0 ± 0.0 | +15.0 ± 5.0 |" in table
  only = tl_meta.markdown12({1: {"metaft": [40.0]}})
  assert "MetaFT |" in only and "single" not in only and "| 1% | 40.0 ± 0.0 |" in only


def test_one_table12_row_runs_as_a_gin_job(capsys):
  # The documented row command with tiny sizes: one method at one percentage.
  assert main.run([
      "run", "--gin_file=gin/runs/table12_metadtl.gin",
      "--gin.meta_table12.methods=['single']", "--gin.meta_table12.percents=[10]",
      "--gin.meta_table12.seeds=(0,)", "--gin.meta_table12.source_size=20",
      "--gin.meta_table12.target_size=160", "--gin.meta_table12.test_size=16",
      "--gin.meta_table12.meta_steps=1", "--gin.meta_table12.ft_steps=1"]) == 0
  out = capsys.readouterr().out
  assert "| Percentage | Single-task |\n" in out and "| 10% |" in out
  assert "MetaFT" not in out and "| 1% |" not in out


def test_one_debian_table12_cell_runs_as_a_gin_job(capsys):
  # MetaDTL (meta-learner over use and network, network head cut out, fine-tuned) on
  # the real descriptions, one step each: the path runs and reports the test split.
  assert main.run([
      "run", "--gin_file=gin/runs/table12_metadtl_debian.gin",
      "--gin.meta_table12.methods=['metadtl']", "--gin.meta_table12.percents=[1]",
      "--gin.meta_table12.seeds=(0,)", "--gin.meta_table12.meta_steps=1",
      "--gin.meta_table12.ft_steps=1"]) == 0
  out = capsys.readouterr().out
  assert "Debian network (client/server) target" in out and "majority class 58.3%" in out
  assert "| Percentage | MetaDTL |\n" in out and "| 1% |" in out
